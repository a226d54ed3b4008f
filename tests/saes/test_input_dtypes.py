"""Wrong dtypes at the SAE's entry points are TypeErrors that name the dtype: integer or
bool activations (token ids passed by mistake), integer feature activations to decode,
non-float SparseCode values, non-int32/int64 indices. Other floating dtypes are cast to
the SAE's, as SAELens casts encode's input."""

from __future__ import annotations

import pytest
import torch

import fastsae
from fastsae.saes import SAE_CLASSES
from fastsae.sparse_code import SparseCode

D_IN, D_SAE, D_OUT = 8, 32, 6
# temporal SAEs take only [batch, seq, d_in] and need d_sae % (bottleneck_factor *
# n_heads) == 0: tests/saes/test_temporal.py covers them (disk both ways, bridge, dtypes)
ARCHS = sorted(a for a in SAE_CLASSES if a != "temporal")


def make_sae(arch: str) -> fastsae.SAE:
    cfg = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE}
    if "transcoder" in arch:
        cfg.update(apply_b_dec_to_input=False, d_out=D_OUT)
    if "topk" in arch:
        cfg["k"] = 4
    sae = fastsae.SAE.from_dict(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    return sae


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_or_bool_activations_are_rejected_naming_the_dtype(arch, dtype):
    sae = make_sae(arch)
    x = torch.ones(3, D_IN, dtype=dtype)
    for call in (sae.encode, sae.forward, sae.encode_sparse):
        with pytest.raises(TypeError, match=f"SAE input must be a floating-point.*{dtype}"):
            call(x)


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_rejects_integer_codes_and_casts_other_floats(arch):
    sae = make_sae(arch)
    x = torch.randn(3, D_IN)
    acts = sae.encode(x)
    for dtype in (torch.int64, torch.bool):
        with pytest.raises(TypeError, match=f"decode's feature activations.*{dtype}"):
            sae.decode(acts.to(dtype))
    expected = sae.decode(acts)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        sae.encode(x)  # the normalisation statistics decode may need
        got = sae.decode(acts.to(dtype))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, sae.decode(acts.to(dtype).float()))
    assert expected.dtype == torch.float32


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_sparse_rejects_wrong_value_and_index_dtypes(arch):
    sae = make_sae(arch)
    code = sae.encode_sparse(torch.randn(3, D_IN))
    with pytest.raises(TypeError, match="SparseCode values.*torch.int64"):
        sae.decode_sparse(SparseCode(code.values.long(), code.indices))
    for dtype in (torch.bool, torch.int8, torch.float32):
        with pytest.raises(TypeError, match=f"indices must be int32 or int64.*{dtype}"):
            sae.decode_sparse(SparseCode(code.values, code.indices.to(dtype)))
    torch.testing.assert_close(
        sae.decode_sparse(SparseCode(code.values, code.indices.int())),
        sae.decode_sparse(code),
    )
