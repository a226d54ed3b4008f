"""Whole-folder saves (fastsae.loading.atomic_dir): a ``kill -9`` of a writing process at
each step of the swap, and a failed rename, leave exactly the old SAE or exactly the new
one (never new weights beside an old ``cfg.json``); loading applies the recovery rule;
leftovers of killed writes are cleaned without touching a live process's folders; files
a user put beside an SAE survive a save, fastsae's own stale files do not."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from kill_points import kill_9, start_paused

import fastsae
from fastsae.loading import atomic_dir, disk
from fastsae.loading.atomic_dir import (
    FOREIGN_STALE_AFTER_S,
    clean_stale,
    recover_dir,
    replace_dir,
    temp_dir_for,
)

D_IN, D_SAE = 8, 32
# who wins a kill at each step: the old folder until the old one is moved away
KILL_OUTCOMES = {
    "before-mark": "old",
    "after-mark": "old",
    "between-renames": "new",
    "before-delete-old": "new",
}
SAVE_SCRIPT = "import sys, fastsae; fastsae.SAE.load_from_disk(sys.argv[1]).save_model(sys.argv[2])"


def topk_sae(k: int, seed: int, d_sae: int = D_SAE) -> fastsae.SAE:
    sae = fastsae.SAE.from_dict({"architecture": "topk", "d_in": D_IN, "d_sae": d_sae, "k": k})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return sae


def assert_same_sae(loaded: fastsae.SAE, expected: fastsae.SAE) -> None:
    assert loaded.cfg.to_dict() == expected.cfg.to_dict()
    got = loaded.state_dict()
    assert set(got) == set(expected.state_dict())
    for name, tensor in expected.state_dict().items():
        assert torch.equal(got[name], tensor), name


def hidden_entries(parent: Path) -> list[str]:
    return sorted(n for n in os.listdir(parent) if n.startswith("."))


@pytest.fixture
def old_and_new(tmp_path):
    """An SAE folder holding the old SAE (k=64, with sparsity) and a reference folder
    holding the new one (k=16, another d_sae, no sparsity)."""
    old = topk_sae(k=64, seed=1, d_sae=128)
    target = tmp_path / "parent" / "sae"
    old.save_model(target, sparsity=torch.arange(128.0))
    new = topk_sae(k=16, seed=2)
    new.save_model(tmp_path / "ref")
    return target, old, new


# --------------------------------------------------------------------------- kill -9
@pytest.mark.parametrize("point", list(KILL_OUTCOMES))
def test_kill_9_at_each_step_leaves_exactly_the_old_or_the_new_sae(point, old_and_new, tmp_path):
    target, old, new = old_and_new
    marker = tmp_path / "paused"
    proc = start_paused(SAVE_SCRIPT, [str(tmp_path / "ref"), str(target)], point, marker)
    kill_9(proc)
    if point == "between-renames":  # the one window without the folder
        assert not target.exists()
    loaded = fastsae.SAE.load_from_disk(target, validate=True)
    if KILL_OUTCOMES[point] == "old":
        assert_same_sae(loaded, old)
        assert torch.equal(
            disk.read_log_sparsity(target / "sparsity.safetensors"),
            torch.arange(128.0),
        )
    else:
        assert_same_sae(loaded, new)
        assert loaded.cfg.k == 16
        assert not (target / "sparsity.safetensors").exists()  # no stale sparsity beside it
    assert sorted(os.listdir(target)) in (
        ["cfg.json", "sae_weights.safetensors"],
        ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"],
    )


def test_kill_9_between_renames_of_a_first_save_recovers_the_new_sae(tmp_path):
    new = topk_sae(k=16, seed=2)
    new.save_model(tmp_path / "ref")
    target = tmp_path / "parent" / "sae"
    marker = tmp_path / "paused"
    proc = start_paused(
        SAVE_SCRIPT, [str(tmp_path / "ref"), str(target)], "between-renames", marker
    )
    kill_9(proc)
    assert not target.exists()
    assert_same_sae(fastsae.SAE.load_from_disk(target), new)
    assert hidden_entries(target.parent) == []


def test_every_loader_recovers_an_interrupted_swap(old_and_new, tmp_path):
    """from_pretrained on a local repo-like folder applies the recovery rule too."""
    target, _, new = old_and_new
    proc = start_paused(
        SAVE_SCRIPT, [str(tmp_path / "ref"), str(target)], "between-renames", tmp_path / "p"
    )
    kill_9(proc)
    sae, _, sparsity = fastsae.SAE.from_pretrained_with_cfg_and_sparsity(str(target.parent), "sae")
    assert_same_sae(sae, new)
    assert sparsity is None


def test_a_reader_that_cannot_rename_reads_the_new_folder_where_it_lies(
    old_and_new, tmp_path, monkeypatch
):
    target, _, new = old_and_new
    proc = start_paused(
        SAVE_SCRIPT, [str(tmp_path / "ref"), str(target)], "between-renames", tmp_path / "p"
    )
    kill_9(proc)

    def read_only(src, dst):
        raise PermissionError(30, "Read-only file system", str(src))

    monkeypatch.setattr(os, "rename", read_only)
    where = recover_dir(target)
    assert where != target and where.name.startswith(".sae.new-")
    assert_same_sae(fastsae.SAE.load_from_disk(target), new)
    assert not target.exists()


def test_a_writer_whose_swap_a_reader_finished_succeeds(old_and_new, tmp_path):
    """The writer paused between its renames; a reader finishes the swap; the writer
    then goes on, finds its work done, and exits cleanly."""
    target, _, new = old_and_new
    marker = tmp_path / "paused"
    proc = start_paused(
        SAVE_SCRIPT, [str(tmp_path / "ref"), str(target)], "between-renames", marker
    )
    assert_same_sae(fastsae.SAE.load_from_disk(target), new)  # the reader finishes it
    marker.unlink()  # let the writer go on
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert_same_sae(fastsae.SAE.load_from_disk(target), new)
    assert hidden_entries(target.parent) == []


# --------------------------------------------------------------------------- failed renames
def failing_renames(target: Path, times: int | None):
    """An ``os.rename``/``os.replace`` that fails (``times`` times, None: always) when it
    would create ``target`` or a ``cfg.json`` (the renames that finish a save)."""
    real_rename, real_replace = os.rename, os.replace
    failures = []

    def wrap(real):
        def fake(src, dst, *args, **kwargs):
            name = Path(dst).name
            if name in (target.name, "cfg.json") and (times is None or len(failures) < times):
                failures.append(dst)
                raise OSError(5, "Input/output error", str(dst))
            return real(src, dst, *args, **kwargs)

        return fake

    return wrap(real_rename), wrap(real_replace), failures


def test_a_failed_rename_leaves_exactly_the_old_sae(old_and_new, monkeypatch):
    target, old, new = old_and_new
    before = {n: (target / n).read_bytes() for n in os.listdir(target)}
    rename, replace, failures = failing_renames(target, times=1)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        new.save_model(target)
    assert failures
    monkeypatch.undo()
    assert {n: (target / n).read_bytes() for n in os.listdir(target)} == before
    assert_same_sae(fastsae.SAE.load_from_disk(target, validate=True), old)
    assert hidden_entries(target.parent) == []


def test_a_failed_rename_whose_rollback_fails_too_leaves_the_new_sae(old_and_new, monkeypatch):
    target, _, new = old_and_new
    rename, replace, _ = failing_renames(target, times=None)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        new.save_model(target)
    monkeypatch.undo()
    assert not target.exists()  # both folders are complete; the rule picks the new one
    assert_same_sae(fastsae.SAE.load_from_disk(target, validate=True), new)
    assert hidden_entries(target.parent) == []


def test_a_failed_write_removes_its_temporary_folder(old_and_new, monkeypatch):
    target, old, new = old_and_new

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(disk, "save_file", broken)
    with pytest.raises(OSError, match="No space left"):
        new.save_model(target)
    assert hidden_entries(target.parent) == []
    assert_same_sae(fastsae.SAE.load_from_disk(target), old)


# --------------------------------------------------------------------------- what is kept
def test_a_save_drops_stale_sparsity_and_keeps_the_users_files(tmp_path):
    target = tmp_path / "sae"
    topk_sae(k=4, seed=1, d_sae=16).save_model(target, sparsity=torch.zeros(16))
    (target / "README.md").write_text("my notes")
    (target / "plots").mkdir()
    (target / "plots" / "curve.png").write_bytes(b"png")
    (target / ".cfg.json.abc123.tmp").write_text("left by an old fastsae")
    new = topk_sae(k=4, seed=2, d_sae=32)
    new.save_model(target)
    assert sorted(os.listdir(target)) == [
        "README.md", "cfg.json", "plots", "sae_weights.safetensors",
    ]  # fmt: skip
    assert (target / "README.md").read_text() == "my notes"
    assert (target / "plots" / "curve.png").read_bytes() == b"png"
    sae, _, sparsity = fastsae.SAE.from_pretrained_with_cfg_and_sparsity(str(tmp_path), "sae")
    assert sparsity is None
    assert_same_sae(sae, new)


def test_a_symlinked_folder_is_replaced_behind_its_link(tmp_path):
    real = tmp_path / "real"
    topk_sae(k=4, seed=1).save_model(real)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    new = topk_sae(k=4, seed=2)
    new.save_model(link)
    assert link.is_symlink()
    assert_same_sae(fastsae.SAE.load_from_disk(real), new)


def test_refuses_to_replace_the_working_directory_or_a_file(tmp_path, monkeypatch):
    sae = topk_sae(k=4, seed=1)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(ValueError, match="current working directory"):
        sae.save_model(".")
    with pytest.raises(ValueError, match="current working directory"):
        sae.save_model(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        sae.save_model(tmp_path / "file")


def test_replace_dir_writes_into_a_temporary_folder_in_place(tmp_path):
    """A checkpoint's temporary folder is private: its SAE is written straight into it."""
    tmp = temp_dir_for(tmp_path / "ck")
    tmp.mkdir()
    (tmp / "other_rank.pt").write_text("x")
    replace_dir(tmp, lambda folder: (folder / "a").write_text("a"))
    assert sorted(os.listdir(tmp)) == ["a", "other_rank.pt"]
    assert sorted(os.listdir(tmp_path)) == [tmp.name]


# --------------------------------------------------------------------------- leftovers
def _sibling_name(final: Path, kind: str, created_ns: int, pid: int, host: str | None = None):
    own_host = temp_dir_for(final).name.split("-")[2]
    return f".{final.name}.{kind}-{created_ns:x}-{host or own_host}-{pid}-0123abcd"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_a_killed_write_are_cleaned_by_the_next_process(old_and_new, tmp_path):
    """Each killed writer leaves one kind of leftover; the next writer (a later process)
    into the same parent folder removes it."""
    target, _, new = old_and_new
    for point, left in (
        ("before-mark", "tmp"),
        ("after-mark", "new"),
        ("before-delete-old", "old"),
    ):
        marker = tmp_path / f"paused-{point}"
        proc = start_paused(SAVE_SCRIPT, [str(tmp_path / "ref"), str(target)], point, marker)
        kill_9(proc)
        kinds = [name.split(".")[2].split("-")[0] for name in hidden_entries(target.parent)]
        assert kinds == [left]
    # a later process saving anything into that parent folder cleans them
    other = tmp_path / "parent" / "other"
    subprocess.run([sys.executable, "-c", SAVE_SCRIPT, str(tmp_path / "ref"), str(other)],
                   check=True)  # fmt: skip
    assert hidden_entries(target.parent) == []
    assert_same_sae(fastsae.SAE.load_from_disk(target), new)


def test_cleaning_spares_live_writers_young_foreign_folders_and_recovery_candidates(
    tmp_path, monkeypatch
):
    parent = tmp_path / "parent"
    parent.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        before = time.time_ns() - 10**9
        monkeypatch.setattr(atomic_dir, "PROCESS_START_NS", time.time_ns())
        final = parent / "ck"
        final.mkdir()
        dead = _dead_pid()
        names = {
            "dead": _sibling_name(final, "tmp", before, dead),
            "dead_old": _sibling_name(final, "old", before, dead),
            "live": _sibling_name(final, "tmp", before, live.pid),
            "young": _sibling_name(final, "tmp", time.time_ns() + 10**12, dead),
            "foreign_young": _sibling_name(final, "tmp", before, 1, host="ffffffff"),
            "foreign_old": _sibling_name(
                final, "tmp", before - int(FOREIGN_STALE_AFTER_S * 2e9), 1, host="ffffffff"
            ),
            "legacy_old": ".ck.tmp-0123abcd",
            "legacy_cache_old": ".ck.tmp-0123456789ab",
            "user": ".hidden_user_folder",
        }
        for name in names.values():
            (parent / name).mkdir()
        old_time = time.time() - FOREIGN_STALE_AFTER_S * 2
        os.utime(parent / names["legacy_old"], (old_time, old_time))
        os.utime(parent / names["legacy_cache_old"], (old_time, old_time))
        # a complete new folder of a dead writer whose final folder is missing
        orphan = parent / "lost"
        candidate = parent / _sibling_name(orphan, "new", before, dead)
        candidate.mkdir()
        (candidate / "x").write_text("complete")

        removed = {p.name for p in clean_stale(parent)}

        assert removed == {
            names["dead"], names["dead_old"], names["foreign_old"], names["legacy_old"],
            names["legacy_cache_old"],
        }  # fmt: skip
        assert (orphan / "x").read_text() == "complete"  # recovered, not deleted
        assert not candidate.exists()
    finally:
        live.kill()
        live.wait()
