"""Multi-SAE training (SAELens 6's MultiSAETrainingRunner): the multi-hook store, the
trainer, the runner, its evaluator, checkpoints and resume, against fastsae's single-SAE
runner and sae-lens's config and file layout. Tiny TransformerLens model (tests/tiny_runs)."""

from __future__ import annotations

import dataclasses
import json

import datasets
import pytest
import sae_lens
import sae_lens.multi_sae_training_runner as sl_multi
import tiny_runs
import torch
from transformer_lens import HookedTransformer

from fastsae.multi_sae_training_runner import (
    MultiSAETrainingRunner,
    MultiSAETrainingRunnerConfig,
)
from fastsae.saes.registry import training_config_class_for_architecture
from fastsae.training.config import LoggingConfig, SAETrainerConfig
from fastsae.training.data.activations_store import (
    ActivationsStore,
    multi_hook_concat_split_iter,
)
from fastsae.training.data.model_hooks import MultiHookReader
from fastsae.training.metrics import MetricsLogger
from fastsae.training.multi_sae_trainer import MultiSAETrainer
from fastsae.training.runner import SAETrainingRunner
from fastsae.training.trainer import SAETrainer

TopK = training_config_class_for_architecture("topk")
Standard = training_config_class_for_architecture("standard")

RESID = "blocks.1.hook_resid_pre"  # width 16
MLP = "blocks.0.mlp.hook_post"  # width 32
EMBED, POS, RESID0 = "hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre"
STORE_KW = dict(
    context_size=16, prepend_bos=False, train_batch_size_tokens=64,
    store_batch_size_prompts=8, n_batches_in_buffer=4, seed=0,
)  # fmt: skip


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    return tiny_runs.tiny_model()


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    """Training curves (matplotlib, tested in test_trainer) are not drawn here: they
    would take most of these tests' time."""
    monkeypatch.setattr(MetricsLogger, "plot", lambda self, path=None: None)


@pytest.fixture(scope="module")
def dataset() -> datasets.Dataset:
    return tiny_runs.token_rows_dataset(300)


class ForwardCounter:
    """Counts the model's forward passes (each runs its embedding once)."""

    def __init__(self, model: HookedTransformer):
        self.n = 0
        self.handle = model.embed.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.n += 1

    def close(self) -> None:
        self.handle.remove()


def _multi_store(model, dataset, hooks, d_ins, **kw):
    return ActivationsStore.from_config_multi_hook(
        model, dataset=dataset, hook_names=hooks, hook_d_ins=d_ins, **{**STORE_KW, **kw}
    )


def _single_store(model, dataset, hook, d_in, **kw):
    return ActivationsStore(model, dataset, hook_name=hook, d_in=d_in, **{**STORE_KW, **kw})


# ---------------------------------------------------------------------------- the store
def test_multi_hook_store_shares_one_shuffle_and_one_forward(model, dataset):
    """Each hook's batches are exactly a single-hook store's (same seed), so the rows of
    every hook are the same tokens; and one forward serves every hook."""
    hooks = [EMBED, POS, RESID0, MLP]
    d_ins = {EMBED: 16, POS: 16, RESID0: 16, MLP: 32}
    multi = _multi_store(model, dataset, hooks, d_ins)
    counter = ForwardCounter(model)
    try:
        batches = [multi.next_multi_hook_batch() for _ in range(6)]
        multi_forwards = counter.n
        counter.n = 0
        single = _single_store(model, dataset, MLP, 32)
        counter.n = 0
        single_batches = [single.next_batch() for _ in range(6)]
        assert counter.n == multi_forwards > 0  # one forward per model batch, for 4 hooks
    finally:
        counter.close()
    for b, s in zip(batches, single_batches, strict=True):
        assert {h: tuple(t.shape) for h, t in b.items()} == {
            EMBED: (64, 16),
            POS: (64, 16),
            RESID0: (64, 16),
            MLP: (64, 32),
        }
        torch.testing.assert_close(b[MLP], s, rtol=0, atol=0)
        # alignment: resid_pre of layer 0 is embed + pos_embed of the same token
        torch.testing.assert_close(b[RESID0], b[EMBED] + b[POS], rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="next_multi_hook_batch"):
        multi.next_batch()
    with pytest.raises(RuntimeError, match="from_config_multi_hook"):
        single.get_multi_hook_activations(torch.zeros(1, 4, dtype=torch.long))


def test_multi_hook_store_resumes_exactly_with_prefetch(model, dataset):
    hooks, d_ins = [RESID, MLP], {RESID: 16, MLP: 32}
    store = _multi_store(model, dataset, hooks, d_ins, prefetch_llm_batches=2)
    loader = store.get_multi_hook_data_loader()
    for _ in range(3):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(5)]
    store.close()
    fresh = _multi_store(model, dataset, hooks, d_ins)
    fresh.load_state_dict(state)
    for want in expected:
        got = fresh.next_multi_hook_batch()
        for h in hooks:
            torch.testing.assert_close(got[h], want[h], rtol=0, atol=0)
    other = _multi_store(model, dataset, [MLP, RESID], d_ins)  # the same width, split 32 + 16
    with pytest.raises(ValueError, match="hook widths"):
        other.load_state_dict(state)


def test_multi_hook_store_errors_name_the_argument(model, dataset):
    with pytest.raises(ValueError, match="hook_d_ins has no d_in for the hooks"):
        _multi_store(model, dataset, [RESID, MLP], {RESID: 16})
    with pytest.raises(ValueError, match=r"d_in=16 does not match hook 'blocks.0.mlp.hook_post'"):
        _multi_store(model, dataset, [RESID, MLP], {RESID: 16, MLP: 16})
    with pytest.raises(ValueError, match="not a hook"):
        _multi_store(model, dataset, [RESID, "blocks.9.nope"], {RESID: 16, "blocks.9.nope": 4})
    with pytest.raises(ValueError, match="normalize_activations"):
        _multi_store(
            model, dataset, [RESID], {RESID: 16}, normalize_activations="expected_average_only_in"
        )


def test_multi_hook_concat_split_iter_keeps_tokens_aligned():
    gen = torch.Generator().manual_seed(0)
    items = []
    for i in range(5):
        ids = torch.arange(i * 10, i * 10 + 10, dtype=torch.float32)[:, None]
        items.append({"a": ids.repeat(1, 3), "b": -ids.repeat(1, 5)})
    out = list(multi_hook_concat_split_iter(20, 8, iter(items), ["a", "b"], 0.5, generator=gen))
    seen = torch.cat([b["a"][:, 0] for b in out])
    assert all(b["a"].shape == (8, 3) and b["b"].shape == (8, 5) for b in out)
    for b in out:
        torch.testing.assert_close(b["b"], -b["a"][:, :1].repeat(1, 5))
    assert len(set(seen.tolist())) == len(seen) == 48  # no token twice; 2 of 50 left over
    assert seen.tolist() != sorted(seen.tolist())  # shuffled
    in_order = list(multi_hook_concat_split_iter(20, 10, iter(items), ["a", "b"], 0.0))
    assert torch.cat([b["a"][:, 0] for b in in_order]).tolist() == list(range(50))
    with pytest.raises(ValueError, match=r"no activations for hooks \['c'\]"):
        list(multi_hook_concat_split_iter(20, 8, iter(items), ["a", "c"]))
    with pytest.raises(ValueError, match="buffer_size"):
        list(multi_hook_concat_split_iter(4, 8, iter(items), ["a"]))


# ---------------------------------------------------------------------------- the config
def _cfg(tmp_path, saes, hook_names, **kw) -> MultiSAETrainingRunnerConfig:
    defaults = dict(
        model_name="tiny", dataset_path="unused", context_size=16, prepend_bos=False,
        train_batch_size_tokens=64, store_batch_size_prompts=8, n_batches_in_buffer=4,
        training_tokens=64 * 12, lr=1e-3, seed=0, n_eval_batches=1, eval_batch_size_prompts=2,
        checkpoint_path=str(tmp_path / "ck"), output_path=str(tmp_path / "out"),
        dead_feature_window=5, feature_sampling_window=5,
        logger=LoggingConfig(wandb_log_frequency=4, eval_every_n_wandb_logs=10**6),
    )  # fmt: skip
    defaults.update(kw)
    return MultiSAETrainingRunnerConfig(saes=saes, hook_names=hook_names, **defaults)


def test_config_fields_and_defaults_are_sae_lens(tmp_path):
    ours = {f.name: f for f in dataclasses.fields(MultiSAETrainingRunnerConfig)}
    theirs = dataclasses.fields(sl_multi.MultiSAETrainingRunnerConfig)
    assert [f.name for f in theirs] == [n for n in ours if n in {f.name for f in theirs}]
    assert set(ours) - {f.name for f in theirs} == {"max_grad_norm", "skip_nonfinite_batches"}

    def default(f):
        if f.default is not dataclasses.MISSING:
            return f.default
        if f.default_factory is not dataclasses.MISSING:
            made = f.default_factory()
            return dataclasses.asdict(made) if dataclasses.is_dataclass(made) else made
        return dataclasses.MISSING

    for f in theirs:
        if f.name in ("sae_lens_version", "sae_lens_training_version", "logger"):
            # sae-lens records its installed version, fastsae the format's; fastsae's
            # LoggingConfig has its own defaults (no W&B unless asked)
            continue
        assert default(ours[f.name]) == default(f), f.name
    # to_dict writes sae-lens's keys (and fastsae's two additions)
    mine = _cfg(tmp_path, {"a": TopK(d_in=16, d_sae=32, k=4)}, RESID)
    ref = sl_multi.MultiSAETrainingRunnerConfig(
        saes={"a": sae_lens.TopKTrainingSAEConfig(d_in=16, d_sae=32, k=4)}, hook_names=RESID,
        checkpoint_path=str(tmp_path / "ck"),
    )  # fmt: skip
    assert set(mine.to_dict()) == set(ref.to_dict()) | {"max_grad_norm", "skip_nonfinite_batches"}
    assert mine.hook_names_per_sae == {"a": RESID}
    assert mine.logger.run_name == ref.logger.run_name.replace("LR-0.0003", "LR-0.001").replace(
        "Tokens-2.000e+06", "Tokens-7.680e+02"
    )
    assert mine.checkpoint_path.startswith(str(tmp_path / "ck") + "/")  # + a run id, as sae-lens
    assert mine.lr_end == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        (dict(use_cached_activations=True), "cached activations are not supported"),
        (dict(from_pretrained_path="x"), "resume from a multi-SAE checkpoint"),
        (dict(compile_sae=True), "compile_sae=True is not supported"),
        (dict(hook_name=RESID), "give hook_names"),
        (dict(hook_names={"a": RESID, "zz": RESID}), r"extra: \['zz'\]; missing: \['b'\]"),
        (dict(hook_names={"a": RESID, "b": MLP}), None),
        (dict(hook_head_indices={"q": 1}), r"unknown keys \(not in saes\): \['q'\]"),
        (dict(activations_mixing_fraction=1.5), r"activations_mixing_fraction must be in \[0, 1\]"),
        (dict(training_tokens=0), "training_tokens must be a positive int"),
        (dict(lr_warm_up_steps=100), "lr_warm_up_steps"),
        (dict(checkpoint_path=None, n_checkpoints=1), "checkpoint_path is None"),
    ],
)
def test_config_errors_name_the_option(tmp_path, kwargs, error):
    saes = {"a": TopK(d_in=16, d_sae=32, k=4), "b": Standard(d_in=16, d_sae=32)}
    kwargs = {"hook_names": RESID, **kwargs}
    if error is None:  # SAEs of one hook with different d_in: named
        saes["b"] = Standard(d_in=32, d_sae=32)
        kwargs["hook_names"] = {"a": RESID, "b": RESID}
        error = "SAEs sharing hook 'blocks.1.hook_resid_pre' must have the same d_in"
    hook_names = kwargs.pop("hook_names")
    with pytest.raises((ValueError, TypeError), match=error):
        _cfg(tmp_path, saes, hook_names, **kwargs)
    with pytest.raises(TypeError, match=r"saes\['a'\] must be a training SAE config"):
        _cfg(tmp_path, {"a": sae_lens.TopKTrainingSAEConfig(d_in=16, d_sae=32, k=4)}, RESID)


# ---------------------------------------------------------------------------- training
def test_one_sae_multi_runner_equals_single_runner_and_one_forward_per_batch(
    tmp_path, model, dataset
):
    """The first SAE of a multi run (3 SAEs, 2 hooks, 2 architectures) ends with exactly
    the weights fastsae's single-SAE runner gives it (same seed: same init, same data
    order, same optimizer and schedules), and the run does as many model forwards as the
    single run."""
    tokens = 64 * 12
    single_cfg = tiny_runs.runner_config(
        tmp_path / "single", TopK(d_in=16, d_sae=32, k=4), training_tokens=tokens,
        n_checkpoints=0, lr_scheduler_name="cosineannealing", lr_warm_up_steps=2,
        wandb_log_frequency=4, eval_every_n_wandb_logs=10**6,
        dead_feature_window=5, feature_sampling_window=5,
    )  # fmt: skip
    single = SAETrainingRunner(single_cfg, override_model=model, override_dataset=dataset,
                               show_progress=False)  # fmt: skip
    counter = ForwardCounter(model)
    try:
        single_sae = single.run()
        single_forwards = counter.n
        multi_cfg = _cfg(
            tmp_path / "multi",
            {
                "a": TopK(d_in=16, d_sae=32, k=4),
                "b": Standard(d_in=16, d_sae=48),
                "c": TopK(d_in=32, d_sae=64, k=8),
            },
            {"a": RESID, "b": RESID, "c": MLP},
            training_tokens=tokens, lr_scheduler_name="cosineannealing", lr_warm_up_steps=2,
        )  # fmt: skip
        runner = MultiSAETrainingRunner(multi_cfg, override_dataset=dataset,
                                        override_model=model, show_progress=False)  # fmt: skip
        counter.n = 0
        saes = runner.run()
        assert counter.n == single_forwards > 0
    finally:
        counter.close()
    for name, p in single_sae.state_dict().items():
        torch.testing.assert_close(saes["a"].state_dict()[name], p, rtol=0, atol=0)
    trainers = runner.trainer.trainers
    assert len({id(t.optimizer) for t in trainers.values()}) == 3
    assert all(t.state.n_training_steps == 12 for t in trainers.values())
    assert trainers["a"].optimizer.param_groups[0]["lr"] == pytest.approx(
        single.trainer.optimizer.param_groups[0]["lr"]
    )
    assert set(trainers["b"].coefficient_schedulers) == {"l1"}
    # per-SAE metrics rows, as the single run's
    single_rows = (tmp_path / "single" / "out" / "metrics.jsonl").read_text().splitlines()
    multi_rows = (tmp_path / "multi" / "out" / "a" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r) for r in multi_rows] == [json.loads(r) for r in single_rows]
    assert any("losses/overall_loss" in json.loads(r) for r in multi_rows)


def test_trainer_on_a_list_equals_sae_trainer():
    """MultiSAETrainer drives each SAE exactly as SAETrainer.fit does (normalisation,
    clipping, schedules), here on batches of your own."""
    torch.manual_seed(0)
    hooks = [{"x": torch.randn(32, 8) * 3, "y": torch.randn(32, 4)} for _ in range(10)]
    cfg = SAETrainerConfig(total_training_samples=32 * 6, train_batch_size_samples=32, lr=1e-2,
                           n_batches_for_norm_estimate=2, lr_scheduler_name="cosineannealing")  # fmt: skip

    def sae_cfg():  # one each: folding the normalisation in edits the SAE's config
        return TopK(d_in=8, d_sae=16, k=3, normalize_activations="expected_average_only_in")

    torch.manual_seed(1)
    single_sae = training_sae_class("topk")(sae_cfg())
    torch.manual_seed(1)
    multi_sae = training_sae_class("topk")(sae_cfg())
    other = training_sae_class("standard")(Standard(d_in=4, d_sae=8))
    SAETrainer(cfg, single_sae, iter([b["x"] for b in hooks]), show_progress=False).fit()
    trainer = MultiSAETrainer(cfg, {"m": multi_sae, "o": other}, {"m": "x", "o": "y"},
                              iter(hooks), show_progress=False)  # fmt: skip
    trainer.fit()
    assert trainer.trainers["m"].scaler.scaling_factor is None  # folded into the weights
    assert multi_sae.cfg.normalize_activations == "none"
    for name, p in single_sae.state_dict().items():
        torch.testing.assert_close(multi_sae.state_dict()[name], p, rtol=0, atol=0)
    assert trainer.n_training_samples == 32 * 6 and trainer.n_training_steps == 6
    with pytest.raises(ValueError, match="same keys"):
        MultiSAETrainer(cfg, {"m": multi_sae}, {"q": "x"}, iter(hooks))


def training_sae_class(arch):
    from fastsae.saes.registry import training_sae_class_for_architecture

    return training_sae_class_for_architecture(arch)


def test_checkpoints_outputs_and_resume(tmp_path, model, dataset):
    """Checkpoints and outputs have sae-lens's layout; a run resumed from a multi-SAE
    checkpoint ends with exactly the weights of the uninterrupted run; the evaluator's
    metrics land in each SAE's rows; the outputs load in sae-lens."""
    seen = []

    def user_evaluator(sae, batches, scaler):
        batch = next(batches)
        seen.append(tuple(batch.shape))
        return {"custom/width": float(batch.shape[1])}

    def cfg(run, **kw):
        return _cfg(
            tmp_path / run,
            {
                "resid": TopK(d_in=16, d_sae=32, k=4,
                              normalize_activations="expected_average_only_in"),
                "mlp": Standard(d_in=32, d_sae=32),
            },  # fmt: skip
            {"resid": RESID, "mlp": MLP},
            n_checkpoints=1, n_batches_for_norm_estimate=2, evaluator=user_evaluator,
            logger=LoggingConfig(wandb_log_frequency=4, eval_every_n_wandb_logs=2, wandb_id="run"),
            **kw,
        )  # fmt: skip

    full = MultiSAETrainingRunner(cfg("a"), override_dataset=dataset, override_model=model,
                                  show_progress=False).run()  # fmt: skip
    assert seen == [(64, 16), (64, 32)]  # step 8: one evaluation, each SAE its hook's rows
    checkpoints = sorted((tmp_path / "a" / "ck" / "run").iterdir())
    assert [c.name for c in checkpoints] == ["448"]  # n_training_samples > 768 / 2
    ck = checkpoints[0]
    assert {p.name for p in ck.iterdir()} == {
        "resid", "mlp", "activations_store_state.safetensors", "runner_cfg.json",
        "multi_trainer_state.json",
    }  # fmt: skip
    assert {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors",
            "trainer_state.pt"} <= {p.name for p in (ck / "resid").iterdir()}  # fmt: skip
    out = tmp_path / "a" / "out"
    assert json.loads((out / "runner_cfg.json").read_text())["hook_names"] == {
        "resid": RESID,
        "mlp": MLP,
    }
    for name, hook in (("resid", RESID), ("mlp", MLP)):
        loaded = sae_lens.SAE.load_from_disk(str(out / name))
        assert loaded.cfg.metadata.hook_name == hook
        assert (out / name / "sparsity.safetensors").is_file()
    rows = [json.loads(r) for r in (out / "mlp" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "custom/width" in r]
    assert len(evals) == 1 and evals[0]["step"] == 8 and evals[0]["custom/width"] == 32.0
    assert "model_performance_preservation/ce_loss_score" in evals[0]

    seen.clear()
    resumed_runner = MultiSAETrainingRunner(
        cfg("b", resume_from_checkpoint=str(ck)), override_dataset=dataset,
        override_model=model, show_progress=False,
    )  # fmt: skip
    resumed = resumed_runner.run()
    assert seen == [(64, 16), (64, 32)]  # the evaluation after the checkpoint, again
    for name in ("resid", "mlp"):
        for key, p in full[name].state_dict().items():
            torch.testing.assert_close(resumed[name].state_dict()[key], p, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match=r"no sub-folder for the SAEs \['other'\]"):
        bad = _cfg(tmp_path / "c", {"other": TopK(d_in=16, d_sae=32, k=4)}, RESID,
                   resume_from_checkpoint=str(ck))  # fmt: skip
        MultiSAETrainingRunner(bad, override_dataset=dataset, override_model=model,
                               show_progress=False).run()  # fmt: skip


def test_interrupt_mid_step_keeps_the_batch_pending(tmp_path):
    """A hard interrupt while the second SAE steps: the checkpoint holds that SAE's batch
    as pending, and a resumed trainer trains it first, ending where an uninterrupted
    run ends."""
    torch.manual_seed(0)
    batches = [{"x": torch.randn(16, 8), "y": torch.randn(16, 8)} for _ in range(8)]
    cfg = SAETrainerConfig(total_training_samples=16 * 6, train_batch_size_samples=16,
                           lr=1e-2, checkpoint_path=str(tmp_path / "ck"))  # fmt: skip

    def saes():
        torch.manual_seed(3)
        return {"p": training_sae_class("topk")(TopK(d_in=8, d_sae=16, k=2)),
                "q": training_sae_class("topk")(TopK(d_in=8, d_sae=16, k=2))}  # fmt: skip

    hooks = {"p": "x", "q": "y"}
    reference = saes()
    MultiSAETrainer(cfg, reference, hooks, iter(batches), show_progress=False).fit()

    interrupted = saes()
    trainer = MultiSAETrainer(cfg, interrupted, hooks, iter(batches), show_progress=False)
    step = trainer.trainers["q"].step
    calls = {"n": 0}

    def failing_step(batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return step(batch)

    trainer.trainers["q"].step = failing_step
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    ck = tmp_path / "ck" / "interrupted_32"
    assert (ck / "q" / "pending_batch.safetensors").is_file()
    assert not (ck / "p" / "pending_batch.safetensors").exists()

    resumed = saes()
    trainer = MultiSAETrainer(cfg, resumed, hooks, iter(batches[3:]), show_progress=False)
    trainer.load_checkpoint(ck)
    trainer.fit()
    for name in hooks:
        for key, p in reference[name].state_dict().items():
            torch.testing.assert_close(resumed[name].state_dict()[key], p, rtol=0, atol=0)


def test_multi_hook_reader_on_a_plain_module_stops_after_the_last_hook():
    torch.manual_seed(0)
    ran = []
    net = torch.nn.Sequential(
        torch.nn.Embedding(50, 8), torch.nn.Linear(8, 6), torch.nn.Linear(6, 4), torch.nn.ReLU()
    )
    net[3].register_forward_hook(lambda *_: ran.append("3"))
    reader = MultiHookReader(net, ["2", "0"])
    tokens = torch.randint(0, 50, (2, 5))
    out = reader.read(tokens, None, {})
    assert list(out) == ["2", "0"] and not ran  # layer 3 never ran
    torch.testing.assert_close(out["0"], net[0](tokens))
    torch.testing.assert_close(out["2"], net[2](net[1](net[0](tokens))))
    with pytest.raises(ValueError, match="not a module path"):
        MultiHookReader(net, ["0", "9"])
    with pytest.raises(ValueError, match="duplicates"):
        MultiHookReader(net, ["0", "0"])


def test_evaluator_results_are_routed_to_each_sae(tmp_path):
    torch.manual_seed(0)
    batches = [{"x": torch.randn(16, 8)} for _ in range(4)]
    cfg = SAETrainerConfig(
        total_training_samples=16 * 4, train_batch_size_samples=16,
        logger=LoggingConfig(wandb_log_frequency=1, eval_every_n_wandb_logs=2),
    )  # fmt: skip

    def evaluator(saes, data_provider, activation_scalers, hook_names):
        assert set(saes) == {"p"} and hook_names == {"p": "x"}
        return {"p/custom": 1.0, "overall": 2.0}

    sae = training_sae_class("topk")(TopK(d_in=8, d_sae=16, k=2))
    MultiSAETrainer(cfg, {"p": sae}, {"p": "x"}, iter(batches), evaluator=evaluator,
                    run_dir=tmp_path, show_progress=False).fit()  # fmt: skip
    rows = [json.loads(r) for r in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "custom" in r] == [2, 4]
    run_rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert run_rows == [{"step": 2, "overall": 2.0}, {"step": 4, "overall": 2.0}]
