"""write_safetensors_blocks: files written a block at a time read back with safetensors
exactly (every dtype, empty and scalar tensors, any block split), and blocks that do
not fill the declared tensors raise naming the tensor."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fastsae.loading.safetensors_stream import write_safetensors_blocks


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "W": torch.randn(7, 5, generator=g),
        "half": torch.randn(3, 4, 2, generator=g).bfloat16(),
        "empty": torch.zeros(0, 3),
        "ids": torch.randint(-9, 9, (11,), generator=g),
        "scalar": torch.tensor(0.25, dtype=torch.float64),
        "mask": torch.rand(6, generator=g) > 0.5,
        "f16": torch.randn(2, 3, generator=g).half(),
    }


def _specs(tensors):
    return [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]


def _blocks(tensors, size):
    """Each tensor's elements in row-major blocks of ``size`` elements."""
    for name, t in tensors.items():
        flat = t.reshape(-1)
        for a in range(0, flat.numel(), size):
            yield name, flat[a : a + size]


@pytest.mark.parametrize("size", [1, 3, 8, 1000])
def test_blocks_read_back_exactly(tmp_path, size):
    tensors = _tensors()
    file = tmp_path / "x.safetensors"
    write_safetensors_blocks(file, _specs(tensors), _blocks(tensors, size))
    got = load_file(file)
    assert got.keys() == tensors.keys()
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name
    with safe_open(str(file), framework="pt") as f:  # slices read as from any file
        assert torch.equal(f.get_slice("W")[2:4], tensors["W"][2:4])


def test_blocks_that_do_not_fit_raise(tmp_path):
    tensors = {"a": torch.arange(6.0), "b": torch.ones(2, 2)}
    specs = _specs(tensors)
    file = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match=r"the blocks ended before filling \['a', 'b'\]"):
        write_safetensors_blocks(file, specs, [("a", torch.arange(3.0))])
    with pytest.raises(ValueError, match=r"the blocks ended before filling \['b'\]"):
        write_safetensors_blocks(file, specs, [("a", torch.arange(6.0))])
    with pytest.raises(ValueError, match="a: the blocks hold more elements than its shape"):
        write_safetensors_blocks(file, specs, [("a", torch.arange(7.0))])
    with pytest.raises(ValueError, match="a block for 'b' while 'a' still needs 12 bytes"):
        write_safetensors_blocks(file, specs, [("a", torch.arange(3.0)), ("b", torch.ones(4))])
    with pytest.raises(ValueError, match="block dtype torch.float64, expected torch.float32"):
        write_safetensors_blocks(file, specs, [("a", torch.arange(6.0).double())])
    with pytest.raises(ValueError, match="a block for 'c' after the last tensor"):
        write_safetensors_blocks(file, specs, [*tensors.items(), ("c", torch.ones(1))])
    with pytest.raises(ValueError, match="has no safetensors name"):
        write_safetensors_blocks(file, [("z", torch.complex64, (1,))], [])
