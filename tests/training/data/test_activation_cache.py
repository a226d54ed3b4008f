"""Activation cache: written shards equal fresh activations, CachedActivationsStore order,
shuffling, exact resume, atomic writes and errors that name the bad file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from datasets import Dataset
from kill_points import kill_9, start_paused
from safetensors.torch import load_file, save_file
from tiny_runs import tiny_config

from fastsae.training.data.activation_cache import (
    cache_activations,
    cache_activations_from_config,
    check_cache_target,
)
from fastsae.training.data.activations_store import ActivationsStore
from fastsae.training.data.cached_activations_store import CachedActivationsStore, read_cache_info

CTX = 8
N_TOKENS = 150  # not a multiple of the shard size, nor of the forward size


@pytest.fixture(scope="module")
def tl_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from transformer_lens import HookedTransformer

        return HookedTransformer(tiny_config(n_ctx=32, d_vocab=100))


@pytest.fixture(scope="module")
def rows():
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(3, 100, (40, CTX), generator=gen)
    tokens[:, 0] = 1  # a "BOS" that is excluded below, so shards see filtered activations
    return Dataset.from_dict({"tokens": tokens.tolist()})


def make_store(model, rows):
    return ActivationsStore(
        model, rows, hook_name="blocks.0.hook_resid_post", d_in=16, context_size=CTX,
        train_batch_size_tokens=16, store_batch_size_prompts=3, n_batches_in_buffer=2,
        exclude_special_tokens=[1],
    )  # fmt: skip


@pytest.fixture(scope="module")
def fresh_acts(tl_model, rows):
    """The first N_TOKENS filtered activations, in dataset order: ``[N_TOKENS, 16]``."""
    store = make_store(tl_model, rows)
    return torch.cat([store.get_filtered_llm_batch() for _ in range(8)])[:N_TOKENS]


@pytest.fixture(scope="module")
def cache_dir(tl_model, rows, tmp_path_factory):
    path = tmp_path_factory.mktemp("caches") / "acts"
    meta = {"model_name": "tiny"}
    out = cache_activations(
        make_store(tl_model, rows), path, N_TOKENS, shard_size_tokens=40, metadata=meta
    )
    assert out == path
    return path


def test_cache_equals_fresh_activations(cache_dir, fresh_acts):
    info = json.loads((cache_dir / "cache_info.json").read_text())
    assert (info["d_in"], info["n_tokens"], info["dtype"]) == (16, N_TOKENS, "float32")
    assert info["hook_name"] == "blocks.0.hook_resid_post" and info["context_size"] == CTX
    assert info["metadata"] == {"model_name": "tiny"} and info["fastsae_version"]
    assert [s["n_rows"] for s in info["shards"]] == [40, 40, 40, 30]
    names = [s["file"] for s in info["shards"]]
    assert names == [f"shard_{i:05d}.safetensors" for i in range(4)]
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted(names + ["cache_info.json"])
    assert not list(cache_dir.parent.glob(".acts.tmp-*"))  # the temporary dir was renamed
    on_disk = torch.cat([load_file(cache_dir / n)["activations"] for n in names])
    torch.testing.assert_close(on_disk, fresh_acts, rtol=0, atol=0)


def test_unshuffled_store_yields_in_order_across_epochs(cache_dir, fresh_acts):
    store = CachedActivationsStore(cache_dir, train_batch_size_tokens=32, shuffle=False)
    assert store.d_in == 16 and store.n_tokens == N_TOKENS
    got = torch.cat([next(store) for _ in range(10)])
    expected = torch.cat([fresh_acts, fresh_acts, fresh_acts])[:320]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert store.epoch == 2


def test_shuffled_store_keeps_rows_and_changes_order(cache_dir, fresh_acts):
    store = CachedActivationsStore(cache_dir, train_batch_size_tokens=30, n_shards_in_buffer=2)
    epoch0 = torch.cat([store.next_batch() for _ in range(5)])  # exactly one epoch
    epoch1 = torch.cat([store.next_batch() for _ in range(5)])
    for epoch in (epoch0, epoch1):
        assert not torch.equal(epoch, fresh_acts)
        for a, b in zip(
            torch.unique(epoch, dim=0, return_counts=True),
            torch.unique(fresh_acts, dim=0, return_counts=True),
            strict=True,
        ):
            assert torch.equal(a, b)
    assert not torch.equal(epoch0, epoch1)
    again = CachedActivationsStore(cache_dir, train_batch_size_tokens=30, n_shards_in_buffer=2)
    assert torch.equal(again.next_batch(), epoch0[:30])
    other = CachedActivationsStore(
        cache_dir, train_batch_size_tokens=30, n_shards_in_buffer=2, seed=1
    )
    assert not torch.equal(other.next_batch(), epoch0[:30])


def test_cached_state_dict_resumes_exactly(cache_dir):
    def build(**kw):
        return CachedActivationsStore(
            cache_dir, train_batch_size_tokens=28, n_shards_in_buffer=2, dtype="float64", **kw
        )

    store = build()
    for _ in range(3):
        store.next_batch()
    state = store.state_dict()
    expected = [store.next_batch() for _ in range(12)]  # crosses groups and epochs
    fresh = build()
    fresh.load_state_dict(state)
    got = [fresh.next_batch() for _ in range(12)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert got[0].dtype == torch.float64 and fresh.epoch == store.epoch > 0
    with pytest.raises(ValueError, match="seed"):
        build(seed=3).load_state_dict(state)


def test_cache_errors_name_the_file(cache_dir, tmp_path):
    import shutil

    with pytest.raises(FileNotFoundError, match="does not exist"):
        CachedActivationsStore(tmp_path / "nope", train_batch_size_tokens=8)
    broken = tmp_path / "broken"
    shutil.copytree(cache_dir, broken)
    info = broken / "cache_info.json"
    text = info.read_text()

    info.write_text("{not json")
    with pytest.raises(ValueError, match="cache_info.json is corrupt"):
        CachedActivationsStore(broken, train_batch_size_tokens=8)
    info.unlink()
    with pytest.raises(FileNotFoundError, match="cache_info.json is missing"):
        CachedActivationsStore(broken, train_batch_size_tokens=8)
    info.write_text(text)

    shard = broken / "shard_00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-20])
    with pytest.raises(ValueError, match="shard_00002.safetensors is truncated"):
        CachedActivationsStore(broken, train_batch_size_tokens=8)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="shard_00002.safetensors is missing"):
        CachedActivationsStore(broken, train_batch_size_tokens=8)
    save_file({"activations": torch.zeros(40, 12)}, str(shard))
    with pytest.raises(
        ValueError, match=r"shard_00002.safetensors holds shape \[40, 12\].*d_in=16"
    ):
        CachedActivationsStore(broken, train_batch_size_tokens=8)


def test_non_empty_target_and_overwrite(tl_model, rows, cache_dir, tmp_path, fresh_acts):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        cache_activations(make_store(tl_model, rows), target, 20)
    assert (target / "keep.txt").exists()
    cache_activations(make_store(tl_model, rows), target, 20, overwrite=True, dtype="bfloat16")
    assert not (target / "keep.txt").exists()
    store = CachedActivationsStore(target, train_batch_size_tokens=20, shuffle=False)
    assert store.info["dtype"] == "bfloat16" and store.dtype == torch.bfloat16
    torch.testing.assert_close(store.next_batch(), fresh_acts[:20].bfloat16())


def test_failed_cache_leaves_nothing(tl_model, rows, tmp_path):
    store = make_store(tl_model, rows)
    calls = []

    def failing(*args, _real=store.get_filtered_llm_batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("model fell over")
        return _real(*args)

    store.get_filtered_llm_batch = failing
    with pytest.raises(RuntimeError, match="fell over"):
        cache_activations(store, tmp_path / "half", 100, shard_size_tokens=10)
    assert list(tmp_path.iterdir()) == []


def test_cache_activations_from_config(tl_model, rows, tmp_path, fresh_acts):
    cfg = SimpleNamespace(
        hook_name="blocks.0.hook_resid_post", d_in=16, context_size=CTX,
        store_batch_size_prompts=3, train_batch_size_tokens=16, n_batches_in_buffer=2,
        exclude_special_tokens=[1], training_tokens=50, model_name="tiny",
        cached_activations_path=str(tmp_path / "from_cfg"), dataset_path="",
    )  # fmt: skip
    with pytest.raises(ValueError, match="model_loader"):
        cache_activations_from_config(cfg, dataset=rows)
    loaded = []
    path = cache_activations_from_config(
        cfg, dataset=rows, model_loader=lambda c: loaded.append(c) or tl_model
    )
    assert loaded == [cfg]
    assert str(path) == cfg.cached_activations_path
    store = CachedActivationsStore.from_config(cfg)  # shuffled, batches of 16
    assert store.info["metadata"] == {"model_name": "tiny"} and store.n_tokens == 50
    assert store.next_batch().shape == (16, 16)
    ordered = CachedActivationsStore(path, train_batch_size_tokens=50, shuffle=False)
    torch.testing.assert_close(ordered.next_batch(), fresh_acts[:50], rtol=0, atol=0)


# ------------------------------------------------- overwriting a cache: nothing lost on a kill
# writes ``n`` rows of 4 counting up from ``first`` (row i is first + 4 i .. first + 4 i + 3)
# to the cache folder argv[1], replacing what is there; the store is a stand-in for an
# ActivationsStore, so the child needs no model
CACHE_SCRIPT = """
import sys, torch
from types import SimpleNamespace
from fastsae.training.data.activation_cache import cache_activations
path, first, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = iter(torch.arange(first, first + 4 * n, dtype=torch.float32).reshape(n, 4).split(7))
store = SimpleNamespace(
    dtype=torch.float32, d_in=4, get_filtered_llm_batch=lambda: next(rows), hook_name="h",
    hook_head_index=None, context_size=8, seqpos_slice=(None,), prepend_bos=True,
)
cache_activations(store, path, n, shard_size_tokens=10, overwrite=True)
"""
OLD, NEW = (0, 30), (1000, 45)  # (first, n) of the cache there and of the one replacing it


def counting_rows(first: int, n: int) -> torch.Tensor:
    return torch.arange(first, first + 4 * n, dtype=torch.float32).reshape(n, 4)


def write_counting_cache(path, first: int, n: int, env: dict | None = None) -> None:
    subprocess.run(
        [sys.executable, "-c", CACHE_SCRIPT, str(path), str(first), str(n)],
        check=True, env=env, capture_output=True,
    )  # fmt: skip


def assert_cache_holds(path, first: int, n: int) -> None:
    """The cache at ``path`` is exactly the counting cache (first, n), as both readers see it."""
    assert read_cache_info(path)["n_tokens"] == n
    store = CachedActivationsStore(path, train_batch_size_tokens=n, shuffle=False)
    torch.testing.assert_close(store.next_batch(), counting_rows(first, n), rtol=0, atol=0)


def hidden(parent) -> list[str]:
    return sorted(n for n in os.listdir(parent) if n.startswith("."))


@pytest.fixture
def old_cache(tmp_path):
    target = tmp_path / "parent" / "acts"
    write_counting_cache(target, *OLD)
    assert_cache_holds(target, *OLD)
    return target


@pytest.mark.parametrize(
    ("point", "winner"),
    [("before-mark", OLD), ("after-mark", OLD), ("between-renames", NEW),
     ("before-delete-old", NEW)],
)  # fmt: skip
def test_kill_9_while_overwriting_a_cache_leaves_exactly_the_old_or_the_new(
    point, winner, old_cache, tmp_path
):
    """``cache_activations(overwrite=True)`` used to ``rmtree`` the old cache before
    renaming the new one in: a kill between the two left no cache at all."""
    marker = tmp_path / "paused"
    proc = start_paused(CACHE_SCRIPT, [str(old_cache), *map(str, NEW)], point, marker, 300)
    kill_9(proc)
    if point == "between-renames":  # the one window without the folder: readers recover it
        assert not old_cache.exists()
    assert_cache_holds(old_cache, *winner)
    write_counting_cache(old_cache, 7, 12)  # the next write cleans the leftovers up
    assert_cache_holds(old_cache, 7, 12)
    assert hidden(old_cache.parent) == []


def test_a_reader_that_cannot_finish_the_swap_reads_the_new_cache_where_it_lies(
    old_cache, tmp_path, monkeypatch
):
    marker = tmp_path / "paused"
    proc = start_paused(
        CACHE_SCRIPT, [str(old_cache), *map(str, NEW)], "between-renames", marker, 300
    )
    kill_9(proc)

    def read_only(src, dst):
        raise PermissionError(30, "Read-only file system", str(src))

    monkeypatch.setattr(os, "rename", read_only)
    assert_cache_holds(old_cache, *NEW)
    assert not old_cache.exists()


def test_a_failed_rename_while_overwriting_leaves_exactly_the_old_cache(
    tl_model, rows, old_cache, monkeypatch
):
    before = {n: (old_cache / n).read_bytes() for n in os.listdir(old_cache)}
    real_rename = os.rename
    failures = []

    def failing(src, dst, *args, **kwargs):
        if Path(dst).name == old_cache.name and not failures:
            failures.append(dst)
            raise OSError(5, "Input/output error", str(dst))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="Input/output error"):
        cache_activations(make_store(tl_model, rows), old_cache, 20, overwrite=True)
    monkeypatch.undo()
    assert failures
    assert {n: (old_cache / n).read_bytes() for n in os.listdir(old_cache)} == before
    assert_cache_holds(old_cache, *OLD)
    assert hidden(old_cache.parent) == []


def test_a_taken_target_is_refused_before_the_model_loads(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    cfg = SimpleNamespace(cached_activations_path=str(target), training_tokens=10)
    loaded = []
    with pytest.raises(FileExistsError, match=r"taken is not empty"):
        cache_activations_from_config(cfg, model_loader=loaded.append)
    assert loaded == []
    with pytest.raises(FileExistsError, match="not a directory"):
        check_cache_target(target / "keep.txt")
    with pytest.raises(ValueError, match="cache path is empty"):
        check_cache_target("")


def test_the_cache_command_checks_its_target_before_loading_the_model(
    tmp_path, monkeypatch, capsys
):
    """``fastsae cache`` into a non-empty folder used to load the model (minutes for a
    large one) before finding out it could not write there."""
    from fastsae import cli
    from fastsae.training import runner

    docs = tmp_path / "docs.txt"
    docs.write_text("a few words\nand a few more\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"sae": {"architecture": "topk", "d_in": 16, "d_sae": 32, "k": 4},
             "model_name": "tiny-model", "hook_name": "blocks.0.hook_resid_post",
             "dataset_path": str(docs), "streaming": False, "context_size": 8,
             "train_batch_size_tokens": 16, "training_tokens": 64, "checkpoint_path": None,
             "output_path": str(tmp_path / "out")}
        )
    )  # fmt: skip
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("user data")
    loads = []
    monkeypatch.setattr(runner, "load_model", lambda c: loads.append(c) or (None, None))
    assert cli.main(["cache", str(cfg), "--out", str(taken)]) == 2
    assert "taken is not empty" in capsys.readouterr().err
    assert loads == []
    assert os.listdir(taken) == ["keep.txt"]
