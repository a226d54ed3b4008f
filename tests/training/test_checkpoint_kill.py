"""Rewriting a checkpoint never destroys it: a ``kill -9`` of the training process while
it swaps a checkpoint folder in (held there by the pause hook of
fastsae.loading.atomic_dir), or a rename that fails, leaves exactly the old checkpoint
or exactly the new one, and a run resumed from it continues exactly as an uninterrupted
run with that checkpoint would."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import tiny_runs
import torch
from kill_points import kill_9, start_paused

from fastsae import SAE
from fastsae.loading import atomic_dir
from fastsae.saes import TopKTrainingSAE
from fastsae.training import SAETrainingRunner
from fastsae.training.checkpoints import TRAINER_STATE_FILENAME

TESTS_DIR = Path(__file__).resolve().parents[1]
OLD_LR, NEW_LR = 1e-3, 3e-3  # the two runs write different checkpoints of the same name
RUN_SCRIPT = f"""
import sys
sys.path[:0] = [{str(TESTS_DIR)!r}, {str(TESTS_DIR / "training")!r}]
from test_checkpoint_kill import run
run(sys.argv[1], float(sys.argv[2]), n_checkpoints=int(sys.argv[3]))
"""


def run(
    run_dir: str | Path, lr: float, resume: str | Path | None = None, n_checkpoints: int = 1
) -> SAETrainingRunner:
    """A 12-step run of the tiny model with one checkpoint (halfway) in run_dir/ck/run
    (or none), the final SAE in run_dir/out."""
    cfg = tiny_runs.runner_config(
        run_dir,
        training_tokens=64 * 12,
        lr=lr,
        n_checkpoints=n_checkpoints,
        wandb_log_frequency=4,
        eval_every_n_wandb_logs=10**6,
        resume_from_checkpoint=str(resume) if resume is not None else None,
    )
    runner = SAETrainingRunner(
        cfg,
        override_model=tiny_runs.tiny_model(),
        override_dataset=tiny_runs.token_rows_dataset(200),
        show_progress=False,
    )
    runner.run()
    return runner


def the_checkpoint(run_dir: Path) -> Path:
    """The run's one checkpoint folder (hidden leftovers aside)."""
    found = [p for p in (run_dir / "ck" / "run").iterdir() if not p.name.startswith(".")]
    assert len(found) == 1, found
    return found[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def hidden(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


def final_weights(run_dir: Path) -> bytes:
    return (run_dir / "out" / "sae_weights.safetensors").read_bytes()


def kill_9_at(point: str, run_dir: Path, lr: float, n_checkpoints: int, marker: Path) -> None:
    """Run ``run(run_dir, lr)`` in a child process, held by the pause hook at ``point`` of
    its first folder swap, and ``kill -9`` it there."""
    kill_9(start_paused(RUN_SCRIPT, [str(run_dir), str(lr), str(n_checkpoints)], point, marker))


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """Uninterrupted runs with the old and the new learning rate."""
    root = tmp_path_factory.mktemp("reference")
    run(root / "old", OLD_LR)
    run(root / "new", NEW_LR)
    return root / "old", root / "new"


@pytest.mark.parametrize("point,outcome", [("after-mark", "old"), ("between-renames", "new")])
def test_kill_9_while_a_checkpoint_is_rewritten(
    point, outcome, reference_runs, tmp_path, monkeypatch
):
    old_ref, new_ref = reference_runs
    run_dir = tmp_path / "run"
    run(run_dir, OLD_LR)  # writes the old checkpoint
    checkpoint = the_checkpoint(run_dir)
    old_files = snapshot(checkpoint)

    # the same run again, with another learning rate: it rewrites that checkpoint and is
    # killed in the middle of the swap
    kill_9_at(point, run_dir, NEW_LR, n_checkpoints=1, marker=tmp_path / "paused")
    if point == "between-renames":
        assert not checkpoint.exists()  # the one window without the folder

    # resuming (in a process started after the kill) applies the recovery rule, cleans
    # the leftovers, and continues exactly
    monkeypatch.setattr(atomic_dir, "PROCESS_START_NS", time.time_ns())
    resumed_dir = tmp_path / "resumed"
    run(resumed_dir, OLD_LR if outcome == "old" else NEW_LR, resume=checkpoint)
    assert (checkpoint / TRAINER_STATE_FILENAME).is_file()
    assert hidden(checkpoint.parent) == []
    if outcome == "old":
        assert snapshot(checkpoint) == old_files
        assert final_weights(resumed_dir) == final_weights(old_ref)
    else:
        new_files = snapshot(the_checkpoint(new_ref))
        assert sorted(snapshot(checkpoint)) == sorted(new_files)
        for name in ("sae_weights.safetensors", "sparsity.safetensors"):
            assert snapshot(checkpoint)[name] == new_files[name], name
        assert final_weights(resumed_dir) == final_weights(new_ref)
    assert final_weights(old_ref) != final_weights(new_ref)


def _failing_rename(final: Path, times: int | None):
    real = os.rename
    failures = []

    def fake(src, dst, *args, **kwargs):
        if Path(dst).name == final.name and (times is None or len(failures) < times):
            failures.append(dst)
            raise OSError(5, "Input/output error", str(dst))
        return real(src, dst, *args, **kwargs)

    return fake, failures


@pytest.fixture
def finished_run(tmp_path):
    """A finished run whose checkpoint is then rewritten with the end-of-run state."""
    runner = run(tmp_path / "run", OLD_LR)
    checkpoint = the_checkpoint(tmp_path / "run")
    return runner, checkpoint


def test_a_failed_rename_keeps_the_old_checkpoint(finished_run, monkeypatch):
    runner, checkpoint = finished_run
    before = snapshot(checkpoint)
    fake, failures = _failing_rename(checkpoint, times=1)
    monkeypatch.setattr(os, "rename", fake)
    with pytest.raises(OSError, match="Input/output error"):
        runner.trainer.save_checkpoint(checkpoint.name)
    monkeypatch.undo()
    assert failures
    assert snapshot(checkpoint) == before
    assert hidden(checkpoint.parent) == []


def test_a_failed_rename_whose_rollback_fails_leaves_the_new_checkpoint(finished_run, monkeypatch):
    runner, checkpoint = finished_run
    fake, _ = _failing_rename(checkpoint, times=None)
    monkeypatch.setattr(os, "rename", fake)
    with pytest.raises(OSError, match="Input/output error"):
        runner.trainer.save_checkpoint(checkpoint.name)
    monkeypatch.undo()
    assert not checkpoint.exists()
    # the loader recovers the complete new folder: the end-of-run state
    sae = TopKTrainingSAE.load_from_disk(checkpoint)
    for name, tensor in runner.trainer.sae.state_dict().items():
        assert torch.equal(sae.state_dict()[name], tensor), name
    state = torch.load(checkpoint / TRAINER_STATE_FILENAME, weights_only=False)
    assert state["state"]["n_training_steps"] == runner.trainer.state.n_training_steps == 12
    assert hidden(checkpoint.parent) == []


def test_kill_9_in_the_final_save_keeps_the_sae_and_its_runner_config_together(tmp_path):
    """The runner config is written inside the final SAE folder's swap: after a kill
    between the renames the recovered folder holds the new SAE with the new config,
    not the new SAE beside the previous run's config."""
    run_dir = tmp_path / "run"
    run(run_dir, OLD_LR, n_checkpoints=0)
    out = run_dir / "out"
    (out / "NOTES.md").write_text("mine")
    kill_9_at("between-renames", run_dir, NEW_LR, n_checkpoints=0, marker=tmp_path / "p")
    assert not out.exists()
    sae = SAE.load_from_disk(out)  # recovers the new folder
    assert json.loads((out / "runner_cfg.json").read_text())["lr"] == NEW_LR
    assert (out / "NOTES.md").read_text() == "mine"  # a user's file is carried over
    reference = tmp_path / "reference"
    run(reference, NEW_LR, n_checkpoints=0)
    assert final_weights(run_dir) == final_weights(reference)
    assert sae.cfg.d_sae == 64
