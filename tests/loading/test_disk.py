"""The SAELens directory format: round trips, both-way compatibility with sae-lens,
pre-6.0 configs, dtype/device overrides, clear errors on bad input, atomic saves.

Sizes are small and odd (d_in=20, d_sae=60, k=5, d_out=12); every comparison is a
relative error ``||a - b|| / ||b||`` in float64, 1e-5 for fp32 outputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import sae_lens
import torch
from sae_testing import assert_close
from safetensors import safe_open
from safetensors.torch import save_file

import fastsae
from fastsae.loading import disk
from fastsae.saes import SAE_CLASSES

pytestmark = [
    pytest.mark.filterwarnings("ignore:Setting use_error_term directly:DeprecationWarning"),
]

D_IN, D_SAE, K, D_OUT = 20, 60, 5, 12
N_TOKENS = 7
# temporal SAEs take only [batch, seq, d_in] and need d_sae % (bottleneck_factor *
# n_heads) == 0: tests/saes/test_temporal.py covers them (disk both ways, bridge, dtypes)
ARCHS = sorted(a for a in SAE_CLASSES if a != "temporal")
FP32_TOL = 1e-5


# --------------------------------------------------------------------------- helpers
def cfg_dict_for(arch: str, **extra) -> dict:
    """A 6.x config dict (the shape both libraries' ``from_dict`` accept)."""
    cfg = {
        "architecture": arch,
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "metadata": {"model_name": "gpt2", "hook_name": "blocks.1.hook_resid_pre"},
    }
    if "transcoder" in arch:
        cfg.update(apply_b_dec_to_input=False, d_out=D_OUT)
        cfg["metadata"]["hook_name_out"] = "blocks.1.hook_mlp_out"
    if "topk" in arch:
        cfg["k"] = K
    cfg.update(extra)
    return cfg


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Non-trivial weights (works for fastsae and sae_lens modules alike)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name == "threshold":
            p.copy_(torch.rand(p.shape, generator=g) * 0.5)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def random_fastsae(arch: str, seed: int = 1, **extra) -> fastsae.SAE:
    return randomize_(fastsae.SAE.from_dict(cfg_dict_for(arch, **extra)), seed)


def random_input(d: int = D_IN, n: int = N_TOKENS) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(7))


def hand_topk(x, W_enc, b_enc, W_dec, b_dec, k):
    """SAELens TopK: top k of the pre-activations, ReLU on the kept values."""
    h = (x - b_dec) @ W_enc + b_enc
    vals, idx = h.topk(k, dim=-1)
    acts = torch.zeros_like(h).scatter(-1, idx, vals.relu())
    return acts @ W_dec + b_dec


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_same_class_config_weights_outputs(arch, tmp_path):
    sae = random_fastsae(arch)
    weights_path, cfg_path = sae.save_model(tmp_path / "sae")
    assert weights_path == tmp_path / "sae" / "sae_weights.safetensors"
    assert cfg_path == tmp_path / "sae" / "cfg.json"

    loaded = fastsae.SAE.load_from_disk(tmp_path / "sae")
    assert type(loaded) is type(sae)
    assert loaded.cfg.to_dict() == sae.cfg.to_dict()
    theirs = dict(loaded.state_dict())
    for name, tensor in sae.state_dict().items():
        assert torch.equal(theirs.pop(name), tensor), name
    assert not theirs, f"unexpected tensors {sorted(theirs)}"
    x = random_input()
    assert_close(loaded(x), sae(x), tol=0.0, what=arch)
    # the concrete class loads its own directory too
    assert type(type(sae).load_from_disk(tmp_path / "sae")) is type(sae)


def test_load_from_pretrained_is_a_deprecated_load_from_disk(tmp_path):
    sae = random_fastsae("topk")
    sae.save_model(tmp_path)
    with pytest.warns(DeprecationWarning, match="load_from_disk"):
        loaded = fastsae.SAE.load_from_pretrained(tmp_path, dtype="float64")
    assert loaded.W_enc.dtype == torch.float64
    x = random_input()
    assert_close(loaded(x.double()), sae(x), what="load_from_pretrained")


def test_load_with_wrong_class_names_both(tmp_path):
    random_fastsae("standard").save_model(tmp_path)
    with pytest.raises(ValueError, match=r"StandardSAE.*not a TopKSAE"):
        fastsae.TopKSAE.load_from_disk(tmp_path)


@pytest.mark.parametrize("arch", ARCHS)
def test_fastsae_directory_loads_in_sae_lens(arch, tmp_path):
    sae = random_fastsae(arch)
    sae.save_model(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert theirs.cfg.architecture() == arch
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"
    x = random_input()
    assert_close(sae(x), theirs(x), what=arch)
    assert_close(sae.encode(x), theirs.encode(x), what=f"{arch} encode")


@pytest.mark.parametrize("arch", ARCHS)
def test_sae_lens_directory_loads_in_fastsae(arch, tmp_path):
    theirs = randomize_(sae_lens.SAE.from_dict(cfg_dict_for(arch)), seed=3)
    theirs.save_model(tmp_path)
    ours = fastsae.SAE.load_from_disk(tmp_path)
    assert type(ours) is SAE_CLASSES[arch]
    assert ours.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"
    assert ours.cfg.metadata.model_name == "gpt2"
    x = random_input()
    assert_close(ours(x), theirs(x), what=arch)
    assert_close(ours.encode(x), theirs.encode(x), what=f"{arch} encode")


# --------------------------------------------------------------------------- pre-6.0 configs
def _pre6_cfg(**extra) -> dict:
    cfg = {
        "model_name": "gpt2-small",
        "hook_point": "blocks.4.hook_resid_pre",
        "hook_point_layer": 4,
        "hook_point_head_index": None,
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "torch.float32",
        "device": "cuda",
        "context_size": 128,
        "dataset_path": "Skylion007/openwebtext",
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "lp_norm": 1,  # a training key the loader must ignore
    }
    cfg.update(extra)
    return cfg


def _random_weights(*names_shapes, seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(*shape, generator=g) * 0.5 for name, shape in names_shapes}


@pytest.mark.parametrize("normalize", [True, False])
def test_pre_6_topk_config(normalize, tmp_path):
    cfg = _pre6_cfg(
        activation_fn_str="topk",
        activation_fn_kwargs={"k": 3},
        normalize_activations=normalize,
    )
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    w = _random_weights(
        ("W_enc", (D_IN, D_SAE)), ("W_dec", (D_SAE, D_IN)), ("b_enc", (D_SAE,)), ("b_dec", (D_IN,))
    )
    write_safetensors(tmp_path / "sae_weights.safetensors", w)

    sae = fastsae.SAE.load_from_disk(tmp_path)
    assert isinstance(sae, fastsae.TopKSAE)
    assert sae.cfg.k == 3
    assert sae.cfg.metadata.hook_name == "blocks.4.hook_resid_pre"
    assert sae.cfg.hook_name == "blocks.4.hook_resid_pre"  # the flat spelling
    assert sae.cfg.metadata.context_size == 128
    assert sae.cfg.normalize_activations == ("expected_average_only_in" if normalize else "none")
    assert sae.cfg.device == "cpu"  # the loader's device, not the file's
    assert sae.cfg.dtype == "float32"
    x = random_input()
    expected = hand_topk(x, w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], 3)
    assert_close(sae(x), expected, what="pre-6 topk")
    assert_close(sae(x), sae_lens.SAE.load_from_disk(tmp_path)(x), what="vs sae_lens")
    # saving it again writes a 6.x config that keeps the meaning
    sae.save_model(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "cfg.json").read_text())
    assert resaved["architecture"] == "topk" and resaved["k"] == 3
    assert resaved["metadata"]["sae_lens_version"].split(".")[0] == "6"
    assert_close(fastsae.SAE.load_from_disk(tmp_path / "resaved")(x), expected, what="resaved")


def test_pre_6_scaling_factor_is_folded_into_W_dec(tmp_path):
    cfg = _pre6_cfg(activation_fn_str="relu", finetuning_scaling_factor=True)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    w = _random_weights(
        ("W_enc", (D_IN, D_SAE)), ("W_dec", (D_SAE, D_IN)), ("b_enc", (D_SAE,)), ("b_dec", (D_IN,))
    )
    scale = torch.rand(D_SAE, generator=torch.Generator().manual_seed(9)) * 2 + 0.25
    write_safetensors(tmp_path / "sae_weights.safetensors", {**w, "scaling_factor": scale})

    sae = fastsae.SAE.load_from_disk(tmp_path)
    assert isinstance(sae, fastsae.StandardSAE)
    assert sae.cfg.normalize_activations == "none"
    x = random_input()
    acts = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    expected = (acts * scale) @ w["W_dec"] + w["b_dec"]  # SAELens 5's finetuning scaling
    assert_close(sae(x), expected, what="scaling factor")
    assert_close(sae.encode(x), acts, what="encode is unscaled")
    assert "scaling_factor" not in dict(sae.named_parameters())


def test_pre_6_all_ones_scaling_factor_is_dropped(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps(_pre6_cfg()))
    w = _random_weights(
        ("W_enc", (D_IN, D_SAE)), ("W_dec", (D_SAE, D_IN)), ("b_enc", (D_SAE,)), ("b_dec", (D_IN,))
    )
    write_safetensors(
        tmp_path / "sae_weights.safetensors", {**w, "scaling_factor": torch.ones(D_SAE)}
    )
    sae = fastsae.SAE.load_from_disk(tmp_path)
    x = random_input()
    expected = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"]
    assert_close(sae(x), expected, what="ones scaling factor")


def test_pre_6_scaling_factor_without_flag_is_an_error(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps(_pre6_cfg(finetuning_scaling_factor=False)))
    w = _random_weights(
        ("W_enc", (D_IN, D_SAE)), ("W_dec", (D_SAE, D_IN)), ("b_enc", (D_SAE,)), ("b_dec", (D_IN,))
    )
    write_safetensors(
        tmp_path / "sae_weights.safetensors", {**w, "scaling_factor": torch.full((D_SAE,), 2.0)}
    )
    with pytest.raises(ValueError, match=r"scaling_factor.*finetuning_scaling_factor=False") as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_pre_6_hook_z_config_turns_on_reshaping(tmp_path):
    n_heads, d_head = 4, 5
    cfg = _pre6_cfg(hook_point="blocks.2.attn.hook_z")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    w = _random_weights(
        ("W_enc", (D_IN, D_SAE)), ("W_dec", (D_SAE, D_IN)), ("b_enc", (D_SAE,)), ("b_dec", (D_IN,))
    )
    write_safetensors(tmp_path / "sae_weights.safetensors", w)
    sae = fastsae.SAE.load_from_disk(tmp_path)
    assert sae.cfg.reshape_activations == "hook_z"
    x = torch.randn(3, n_heads, d_head)
    flat = x.flatten(-2)
    expected = torch.relu((flat - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"]
    assert_close(sae(x), expected.unflatten(-1, (n_heads, d_head)), what="hook_z")


# --------------------------------------------------------------------------- dtype / device
@pytest.mark.parametrize("dtype", ["float64", torch.float64, "torch.float64"])
def test_dtype_override(dtype, tmp_path):
    sae = random_fastsae("jumprelu")
    sae.save_model(tmp_path)
    loaded = fastsae.SAE.load_from_disk(tmp_path, dtype=dtype)
    assert loaded.cfg.dtype == "float64"
    assert loaded.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    x = random_input()
    out = loaded(x.double())
    assert out.dtype == torch.float64
    assert_close(out, sae(x), what="float64 load")


def test_dtype_override_bfloat16(tmp_path):
    sae = random_fastsae("topk")
    sae.save_model(tmp_path)
    loaded = fastsae.SAE.load_from_disk(tmp_path, dtype="bfloat16")
    assert loaded.cfg.dtype == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    # the stored dtype is the default again on the next load
    assert fastsae.SAE.load_from_disk(tmp_path).W_enc.dtype == torch.float32


def test_unknown_dtype_is_rejected(tmp_path):
    random_fastsae("standard").save_model(tmp_path)
    with pytest.raises(ValueError, match="float37"):
        fastsae.SAE.load_from_disk(tmp_path, dtype="float37")


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.cuda,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
            ],
        ),
    ],
)
def test_device(device, tmp_path):
    sae = random_fastsae("gated")
    sae.save_model(tmp_path)
    loaded = fastsae.SAE.load_from_disk(tmp_path, device=device)
    assert loaded.cfg.device == device
    assert all(p.device.type == device for p in loaded.parameters())
    x = random_input()
    assert_close(loaded(x.to(device)).cpu(), sae(x), what=device)


def test_fold_W_dec_norm_on_load(tmp_path):
    sae = random_fastsae("standard")
    sae.save_model(tmp_path)
    loaded = fastsae.SAE.load_from_disk(tmp_path, fold_W_dec_norm=True)
    norms = loaded.W_dec.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    x = random_input()
    assert_close(loaded(x), sae(x), what="folded")


# --------------------------------------------------------------------------- validation
def test_validate_rejects_nan_weights_naming_them(tmp_path):
    sae = random_fastsae("standard")
    with torch.no_grad():
        sae.b_enc[3] = float("nan")
    sae.save_model(tmp_path)
    with pytest.raises(ValueError, match=r"'b_enc'.*NaN") as e:
        fastsae.SAE.load_from_disk(tmp_path, validate=True)
    assert str(tmp_path) in str(e.value)
    # without validate the (bad) weights load as they are
    assert torch.isnan(fastsae.SAE.load_from_disk(tmp_path).b_enc[3])


def test_validate_accepts_finite_weights(tmp_path):
    sae = random_fastsae("jumprelu")
    sae.save_model(tmp_path)
    x = random_input()
    assert_close(fastsae.SAE.load_from_disk(tmp_path, validate=True)(x), sae(x), tol=0.0)


# --------------------------------------------------------------------------- bad input
def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="not found") as e:
        fastsae.SAE.load_from_disk(missing)
    assert str(missing) in str(e.value)


def test_missing_cfg_json(tmp_path):
    random_fastsae("standard").save_model(tmp_path)
    (tmp_path / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError) as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert str(tmp_path / "cfg.json") in str(e.value)


def test_invalid_json_in_cfg(tmp_path):
    random_fastsae("standard").save_model(tmp_path)
    (tmp_path / "cfg.json").write_text('{"d_in": 20, "d_sae": ')
    with pytest.raises(ValueError, match="not valid JSON") as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert str(tmp_path / "cfg.json") in str(e.value)


def test_cfg_json_that_is_not_an_object(tmp_path):
    random_fastsae("standard").save_model(tmp_path)
    (tmp_path / "cfg.json").write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match="JSON object") as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert str(tmp_path / "cfg.json") in str(e.value)


def test_missing_weights_file(tmp_path):
    random_fastsae("standard").save_model(tmp_path)
    (tmp_path / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert str(tmp_path / "sae_weights.safetensors") in str(e.value)


def test_truncated_weights_file(tmp_path):
    random_fastsae("standard").save_model(tmp_path)
    weights = tmp_path / "sae_weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt") as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert str(weights) in str(e.value)


def test_garbage_weights_file(tmp_path):
    random_fastsae("standard").save_model(tmp_path)
    weights = tmp_path / "sae_weights.safetensors"
    weights.write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="truncated or corrupt") as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert str(weights) in str(e.value)


def test_weight_shape_contradicting_cfg(tmp_path):
    random_fastsae("standard").save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["d_sae"] = D_SAE + 4
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        fastsae.SAE.load_from_disk(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg
    assert "'b_dec'" not in msg  # b_dec [d_in] is fine; the first bad one is named
    assert f"[{D_IN}, {D_SAE}]" in msg or f"[{D_SAE}, {D_IN}]" in msg or f"[{D_SAE}]" in msg
    assert str(D_SAE + 4) in msg
    assert any(f"'{name}'" in msg for name in ("W_enc", "W_dec", "b_enc"))


def test_d_in_mismatch_names_weight_and_shapes(tmp_path):
    random_fastsae("topk").save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["d_in"] = D_IN + 1
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"weight '\w+' has shape \[\d+(, \d+)?\]") as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert f"d_in={D_IN + 1}" in str(e.value)


def test_missing_weight_key(tmp_path):
    sae = random_fastsae("jumprelu")
    sae.save_model(tmp_path)
    state = {k: v for k, v in sae.state_dict().items() if k != "threshold"}
    write_safetensors(tmp_path / "sae_weights.safetensors", state)
    with pytest.raises(ValueError, match=r"missing \['threshold'\]") as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_extra_weight_key(tmp_path):
    sae = random_fastsae("standard")
    sae.save_model(tmp_path)
    state = {**sae.state_dict(), "surprise": torch.zeros(3)}
    write_safetensors(tmp_path / "sae_weights.safetensors", state)
    with pytest.raises(ValueError, match=r"unexpected \['surprise'\]") as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_unknown_architecture_lists_known(tmp_path):
    random_fastsae("standard").save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["architecture"] = "hyperbolic"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hyperbolic") as e:
        fastsae.SAE.load_from_disk(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg
    for known in ARCHS:
        assert f"'{known}'" in msg, known


def test_unknown_architecture_in_pre_6_config_names_file(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps(_pre6_cfg(architecture="hyperbolic")))
    w = _random_weights(
        ("W_enc", (D_IN, D_SAE)), ("W_dec", (D_SAE, D_IN)), ("b_enc", (D_SAE,)), ("b_dec", (D_IN,))
    )
    write_safetensors(tmp_path / "sae_weights.safetensors", w)
    with pytest.raises(ValueError, match="hyperbolic") as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert str(tmp_path) in str(e.value)
    assert "'standard'" in str(e.value)


def test_invalid_config_value_names_file(tmp_path):
    random_fastsae("topk").save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["k"] = D_SAE + 1
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"invalid SAE config.*k must be") as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_pre_6_topk_without_k(tmp_path):
    cfg = _pre6_cfg(activation_fn_str="topk", activation_fn_kwargs={})
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    w = _random_weights(
        ("W_enc", (D_IN, D_SAE)), ("W_dec", (D_SAE, D_IN)), ("b_enc", (D_SAE,)), ("b_dec", (D_IN,))
    )
    write_safetensors(tmp_path / "sae_weights.safetensors", w)
    with pytest.raises(ValueError, match="k") as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert str(tmp_path) in str(e.value)


# --------------------------------------------------------------------------- atomic save
def _dir_listing(path: Path) -> set[str]:
    return set(os.listdir(path))


def _assert_still_first(path: Path, first: fastsae.SAE) -> None:
    assert _dir_listing(path) <= {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors"}
    assert not [n for n in _dir_listing(path) if n.endswith(".tmp")]
    loaded = fastsae.SAE.load_from_disk(path)
    assert loaded.cfg.to_dict() == first.cfg.to_dict()
    for name, tensor in first.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("fail_on_call", [1, 2])
def test_failed_save_leaves_previous_directory_intact(fail_on_call, tmp_path, monkeypatch):
    """A crash while writing (weights: call 1, sparsity: call 2) keeps the old SAE whole."""
    first = random_fastsae("standard", seed=1)
    first.save_model(tmp_path, sparsity=torch.zeros(D_SAE))
    old_bytes = {n: (tmp_path / n).read_bytes() for n in _dir_listing(tmp_path)}
    second = random_fastsae("standard", seed=2, d_sae=D_SAE * 2)

    calls = []
    real_save_file = disk.save_file

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == fail_on_call:
            Path(filename).write_bytes(b"half a file")  # die midway through the write
            raise OSError("No space left on device")
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(disk, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        second.save_model(tmp_path, sparsity=torch.ones(D_SAE * 2))
    assert len(calls) == fail_on_call
    assert {n: (tmp_path / n).read_bytes() for n in _dir_listing(tmp_path)} == old_bytes
    _assert_still_first(tmp_path, first)


def test_save_with_unserializable_config_leaves_previous_directory_intact(tmp_path):
    first = random_fastsae("topk", seed=1)
    first.save_model(tmp_path)
    second = random_fastsae("topk", seed=2)
    second.cfg.metadata["not_json"] = object()
    with pytest.raises(TypeError):
        second.save_model(tmp_path)
    _assert_still_first(tmp_path, first)


def test_save_with_bad_sparsity_shape_leaves_previous_directory_intact(tmp_path):
    first = random_fastsae("standard", seed=1)
    first.save_model(tmp_path)
    second = random_fastsae("standard", seed=2)
    with pytest.raises(ValueError, match=r"sparsity must be \[d_sae\]"):
        second.save_model(tmp_path, sparsity=torch.zeros(D_SAE + 1))
    _assert_still_first(tmp_path, first)


def test_save_over_existing_directory_replaces_it(tmp_path):
    random_fastsae("standard", seed=1).save_model(tmp_path)
    second = random_fastsae("gated", seed=2)
    second.save_model(tmp_path)
    assert _dir_listing(tmp_path) == {"cfg.json", "sae_weights.safetensors"}
    loaded = fastsae.SAE.load_from_disk(tmp_path)
    assert isinstance(loaded, fastsae.GatedSAE)
    x = random_input()
    assert_close(loaded(x), second(x), tol=0.0)


# --------------------------------------------------------------------------- sparsity
def test_save_with_sparsity(tmp_path):
    sae = random_fastsae("topk")
    log_sparsity = torch.randn(D_SAE)
    folder = tmp_path / "repo" / "sae"
    sae.save_model(folder, sparsity=log_sparsity)
    assert _dir_listing(folder) == {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors"}
    # read the way sae-lens reads it (sae_lens_huggingface_loader)
    with safe_open(str(folder / "sparsity.safetensors"), framework="pt", device="cpu") as f:
        assert list(f.keys()) == ["sparsity"]
        assert torch.equal(f.get_tensor("sparsity"), log_sparsity)
    assert torch.equal(disk.read_log_sparsity(folder / "sparsity.safetensors"), log_sparsity)
    # from_pretrained on a local repo-like directory returns it too
    _, _, got = fastsae.SAE.from_pretrained_with_cfg_and_sparsity(str(tmp_path / "repo"), "sae")
    assert torch.equal(got, log_sparsity)


def test_sparsity_file_without_sparsity_tensor(tmp_path):
    write_safetensors(tmp_path / "sparsity.safetensors", {"other": torch.zeros(3)})
    with pytest.raises(ValueError, match="no 'sparsity' tensor") as e:
        disk.read_log_sparsity(tmp_path / "sparsity.safetensors")
    assert "sparsity.safetensors" in str(e.value)


def test_saved_cfg_json_is_sae_lens_6_layout(tmp_path):
    sae = random_fastsae("topk")
    sae.save_model(tmp_path)
    ours = json.loads((tmp_path / "cfg.json").read_text())
    theirs = sae_lens.SAE.from_dict(cfg_dict_for("topk")).cfg.to_dict()
    assert ours["architecture"] == "topk"
    missing = set(theirs) - set(ours)
    assert not missing, f"keys sae-lens writes that we do not: {missing}"
    assert ours["metadata"]["hook_name"] == "blocks.1.hook_resid_pre"
    with safe_open(str(tmp_path / "sae_weights.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {"W_enc", "W_dec", "b_enc", "b_dec"}
        assert list(f.get_slice("W_enc").get_shape()) == [D_IN, D_SAE]
        assert list(f.get_slice("W_dec").get_shape()) == [D_SAE, D_IN]
