"""Resumes that would be silently inexact are errors naming the file, and damaged files
of a checkpoint or run folder are named: a missing or invalid ``activation_scaler.json``,
an edited ``cfg.json``, a truncated ``data_state.pt`` or ``pending_batch.safetensors``, a
corrupt ``metrics.jsonl`` line (a torn last line, what a kill leaves, is dropped with a
warning). A resumed run writes exactly the checkpoints the uninterrupted run writes after
that point; normalisation estimated from all-zero or NaN activations is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_nonfinite import BATCH, N_STEPS, Stream, _cfg, _checkpoints, _params, _sae

from fastsae.training import SAETrainer, TopKTrainingSAEConfig


def _trainer(cfg, data, run_dir: Path, seed: int = 0) -> SAETrainer:
    return SAETrainer(cfg, _sae(cfg, seed), data, run_dir=run_dir, show_progress=False)


def _normalised_cfg(tmp: Path, mode: str = "expected_average_only_in", **kwargs):
    cfg = _cfg(tmp, n_batches_for_norm_estimate=2, **kwargs)
    cfg.sae = TopKTrainingSAEConfig(d_in=16, d_sae=64, k=4, normalize_activations=mode)
    return cfg


def _run(tmp: Path, cfg=None) -> SAETrainer:
    cfg = cfg if cfg is not None else _cfg(tmp)
    trainer = _trainer(cfg, Stream(), tmp / "run")
    trainer.fit()
    return trainer


def _resume(tmp: Path, checkpoint: Path, cfg=None) -> SAETrainer:
    cfg = cfg if cfg is not None else _cfg(tmp)
    trainer = _trainer(cfg, Stream(), tmp / "run", seed=7)
    trainer.load_checkpoint(checkpoint)
    return trainer


# ---------------------------------------------------------------------------- checkpoints
def test_a_resumed_run_writes_exactly_the_checkpoints_of_the_uninterrupted_run(tmp_path):
    # 256 samples, 3 checkpoints: thresholds 64, 128, 192 -> written after 96, 160, 224
    kwargs = {"n_checkpoints": 3, "save_final_checkpoint": True}
    full = _run(tmp_path / "a", _cfg(tmp_path / "a", **kwargs))
    assert _checkpoints(tmp_path / "a") == ["160", "224", "96", "final_256"]
    for start, after in (("96", ["160", "224", "final_256"]), ("160", ["224", "final_256"])):
        tmp = tmp_path / f"from{start}"
        resumed = _resume(tmp, tmp_path / "a" / "ck" / start, _cfg(tmp, **kwargs))
        resumed.fit()
        assert _checkpoints(tmp) == after, start
        for name, value in _params(full).items():
            assert torch.equal(_params(resumed)[name], value), name


# ---------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("mode", ["expected_average_only_in", "covariance_whitening"])
def test_a_deleted_activation_scaler_json_is_an_error_naming_it(mode, tmp_path):
    _run(tmp_path / "a", _normalised_cfg(tmp_path / "a", mode))
    checkpoint = tmp_path / "a" / "ck" / "160"
    (checkpoint / "activation_scaler.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{checkpoint}/activation_scaler.json is missing"):
        _resume(tmp_path / "b", checkpoint, _normalised_cfg(tmp_path / "b", mode))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"scaling_factor": "x", "has_whitening": false}', "scaling_factor must be"),
        ('{"scaling_factor": null, "has_whitening": false}', "has no scaling_factor"),
    ],
)
def test_an_invalid_activation_scaler_json_is_named(text, message, tmp_path):
    _run(tmp_path / "a", _normalised_cfg(tmp_path / "a"))
    scaler_file = tmp_path / "a" / "ck" / "160" / "activation_scaler.json"
    scaler_file.write_text(text)
    with pytest.raises(ValueError, match=f"{scaler_file}.*{message}"):
        _resume(tmp_path / "b", scaler_file.parent, _normalised_cfg(tmp_path / "b"))


def test_a_normalised_run_resumes_exactly(tmp_path):
    """The check does not get in the way of a good checkpoint."""
    full = _run(tmp_path / "a", _normalised_cfg(tmp_path / "a"))
    cfg = _normalised_cfg(tmp_path / "b")
    resumed = _resume(tmp_path / "b", tmp_path / "a" / "ck" / "160", cfg)
    resumed.fit()
    for name, value in _params(full).items():
        assert torch.equal(_params(resumed)[name], value), name


@pytest.mark.parametrize(
    ("value", "message"), [(0.0, "are all zero"), (float("nan"), "hold non-finite values")]
)
def test_normalisation_from_zero_or_nan_activations_is_refused(value, message, tmp_path):
    data = iter([torch.full((BATCH, 16), value)] * 2)
    trainer = _trainer(_normalised_cfg(tmp_path), data, tmp_path / "run")
    with pytest.raises(ValueError, match=f"expected_average_only_in: .*{message}"):
        trainer.fit()


def test_whitening_from_nan_activations_is_refused(tmp_path):
    data = Stream(poison={0: ([3], float("nan"))})
    trainer = _trainer(_normalised_cfg(tmp_path, "covariance_whitening"), data, tmp_path / "run")
    with pytest.raises(ValueError, match="covariance_whitening: .*hold non-finite values"):
        trainer.fit()


# ---------------------------------------------------------------------------- cfg.json
@pytest.mark.parametrize(("key", "value"), [("k", 8), ("d_sae", 128), ("dtype", "bfloat16")])
def test_an_edited_checkpoint_cfg_json_is_an_error_naming_it(key, value, tmp_path):
    _run(tmp_path / "a")
    checkpoint = tmp_path / "a" / "ck" / "160"
    cfg_file = checkpoint / "cfg.json"
    data = json.loads(cfg_file.read_text())
    data[key] = value
    cfg_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"{cfg_file} does not match .*{key}={value!r}"):
        _resume(tmp_path / "b", checkpoint)


def test_a_checkpoint_resumed_with_another_sae_config_is_an_error(tmp_path):
    _run(tmp_path / "a")
    cfg = _cfg(tmp_path / "b")
    cfg.sae = TopKTrainingSAEConfig(d_in=16, d_sae=64, k=6)
    with pytest.raises(ValueError, match=r"cfg.json does not match .*k=4 \(this run: 6\)"):
        _resume(tmp_path / "b", tmp_path / "a" / "ck" / "160", cfg)


# ---------------------------------------------------------------------------- damaged files
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_data_state_is_named(tmp_path):
    _run(tmp_path / "a")
    data_file = tmp_path / "a" / "ck" / "160" / "data_state.pt"
    _truncate(data_file)
    with pytest.raises(ValueError, match=f"{data_file}: unreadable data position"):
        _resume(tmp_path / "b", data_file.parent)


def test_a_corrupt_pending_batch_is_named(tmp_path):
    _run(tmp_path / "a")
    pending = tmp_path / "a" / "ck" / "160" / "pending_batch.safetensors"
    pending.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match=f"{pending}"):
        _resume(tmp_path / "b", pending.parent)


def test_a_torn_last_metrics_line_is_dropped_and_the_run_resumes_exactly(tmp_path):
    full = _run(tmp_path / "a")
    reference = (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines(True)
    # what a kill -9 during step 7's write leaves: rows through step 6, half of step 7's
    run_b = tmp_path / "b" / "run"
    run_b.mkdir(parents=True)
    rows_to_6 = [line for line in reference if json.loads(line)["step"] <= 6]
    torn = reference[len(rows_to_6)][:25]
    (run_b / "metrics.jsonl").write_text("".join(rows_to_6) + torn)
    with pytest.warns(UserWarning, match="metrics.jsonl: dropping its last line"):
        resumed = _resume(tmp_path / "b", tmp_path / "a" / "ck" / "160")
    resumed.fit()
    assert (run_b / "metrics.jsonl").read_text().splitlines(True) == reference
    for name, value in _params(full).items():
        assert torch.equal(_params(resumed)[name], value), name


def test_a_torn_last_metrics_line_is_cut_before_new_rows_are_appended(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "x": 1}\n{"step": 2, "x"')
    trainer = _trainer(_cfg(tmp_path, n_checkpoints=0), Stream(), run_dir)
    with pytest.warns(UserWarning, match="dropping its last line"):
        trainer.fit()
    rows = trainer.metrics.rows()  # no warning, no error: every line is whole
    assert rows[0] == {"step": 1, "x": 1} and [r["step"] for r in rows[1:]] == list(
        range(1, N_STEPS + 1)
    )


def test_a_corrupt_metrics_line_in_the_middle_names_file_and_line(tmp_path):
    _run(tmp_path / "a")
    metrics = tmp_path / "a" / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines(True)
    lines[2] = '{"step": 3, "loss": \n'
    metrics.write_text("".join(lines))
    shutil.copytree(tmp_path / "a" / "run", tmp_path / "b" / "run")
    with pytest.raises(ValueError, match="metrics.jsonl, line 3: corrupt metrics row"):
        _resume(tmp_path / "b", tmp_path / "a" / "ck" / "160")


def test_a_data_state_that_does_not_fit_is_named(tmp_path):
    _run(tmp_path / "a")
    data_file = tmp_path / "a" / "ck" / "160" / "data_state.pt"
    torch.save({"count": 3}, data_file)  # no generator state
    with pytest.raises(ValueError, match=f"{data_file}: the data position does not fit"):
        _resume(tmp_path / "b", data_file.parent)


def test_a_damaged_activations_store_state_file_is_named(tmp_path):
    from tiny_runs import runner_config, tiny_model, token_rows_dataset

    from fastsae.training import ActivationsStore

    cfg = runner_config(tmp_path)
    store = ActivationsStore.from_config(tiny_model(), cfg, token_rows_dataset(40))
    store.show_progress = False
    state_file = tmp_path / "store.safetensors"
    store.save(state_file)
    wider = runner_config(tmp_path, sae=TopKTrainingSAEConfig(d_in=32, d_sae=64, k=4))
    with pytest.raises(ValueError, match=f"{state_file}: state has d_in=16"):
        ActivationsStore.from_config(tiny_model(d_model=32), wider, token_rows_dataset(40)).load(
            state_file
        )
    _truncate(state_file)
    with pytest.raises(ValueError, match=f"{state_file}: unreadable activations store state"):
        store.load(state_file)


def test_a_resume_under_another_run_config_warns_naming_the_fields(tmp_path):
    _run(tmp_path / "a")
    cfg = _cfg(tmp_path / "b", lr=1e-3)
    with pytest.warns(UserWarning, match=r"runner_cfg.json: .* lr=0.003 \(this run: 0.001\)"):
        _resume(tmp_path / "b", tmp_path / "a" / "ck" / "160", cfg)
