"""fastsae.evals: run_evals against sae-lens's on the same SAE, model and tokens (every
metric key and value), transcoders, and the trainer's two summaries against hand
computations. Offline: a tiny TransformerLens model and a pre-tokenized dataset."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import datasets
import pytest
import sae_lens
import torch
import torch.nn.functional as F
from sae_lens.evals import EvalConfig as SLEvalConfig
from sae_lens.training.activation_scaler import ActivationScaler as SLActivationScaler
from tiny_runs import tiny_model, token_rows
from transformer_lens import HookedTransformer

from fastsae import SAE
from fastsae.evals import (
    EvalConfig,
    get_eval_everything_config,
    get_featurewise_weight_based_metrics,
    language_model_metrics,
    reconstruction_metrics,
    run_evals,
)
from fastsae.training.activation_scaler import ActivationScaler
from fastsae.training.data.activations_store import ActivationsStore

D_MODEL, CTX, D_SAE = 16, 16, 64  # tiny_runs' model width and context
RESID = "blocks.1.hook_resid_pre"
ARCHS = ("standard", "topk", "jumprelu", "gated")
# exclude_special_tokens for the parity runs: the tokens below include these ids
EXCLUDED = [0, 1]


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    return tiny_model()


@pytest.fixture(scope="module")
def rows() -> list[list[int]]:
    return token_rows(48, low=0)


def _dataset(rows: list[list[int]]) -> datasets.Dataset:
    # a fresh object per store: sae-lens's store calls set_format on the dataset it gets
    return datasets.Dataset.from_dict({"tokens": rows})


def _randomize_(sae: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(0.05 + 0.6 * torch.rand(p.shape, generator=gen))
            elif name in ("W_enc", "W_dec", "W_skip"):
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[0]))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def _make_sae(arch: str, hook_name: str = RESID, d_in: int = D_MODEL, **extra) -> SAE:
    metadata = {"hook_name": hook_name, "context_size": CTX, "prepend_bos": False}
    metadata.update(extra.pop("metadata", {}))
    cfg = {"architecture": arch, "d_in": d_in, "d_sae": D_SAE, "metadata": metadata, **extra}
    if arch == "topk":
        cfg.setdefault("k", 4)
    sae = SAE.from_dict(cfg)
    _randomize_(sae)
    return sae


def _stores(model, rows, sae, sl_sae, batch: int = 4):
    """(fastsae store, sae-lens store) over the same rows, in the same order."""
    md = sae.cfg.metadata
    ours = ActivationsStore(
        model, _dataset(rows), hook_name=md.hook_name, hook_head_index=md.hook_head_index,
        d_in=sae.cfg.d_in, context_size=CTX, prepend_bos=False,
        store_batch_size_prompts=batch, train_batch_size_tokens=16, n_batches_in_buffer=4,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fewer samples than training tokens"
        theirs = sae_lens.ActivationsStore.from_sae(
            model, sl_sae, dataset=_dataset(rows), streaming=False,
            store_batch_size_prompts=batch, train_batch_size_tokens=16, n_batches_in_buffer=4,
        )  # fmt: skip
    return ours, theirs


def _store(model, rows, hook_name: str, d_in: int = D_MODEL, batch: int = 4) -> ActivationsStore:
    return ActivationsStore(
        model, _dataset(rows), hook_name=hook_name, d_in=d_in, context_size=CTX,
        prepend_bos=False, store_batch_size_prompts=batch, train_batch_size_tokens=16,
        n_batches_in_buffer=4,
    )  # fmt: skip


def _sl_config(cfg: EvalConfig) -> SLEvalConfig:
    names = SLEvalConfig.__dataclass_fields__
    return SLEvalConfig(**{k: getattr(cfg, k) for k in names})


def _close(ours, theirs) -> bool:
    if isinstance(theirs, float) and math.isnan(theirs):
        return isinstance(ours, float) and math.isnan(ours)
    return math.isclose(ours, theirs, rel_tol=1e-5, abs_tol=1e-7)


def _assert_same(ours, theirs, path: str = "") -> None:
    """Same keys in the same order, same nesting, values within rel 1e-5 (NaN == NaN)."""
    if isinstance(theirs, tuple):  # (eval_metrics, feature_metrics)
        assert isinstance(ours, tuple) and len(ours) == len(theirs), path
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            _assert_same(a, b, f"{path}[{i}]")
    elif isinstance(theirs, dict):
        assert isinstance(ours, dict), path
        assert list(ours) == list(theirs), f"{path}: keys {list(ours)} != {list(theirs)}"
        for k in theirs:
            _assert_same(ours[k], theirs[k], f"{path}.{k}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), path
        bad = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if not _close(a, b)]
        assert not bad, f"{path}[{bad[:5]}]: {[ours[i] for i in bad[:5]]} != " + str(
            [theirs[i] for i in bad[:5]]
        )
    elif isinstance(theirs, int):
        assert ours == theirs and isinstance(ours, int), f"{path}: {ours!r} != {theirs!r}"
    else:
        assert _close(ours, theirs), f"{path}: {ours!r} != {theirs!r}"


def _parity(model, rows, sae, eval_config, *, ours_scaler=None, sl_scaler=None, **kwargs):
    sl_sae = sae.to_sae_lens()
    ours_store, sl_store = _stores(model, rows, sae, sl_sae)
    ours = run_evals(sae, ours_store, model, ours_scaler, eval_config, **kwargs)
    theirs = sae_lens.run_evals(
        sl_sae, sl_store, model, sl_scaler or SLActivationScaler(), _sl_config(eval_config),
        **kwargs,
    )  # fmt: skip
    _assert_same(ours, theirs)
    return ours, theirs


# ----------------------------------------------------------------------------------------
# the two stores give the same tokens
# ----------------------------------------------------------------------------------------
def test_stores_yield_identical_tokens(model, rows):
    sae = _make_sae("standard")
    ours, theirs = _stores(model, rows, sae, sae.to_sae_lens())
    for n in (4, 3, 5, 4):
        torch.testing.assert_close(ours.get_batch_tokens(n), theirs.get_batch_tokens(n))


# ----------------------------------------------------------------------------------------
# run_evals parity with sae-lens
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_run_evals_everything_matches_sae_lens(model, rows, arch):
    # 10 CE/KL batches then 1 sparsity/variance batch of 4 rows: 44 of the 48 rows
    cfg = get_eval_everything_config()
    ours, _ = _parity(model, rows, _make_sae(arch), cfg, exclude_special_tokens=EXCLUDED)
    eval_metrics, feature_metrics = ours
    assert list(eval_metrics) == [
        "model_behavior_preservation", "model_performance_preservation",
        "reconstruction_quality", "shrinkage", "sparsity", "token_stats",
    ]  # fmt: skip
    assert eval_metrics["token_stats"] == {
        "total_tokens_eval_reconstruction": 10 * 4 * CTX,
        "total_tokens_eval_sparsity_variance": 1 * 4 * CTX,
    }
    bias = ["encoder_bias"] if arch != "gated" else []  # gated SAEs have no b_enc
    assert list(feature_metrics) == [
        "feature_density", "consistent_activation_heuristic", "encoder_norm",
        "encoder_decoder_cosine_sim", *bias,
    ]  # fmt: skip
    assert 0 < eval_metrics["sparsity"]["l0"] < D_SAE  # a non-vacuous SAE
    assert eval_metrics["model_behavior_preservation"]["kl_div_with_sae"] > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_run_evals_default_config_matches_sae_lens(model, rows, arch):
    (eval_metrics, feature_metrics), _ = _parity(model, rows, _make_sae(arch), EvalConfig())
    assert list(eval_metrics) == ["token_stats"] and feature_metrics == {}


@pytest.mark.parametrize(
    "cfg",
    [
        EvalConfig(compute_kl=True, compute_sparsity_metrics=True, n_eval_reconstruction_batches=2),
        # the density lists are there, all NaN, when only another activation metric is on
        EvalConfig(compute_l2_norms=True, compute_featurewise_weight_based_metrics=True),
        # 10 batches of 5 rows run past the 48 rows: both stores wrap to the first row
        EvalConfig(compute_ce_loss=True, compute_variance_metrics=True, batch_size_prompts=5),
        get_eval_everything_config(
            batch_size_prompts=3,
            n_eval_reconstruction_batches=3,
            n_eval_sparsity_variance_batches=2,
        ),
    ],
)
@pytest.mark.filterwarnings("ignore:All samples in the training dataset have been exhausted")
def test_run_evals_partial_configs_match_sae_lens(model, rows, cfg):
    _parity(model, rows, _make_sae("jumprelu"), cfg, exclude_special_tokens=EXCLUDED)


def test_exclude_special_tokens_from_the_tokenizer(model, rows, monkeypatch):
    monkeypatch.setattr(model, "tokenizer", SimpleNamespace(bos_token_id=0, eos_token_id=1, padding_side="right"),
                        raising=False)  # fmt: skip
    cfg = get_eval_everything_config(n_eval_reconstruction_batches=2)
    (with_tok, _), _ = _parity(model, rows, _make_sae("topk"), cfg)  # default: True
    monkeypatch.setattr(model, "tokenizer", None)
    (listed, _), _ = _parity(model, rows, _make_sae("topk"), cfg, exclude_special_tokens=EXCLUDED)
    (kept, _), _ = _parity(model, rows, _make_sae("topk"), cfg, exclude_special_tokens=False)
    _assert_same(with_tok, listed)
    assert with_tok["shrinkage"]["l2_norm_in"] != kept["shrinkage"]["l2_norm_in"]


def test_hook_z_sae_matches_sae_lens_and_keeps_reshaping(model, rows):
    sae = _make_sae("topk", hook_name="blocks.0.attn.hook_z", reshape_activations="hook_z")
    assert sae.hook_z_reshaping_mode
    _parity(model, rows, sae, get_eval_everything_config(n_eval_reconstruction_batches=2))
    assert sae.hook_z_reshaping_mode


def test_single_head_sae_matches_sae_lens(model, rows):
    sae = _make_sae("standard", hook_name="blocks.0.attn.hook_q", d_in=4,
                    metadata={"hook_head_index": 2})  # fmt: skip
    _parity(model, rows, sae, get_eval_everything_config(n_eval_reconstruction_batches=2),
            exclude_special_tokens=EXCLUDED)  # fmt: skip


def test_activation_scaler_matches_sae_lens(model, rows):
    ours = ActivationScaler()
    ours.scaling_factor = 0.5
    cfg = get_eval_everything_config(n_eval_reconstruction_batches=2)
    sae = _make_sae("standard")
    (with_ours, _), _ = _parity(model, rows, sae, cfg, ours_scaler=ours,
                                sl_scaler=SLActivationScaler(scaling_factor=0.5))  # fmt: skip
    # a sae-lens scaler is accepted too, and scaling changes the numbers
    (with_sl, _), _ = _parity(model, rows, sae, cfg, ours_scaler=SLActivationScaler(0.5),
                              sl_scaler=SLActivationScaler(scaling_factor=0.5))  # fmt: skip
    _assert_same(with_ours, with_sl)
    (plain, _), _ = _parity(model, rows, sae, cfg)
    assert plain["sparsity"]["l0"] != with_ours["sparsity"]["l0"]


def test_hooks_on_the_sae_are_honoured_like_sae_lens(model, rows):
    """A hook on hook_sae_acts_post (here: zero half the latents) takes the dense path."""
    sae = _make_sae("topk")
    sl_sae = sae.to_sae_lens()

    def zero_half(acts, hook):
        acts = acts.clone()
        acts[..., : D_SAE // 2] = 0
        return acts

    sae.hook_sae_acts_post.add_hook(zero_half)
    sl_sae.hook_sae_acts_post.add_hook(zero_half)
    cfg = get_eval_everything_config(n_eval_reconstruction_batches=2)
    ours_store, sl_store = _stores(model, rows, sae, sl_sae)
    ours = run_evals(sae, ours_store, model, None, cfg)
    theirs = sae_lens.run_evals(sl_sae, sl_store, model, SLActivationScaler(), _sl_config(cfg))
    _assert_same(ours, theirs)
    assert ours[0]["sparsity"]["l0"] < 4


def test_topk_evals_never_build_the_dense_code(model, rows, monkeypatch):
    sae = _make_sae("topk")
    cfg = get_eval_everything_config(n_eval_reconstruction_batches=2)
    ours_store, sl_store = _stores(model, rows, sae, sae.to_sae_lens())
    expected = run_evals(sae, sl_store, model, None, cfg)  # a sae-lens store works too
    monkeypatch.setattr(sae, "encode", lambda x: pytest.fail("dense encode on the TopK path"))
    _assert_same(run_evals(sae, ours_store, model, None, cfg, verbose=True), expected)


def test_sae_lens_5_call_order_and_ignore_tokens(model, rows):
    sae = _make_sae("standard")
    cfg = get_eval_everything_config(n_eval_reconstruction_batches=2)
    ours_store, _ = _stores(model, rows, sae, sae.to_sae_lens())
    old_style = run_evals(sae, ours_store, model, cfg, ignore_tokens={0, 1, None})
    ours_store, _ = _stores(model, rows, sae, sae.to_sae_lens())
    _assert_same(old_style, run_evals(sae, ours_store, model, None, cfg, {}, EXCLUDED))


def test_run_evals_and_config_errors(model, rows):
    sae = _make_sae("standard")
    store, _ = _stores(model, rows, sae, sae.to_sae_lens())
    with pytest.raises(ValueError, match="n_eval_reconstruction_batches must be > 0"):
        run_evals(
            sae, store, model, None, EvalConfig(compute_kl=True, n_eval_reconstruction_batches=0)
        )
    with pytest.raises(ValueError, match="n_eval_sparsity_variance_batches must be > 0"):
        run_evals(sae, store, model, None,
                  EvalConfig(compute_l2_norms=True, n_eval_sparsity_variance_batches=0))  # fmt: skip
    with pytest.raises(ValueError, match="compute_kl must be a bool"):
        EvalConfig(compute_kl="yes")
    with pytest.raises(ValueError, match="batch_size_prompts"):
        EvalConfig(batch_size_prompts=-1)
    assert get_eval_everything_config().compute_featurewise_weight_based_metrics


# ----------------------------------------------------------------------------------------
# transcoders: read at hook_name, compared with and spliced in at hook_name_out
# ----------------------------------------------------------------------------------------
def _transcoder(arch, hook_in, hook_out, d_out, seed=0):
    sae = SAE.from_dict({
        "architecture": arch, "d_in": D_MODEL, "d_sae": D_SAE, "d_out": d_out,
        "apply_b_dec_to_input": False,
        "metadata": {"hook_name": hook_in, "hook_name_out": hook_out, "context_size": CTX,
                     "prepend_bos": False},
    })  # fmt: skip
    _randomize_(sae, seed)
    return sae


def test_identity_skip_transcoder_is_perfect(model, rows):
    # blocks.0.hook_resid_post and blocks.1.hook_resid_pre carry the same tensor
    tc = _transcoder("skip_transcoder", "blocks.0.hook_resid_post", RESID, D_MODEL)
    with torch.no_grad():
        tc.W_dec.zero_()
        tc.b_dec.zero_()
        tc.W_skip.copy_(torch.eye(D_MODEL))
    store = _store(model, rows, "blocks.0.hook_resid_post")
    m, feats = run_evals(tc, store, model, None, get_eval_everything_config(2, 2, 2))
    assert m["model_behavior_preservation"]["kl_div_with_sae"] == pytest.approx(0, abs=1e-6)
    perf = m["model_performance_preservation"]
    assert perf["ce_loss_with_sae"] == pytest.approx(perf["ce_loss_without_sae"], rel=1e-6)
    assert perf["ce_loss_score"] == pytest.approx(1, rel=1e-5)
    rq = m["reconstruction_quality"]
    assert rq["explained_variance"] == pytest.approx(1, rel=1e-6)
    assert rq["mse"] == pytest.approx(0, abs=1e-8) and rq["cossim"] == pytest.approx(1)
    assert len(feats["encoder_decoder_cosine_sim"]) == D_SAE  # d_out == d_in


def test_transcoder_metrics_match_a_hand_computation(model, rows):
    hook_in, hook_out = "blocks.0.ln2.hook_normalized", "blocks.0.mlp.hook_post"
    tc = _transcoder("transcoder", hook_in, hook_out, d_out=32)
    store = _store(model, rows, hook_in)
    cfg = get_eval_everything_config(n_eval_reconstruction_batches=1,
                                     n_eval_sparsity_variance_batches=1)  # fmt: skip
    m, feats = run_evals(tc, store, model, None, cfg, exclude_special_tokens=False)
    recons_tokens, var_tokens = torch.tensor(rows[:4]), torch.tensor(rows[4:8])

    with torch.no_grad():
        clean = model(recons_tokens, return_type="loss")
        cache = {}
        spliced = model.run_with_hooks(recons_tokens, return_type="loss", fwd_hooks=[
            (hook_in, lambda a, hook: cache.__setitem__("x", a)),
            (hook_out, lambda a, hook: tc(cache["x"])),
        ])  # fmt: skip
        _, acts = model.run_with_cache(var_tokens, names_filter=[hook_in, hook_out])
        x, y = acts[hook_in].reshape(-1, D_MODEL), acts[hook_out].reshape(-1, 32)
        y_hat = tc(x)
        feature_acts = tc.encode(x)
    perf = m["model_performance_preservation"]
    assert perf["ce_loss_without_sae"] == pytest.approx(float(clean), rel=1e-5)
    assert perf["ce_loss_with_sae"] == pytest.approx(float(spliced), rel=1e-5)
    rq = m["reconstruction_quality"]
    y64, yh64 = y.double(), y_hat.double()
    ev = 1 - (y64 - yh64).pow(2).sum() / (y64 - y64.mean(0)).pow(2).sum()
    assert rq["explained_variance"] == pytest.approx(float(ev), rel=1e-5)
    assert rq["mse"] == pytest.approx(float((y64 - yh64).pow(2).sum(-1).mean()), rel=1e-5)
    assert m["sparsity"]["l0"] == pytest.approx(float((feature_acts != 0).sum(-1).double().mean()))
    # W_enc columns and W_dec rows live in different spaces (d_in 16, d_out 32)
    assert "encoder_decoder_cosine_sim" not in feats
    assert feats["encoder_norm"] == pytest.approx(tc.W_enc.norm(dim=0).tolist())


def test_transcoder_without_output_hook_is_an_error(model, rows):
    tc = _transcoder("transcoder", RESID, None, D_MODEL)
    with pytest.raises(ValueError, match="hook_name_out"):
        run_evals(tc, _store(model, rows, RESID), model, None, EvalConfig(compute_kl=True))


# ----------------------------------------------------------------------------------------
# the trainer's summaries, against hand computations
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_reconstruction_metrics_by_hand(arch):
    sae = _make_sae(arch)
    if arch == "standard":
        with torch.no_grad():
            sae.b_enc[:10] = -100.0  # ten latents that can never fire
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, D_MODEL, generator=gen) * 2 + 0.5 for n in (20, 7, 13)]
    m = reconstruction_metrics(sae, batches)

    x = torch.cat(batches)
    with torch.no_grad():
        acts, x_hat = sae.encode(x), sae(x)
    x64, h64 = x.double(), x_hat.double()
    sq = (x64 - h64).pow(2)
    expected = {
        "metrics/l0": (acts != 0).sum(-1).double().mean(),
        "metrics/explained_variance": 1 - sq.sum() / (x64 - x64.mean(0)).pow(2).sum(),
        "metrics/mse": sq.mean(),
        "metrics/cossim": F.cosine_similarity(x64, h64, dim=-1).mean(),
        "metrics/l2_ratio": (h64.norm(dim=-1) / x64.norm(dim=-1)).mean(),
    }
    assert list(m) == [*expected, "sparsity/dead_features_in_eval"]
    for k, v in expected.items():
        assert m[k] == pytest.approx(float(v), rel=1e-5), k
    dead = int(((acts != 0).sum(0) == 0).sum())
    assert m["sparsity/dead_features_in_eval"] == dead and (arch != "standard" or dead >= 10)
    with pytest.raises(ValueError, match="no batches"):
        reconstruction_metrics(sae, [])


def _ce(logits, tokens):
    logp = logits[:, :-1].double().log_softmax(-1)
    return float(-logp.gather(-1, tokens[:, 1:, None]).mean())


def _kl(p_logits, q_logits):
    p, q = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("head", [None, 1])
def test_language_model_metrics_by_hand(model, rows, head):
    hook = RESID if head is None else "blocks.1.attn.hook_v"
    sae = _make_sae("jumprelu", hook_name=hook, d_in=D_MODEL if head is None else 4)
    tokens = torch.tensor(rows[:6])

    def splice(act, hook):
        if head is None:
            return sae(act)
        act = act.clone()
        act[:, :, head] = sae(act[:, :, head])
        return act

    def zero(act, hook):
        if head is None:
            return torch.zeros_like(act)
        act = act.clone()
        act[:, :, head] = 0
        return act

    with torch.no_grad():
        clean = model(tokens)
        spliced = model.run_with_hooks(tokens, fwd_hooks=[(hook, splice)])
        zeroed = model.run_with_hooks(tokens, fwd_hooks=[(hook, zero)])
    m = language_model_metrics(sae, model, tokens, hook, hook_head_index=head)
    ce_clean, ce_sae, ce_zero = _ce(clean, tokens), _ce(spliced, tokens), _ce(zeroed, tokens)
    kl_sae, kl_zero = _kl(clean, spliced), _kl(clean, zeroed)
    pre, beh = "model_performance_preservation/", "model_behavior_preservation/"
    expected = {
        f"{pre}ce_loss_without_sae": ce_clean,
        f"{pre}ce_loss_with_sae": ce_sae,
        f"{pre}ce_loss_with_ablation": ce_zero,
        f"{pre}ce_loss_score": (ce_zero - ce_sae) / (ce_zero - ce_clean),
        f"{beh}kl_div_with_sae": kl_sae,
        f"{beh}kl_div_with_ablation": kl_zero,
        f"{beh}kl_div_score": (kl_zero - kl_sae) / kl_zero,
    }
    assert list(m) == list(expected)
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert kl_sae > 0 and ce_sae != ce_clean  # the SAE is not a no-op


def test_language_model_metrics_equal_run_evals_on_the_same_tokens(model, rows):
    sae = _make_sae("gated")
    store, _ = _stores(model, rows, sae, sae.to_sae_lens(), batch=6)
    cfg = EvalConfig(compute_kl=True, compute_ce_loss=True, n_eval_reconstruction_batches=1)
    m, _ = run_evals(sae, store, model, None, cfg, exclude_special_tokens=False)
    lm = language_model_metrics(sae, model, torch.tensor(rows[:6]), RESID)
    for group, metrics in m.items():
        for k, v in metrics.items():
            if group != "token_stats":
                assert lm[f"{group}/{k}"] == pytest.approx(v, rel=1e-6), k


def test_weight_based_metrics_by_hand():
    sae = _make_sae("standard")
    m = get_featurewise_weight_based_metrics(sae)
    with torch.no_grad():
        cos = [
            float(F.cosine_similarity(sae.W_enc[:, i], sae.W_dec[i], dim=0)) for i in range(D_SAE)
        ]
    assert m["encoder_decoder_cosine_sim"] == pytest.approx(cos, rel=1e-5, abs=1e-7)
    assert m["encoder_norm"] == pytest.approx(sae.W_enc.norm(dim=0).tolist())
    assert m["encoder_bias"] == sae.b_enc.tolist()
