"""Building a latent shard without the full SAE (``latent_sharding.build``): a fresh
shard equals the shard of the full initialisation bit for bit (every sharded
architecture, dtype and block size) and leaves the RNG where the full build does, while
holding no full-size tensor; a shard read from a saved SAE equals the shard of the loaded
SAE, and bad files raise naming what is wrong."""

from __future__ import annotations

import json

import pytest
import torch
from live_tensors import LiveTensors
from safetensors.torch import load_file, save_file

from fastsae.saes.training_sae import training_sae_class_for_architecture
from fastsae.training import (
    BatchTopKTrainingSAEConfig,
    JumpReLUTrainingSAEConfig,
    StandardTrainingSAEConfig,
    TopKTrainingSAEConfig,
)
from fastsae.training.parallel.latent import SHARDED_CLASSES, shard_sae
from fastsae.training.parallel.latent.build import (
    full_parameter_names,
    init_shard,
    load_shard_weights_,
)

D_IN, D_SAE = 10, 24


def _cfg(arch: str, dtype: str = "float32", norm: float | None = 0.1):
    kw = {"d_in": D_IN, "d_sae": D_SAE, "dtype": dtype, "decoder_init_norm": norm}
    if arch == "topk":
        return TopKTrainingSAEConfig(k=3, **kw)
    if arch == "batchtopk":
        return BatchTopKTrainingSAEConfig(k=3, **kw)
    if arch == "jumprelu":
        return JumpReLUTrainingSAEConfig(jumprelu_init_threshold=0.02, **kw)
    return StandardTrainingSAEConfig(**kw)


def _full(cfg):
    return training_sae_class_for_architecture(cfg.architecture())(cfg)


def _assert_same(shard, expected) -> None:
    mine, theirs = shard.state_dict(), expected.state_dict()
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert mine[name].dtype == theirs[name].dtype, name
        assert torch.equal(mine[name], theirs[name]), name


@pytest.mark.parametrize("arch", sorted(SHARDED_CLASSES))
@pytest.mark.parametrize("dtype, norm", [("float32", 0.1), ("bfloat16", 0.1), ("float32", None)])
@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("block_rows", [1, 5, 24, 100])
def test_init_shard_equals_the_shard_of_the_full_init(arch, dtype, norm, world_size, block_rows):
    cfg = _cfg(arch, dtype, norm)
    torch.manual_seed(3)
    full = _full(cfg)
    after_full = torch.rand(4)
    element = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    for rank in range(world_size):
        torch.manual_seed(3)
        shard = init_shard(
            SHARDED_CLASSES[arch], cfg, rank, world_size, chunk_bytes=block_rows * D_IN * element
        )
        assert torch.equal(torch.rand(4), after_full)  # the RNG moved as the full build's
        _assert_same(shard, shard_sae(full, rank, world_size))


def test_init_shard_holds_no_full_size_tensor():
    d_in, d_sae, world = 64, 4096, 8
    cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=4)
    matrix = d_in * d_sae * 4
    block = matrix // 64
    with LiveTensors(min_bytes=1024) as live:
        shard = init_shard(SHARDED_CLASSES["topk"], cfg, 3, world, chunk_bytes=block)
    # the shard's two matrices plus one block of rows (and the norms), not the full SAE
    assert live.peak <= 2 * matrix // world + block + 64 * 1024, live.peak
    assert shard.W_dec.shape == (d_sae // world, d_in)


def _saved(tmp_path, sae):
    sae.save_model(tmp_path)
    return tmp_path


@pytest.mark.parametrize("arch", sorted(SHARDED_CLASSES))
@pytest.mark.parametrize("world_size", [2, 3])
def test_load_shard_weights_reads_the_shard_of_a_saved_sae(tmp_path, arch, world_size):
    cfg = _cfg(arch)
    torch.manual_seed(0)
    full = _full(cfg)
    with torch.no_grad():  # every parameter distinct from its initial value
        for p in full.parameters():
            p.add_(torch.randn_like(p).abs())
    path = _saved(tmp_path, full)
    for rank in range(world_size):
        shard = SHARDED_CLASSES[arch](cfg, rank, world_size)
        load_shard_weights_(shard, path)
        _assert_same(shard, shard_sae(full, rank, world_size))


def test_load_shard_weights_converts_log_threshold(tmp_path):
    cfg = _cfg("jumprelu")
    full = _full(cfg)
    with torch.no_grad():
        full.threshold.copy_(torch.rand(D_SAE) + 0.1)
    path = _saved(tmp_path, full)
    file = path / "sae_weights.safetensors"
    state = load_file(file)
    state["log_threshold"] = state.pop("threshold").log()
    save_file(state, file)
    shard = SHARDED_CLASSES["jumprelu"](cfg, 1, 2)
    load_shard_weights_(shard, path)
    torch.testing.assert_close(shard.threshold, full.threshold[D_SAE // 2 :])


def test_full_parameter_names_are_the_full_saes_order():
    for arch, cls in SHARDED_CLASSES.items():
        cfg = _cfg(arch)
        shard = cls(cfg, 0, 2)
        assert full_parameter_names(shard) == [n for n, _ in _full(cfg).named_parameters()]


def test_load_shard_weights_errors(tmp_path):
    cfg = _cfg("topk")
    shard = SHARDED_CLASSES["topk"](cfg, 0, 2)
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors"):
        load_shard_weights_(shard, tmp_path)

    path = _saved(tmp_path / "saved", _full(cfg))
    file = path / "sae_weights.safetensors"
    state = load_file(file)

    wider = {**state, "W_dec": torch.zeros(2 * D_SAE, D_IN)}
    save_file(wider, file)
    with pytest.raises(ValueError, match=r"W_dec has shape \(48, 10\), not 24 latents"):
        load_shard_weights_(shard, path)

    narrower_in = {**state, "b_dec": torch.zeros(D_IN + 1)}
    save_file(narrower_in, file)
    with pytest.raises(ValueError, match=r"b_dec has shape \(11,\)"):
        load_shard_weights_(shard, path)

    missing = {k: v for k, v in state.items() if k != "b_enc"}
    save_file(missing, file)
    with pytest.raises(ValueError, match=r"missing \['b_enc'\]"):
        load_shard_weights_(shard, path)

    file.write_bytes(file.read_bytes()[:40])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_shard_weights_(shard, path)
    json.loads((path / "cfg.json").read_text())  # the folder is otherwise intact


# --------------------------------------------------------------------------- saving
def _trained_like(arch: str):
    """A full SAE whose every tensor differs from its initial value (seeded)."""
    torch.manual_seed(5)
    full = _full(_cfg(arch))
    with torch.no_grad():
        for p in full.parameters():
            p.add_(torch.randn_like(p).abs())
        for b in full.buffers():
            b.fill_(0.125)
    return full


def _save_worker(rank: int, world: int, out: str, block_bytes: int) -> dict:
    from fastsae.training.parallel.latent.save import save_sharded_sae

    returned = {}
    for arch in sorted(SHARDED_CLASSES):
        full = _trained_like(arch)
        shard = shard_sae(full, rank, world)
        sparsity = torch.linspace(-3, 0, D_SAE) if rank == 0 else None
        path = save_sharded_sae(shard, f"{out}/{arch}", sparsity=sparsity, block_bytes=block_bytes)
        returned[arch] = path is not None
    return returned


@pytest.mark.parametrize("world, block_bytes", [(2, 20), (3, 1 << 20)])
def test_save_sharded_sae_writes_the_full_saes_directory(tmp_path, world, block_bytes):
    """Streamed from the shards (blocks of a few elements, or whole shards), the
    directory holds the files ``full.save_model`` writes: same tensors, dtypes, cfg.json
    and sparsity; only the writing rank returns the path."""
    from spawn_ranks import run_ranks

    from fastsae.training import TrainingSAE

    out = tmp_path / "sharded"
    results = run_ranks(_save_worker, world, tmp_path / "ranks", str(out), block_bytes)
    for rank, res in enumerate(results):
        assert all(v == (rank == 0) for v in res.values())
    for arch in sorted(SHARDED_CLASSES):
        full = _trained_like(arch)
        ref = tmp_path / "ref" / arch
        full.save_model(ref, sparsity=torch.linspace(-3, 0, D_SAE))
        got_dir = out / arch
        assert sorted(p.name for p in got_dir.iterdir()) == sorted(p.name for p in ref.iterdir())
        assert json.loads((got_dir / "cfg.json").read_text()) == json.loads(
            (ref / "cfg.json").read_text()
        )
        for file in ("sae_weights.safetensors", "sparsity.safetensors"):
            got, want = load_file(got_dir / file), load_file(ref / file)
            assert got.keys() == want.keys(), (arch, file)
            for name in want:
                assert got[name].dtype == want[name].dtype, (arch, name)
                assert torch.equal(got[name], want[name]), (arch, name)
        loaded = TrainingSAE.load_from_disk(got_dir)
        _assert_same(loaded, full)


def _failing_save_worker(rank: int, world: int, out: str) -> str | None:
    from fastsae.training.parallel.latent.save import save_sharded_sae

    shard = shard_sae(_trained_like("topk"), rank, world)
    try:
        save_sharded_sae(shard, out, block_bytes=20)
    except FileExistsError as e:
        return str(e)
    return None


def test_a_failing_sharded_save_raises_on_the_writer_and_releases_the_other_ranks(tmp_path):
    """The writing rank cannot write (the destination is a file): it raises, naming the
    path, after taking part in the broadcasts, so the other ranks return instead of
    waiting in them."""
    from spawn_ranks import run_ranks

    out = tmp_path / "a_file"
    out.write_text("not a folder")
    results = run_ranks(_failing_save_worker, 2, tmp_path / "ranks", str(out), timeout=120)
    assert results[0] is not None and "not a folder" in results[0]
    assert results[1] is None
