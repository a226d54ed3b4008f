"""Foreign SAE formats, each written by hand the way its library writes it, loaded by
``fastsae.SAE.load_from_disk`` (format auto-detected) and compared with that library's
forward pass written here in plain torch (1e-5 relative error, fp32).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sae_testing import assert_close
from safetensors.torch import save_file

import fastsae

D_IN, D_SAE, K = 20, 60, 5
N_TOKENS = 9
FP32_TOL = 1e-5


def randn(*shape: int, seed: int, scale: float = 0.5) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def random_input() -> torch.Tensor:
    return randn(N_TOKENS, D_IN, seed=123, scale=1.0)


def active_fraction(acts: torch.Tensor) -> float:
    return (acts != 0).float().mean().item()


# --------------------------------------------------------------------------- Gemma Scope
def test_gemma_scope_params_npz(tmp_path):
    folder = tmp_path / "layer_5" / "width_16k" / "average_l0_71"
    folder.mkdir(parents=True)
    W_enc, W_dec = randn(D_IN, D_SAE, seed=1), randn(D_SAE, D_IN, seed=2)
    b_enc, b_dec = randn(D_SAE, seed=3, scale=0.1), randn(D_IN, seed=4)
    threshold = randn(D_SAE, seed=5).abs()
    np.savez(
        folder / "params.npz",
        W_enc=W_enc.numpy(),
        W_dec=W_dec.numpy(),
        b_enc=b_enc.numpy(),
        b_dec=b_dec.numpy(),
        threshold=threshold.numpy(),
    )

    sae = fastsae.SAE.load_from_disk(folder)
    assert isinstance(sae, fastsae.JumpReLUSAE)
    assert sae.cfg.apply_b_dec_to_input is False
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (D_IN, D_SAE)
    assert sae.cfg.metadata.context_size == 1024

    x = random_input()
    h = x @ W_enc + b_enc  # Gemma Scope: no b_dec subtraction
    acts = torch.relu(h) * (h > threshold)
    assert 0 < active_fraction(acts) < 1
    expected = acts @ W_dec + b_dec
    assert_close(sae.encode(x), acts, what="gemma scope encode")
    assert_close(sae(x), expected, what="gemma scope forward")


def test_gemma_scope_embedding_folder_is_rescaled(tmp_path):
    """Embedding SAEs were trained on embeddings scaled by sqrt(d_model), which happens after
    hook_embed: the encoder is divided and the decoder multiplied by sqrt(d_in), as in SAELens."""
    folder = tmp_path / "embedding" / "width_4k" / "average_l0_6"
    folder.mkdir(parents=True)
    W_enc, W_dec = randn(D_IN, D_SAE, seed=1), randn(D_SAE, D_IN, seed=2)
    b_enc, b_dec = randn(D_SAE, seed=3, scale=0.1), randn(D_IN, seed=4)
    threshold = randn(D_SAE, seed=5, scale=0.1).abs()
    arrays = {
        "W_enc": W_enc,
        "W_dec": W_dec,
        "b_enc": b_enc,
        "b_dec": b_dec,
        "threshold": threshold,
    }
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in arrays.items()})

    sae = fastsae.SAE.load_from_disk(folder)
    assert sae.cfg.metadata.hook_name == "hook_embed"
    x = random_input()
    h = x @ (W_enc / D_IN**0.5) + b_enc
    acts = torch.relu(h) * (h > threshold)
    assert 0 < active_fraction(acts) < 1
    assert_close(sae(x), acts @ (W_dec * D_IN**0.5) + b_dec, what="gemma scope embedding")


def test_gemma_scope_npz_missing_array(tmp_path):
    np.savez(tmp_path / "params.npz", W_enc=np.zeros((D_IN, D_SAE), dtype=np.float32))
    with pytest.raises(ValueError, match=r"missing weights .*threshold") as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert "params.npz" in str(e.value)


def test_gemma_scope_corrupt_npz(tmp_path):
    (tmp_path / "params.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="corrupt") as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert str(tmp_path / "params.npz") in str(e.value)


def test_gemma_scope_truncated_npz(tmp_path):
    arrays = {"W_enc": np.ones((D_IN, D_SAE), dtype=np.float32), "b_dec": np.ones(D_IN)}
    np.savez(tmp_path / "params.npz", **arrays)
    data = (tmp_path / "params.npz").read_bytes()
    (tmp_path / "params.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt") as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert str(tmp_path / "params.npz") in str(e.value)


# --------------------------------------------------------------------------- sparsify
def _write_sparsify(folder: Path, *, seed: int = 10, **cfg_changes) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "activation": "topk",
        "expansion_factor": D_SAE // D_IN,
        "normalize_decoder": True,
        "num_latents": D_SAE,
        "k": K,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": D_IN,
    }
    cfg.update(cfg_changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    tensors = {
        "encoder.weight": randn(D_SAE, D_IN, seed=seed),
        "encoder.bias": randn(D_SAE, seed=seed + 1, scale=0.1),
        "W_dec": randn(D_SAE, D_IN, seed=seed + 2),
        "b_dec": randn(D_IN, seed=seed + 3),
    }
    save_file(tensors, str(folder / "sae.safetensors"))
    return tensors


def sparsify_forward(x: torch.Tensor, t: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    """EleutherAI sparsify's Sae.forward (reconstruction), in plain torch."""
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    acts = torch.zeros_like(pre).scatter(-1, idx, vals)
    return acts @ t["W_dec"] + t["b_dec"]


def test_sparsify_folder(tmp_path):
    run = tmp_path / "run"
    folder = run / "layers.3"
    t = _write_sparsify(folder)
    (run / "config.json").write_text(
        json.dumps({"model": "EleutherAI/pythia-70m", "ctx_len": 2048})
    )

    sae = fastsae.SAE.load_from_disk(folder)
    assert isinstance(sae, fastsae.TopKSAE)
    assert sae.cfg.k == K
    assert sae.cfg.apply_b_dec_to_input is True
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert sae.cfg.metadata.hf_hook_name == "layers.3"
    assert sae.cfg.metadata.model_name == "EleutherAI/pythia-70m"
    assert sae.cfg.metadata.context_size == 2048
    x = random_input()
    assert_close(sae(x), sparsify_forward(x, t, K), what="sparsify")
    assert int((sae.encode(x) != 0).sum(-1).max()) <= K


def test_sparsify_embedding_folder_and_no_run_config(tmp_path):
    folder = tmp_path / "pythia" / "embed_tokens"
    t = _write_sparsify(folder, seed=20)
    sae = fastsae.SAE.load_from_disk(folder)
    assert sae.cfg.metadata.hook_name == "hook_embed"
    assert sae.cfg.metadata.model_name == "pythia"  # no config.json: the parent folder's name
    x = random_input()
    assert_close(sae(x), sparsify_forward(x, t, K), what="sparsify embed")


def test_sparsify_num_latents_from_expansion_factor(tmp_path):
    folder = tmp_path / "layers.0"
    t = _write_sparsify(folder, num_latents=0)
    sae = fastsae.SAE.load_from_disk(folder)
    assert sae.cfg.d_sae == D_SAE
    x = random_input()
    assert_close(sae(x), sparsify_forward(x, t, K), what="expansion factor")


def test_sparsify_groupmax_is_rejected(tmp_path):
    _write_sparsify(tmp_path, activation="groupmax")
    with pytest.raises(ValueError, match="groupmax") as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert str(tmp_path / "cfg.json") in str(e.value)


@pytest.mark.parametrize("flag", ["transcode", "skip_connection"])
def test_sparsify_transcoder_is_rejected(flag, tmp_path):
    _write_sparsify(tmp_path, **{flag: True})
    with pytest.raises(ValueError, match="not converted"):
        fastsae.SAE.load_from_disk(tmp_path)


def test_sparsify_latent_count_mismatch(tmp_path):
    _write_sparsify(tmp_path, num_latents=D_SAE + 1)
    with pytest.raises(ValueError, match=f"{D_SAE} latents") as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert "sae.safetensors" in str(e.value)


def test_sparsify_missing_tensor(tmp_path):
    t = _write_sparsify(tmp_path)
    del t["b_dec"]
    save_file(t, str(tmp_path / "sae.safetensors"))
    with pytest.raises(ValueError, match=r"missing weights \['b_dec'\]") as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert str(tmp_path / "sae.safetensors") in str(e.value)


# --------------------------------------------------------------------------- dictionary_learning
def _write_ae(folder: Path, state: dict[str, torch.Tensor], config: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "ae.pt")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))


def _trainer_config(dict_class: str, **extra) -> dict:
    trainer = {
        "dict_class": dict_class,
        "activation_dim": D_IN,
        "dict_size": D_SAE,
        "layer": 2,
        "lm_name": "org/model",
        **extra,
    }
    return {"trainer": trainer, "buffer": {"ctx_len": 128}}


@pytest.mark.parametrize("with_config", [True, False])
def test_dictionary_learning_autoencoder(with_config, tmp_path):
    sd = {
        "encoder.weight": randn(D_SAE, D_IN, seed=30),
        "encoder.bias": randn(D_SAE, seed=31, scale=0.1),
        "decoder.weight": randn(D_IN, D_SAE, seed=32),
        "bias": randn(D_IN, seed=33),
    }
    _write_ae(tmp_path, sd, _trainer_config("AutoEncoder") if with_config else None)
    sae = fastsae.SAE.load_from_disk(tmp_path)
    assert isinstance(sae, fastsae.StandardSAE)
    if with_config:
        assert sae.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
        assert sae.cfg.metadata.model_name == "model"
        assert sae.cfg.metadata.context_size == 128

    x = random_input()
    f = torch.relu((x - sd["bias"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
    assert 0 < active_fraction(f) < 1
    expected = f @ sd["decoder.weight"].T + sd["bias"]
    assert_close(sae.encode(x), f, what="AutoEncoder encode")
    assert_close(sae(x), expected, what="AutoEncoder")


@pytest.mark.parametrize("with_config", [True, False])
def test_dictionary_learning_gated(with_config, tmp_path):
    sd = {
        "encoder.weight": randn(D_SAE, D_IN, seed=40),
        "decoder.weight": randn(D_IN, D_SAE, seed=41),
        "decoder_bias": randn(D_IN, seed=42),
        "r_mag": randn(D_SAE, seed=43, scale=0.3),
        "gate_bias": randn(D_SAE, seed=44, scale=0.2),
        "mag_bias": randn(D_SAE, seed=45, scale=0.2),
    }
    _write_ae(tmp_path, sd, _trainer_config("GatedAutoEncoder") if with_config else None)
    sae = fastsae.SAE.load_from_disk(tmp_path)
    assert isinstance(sae, fastsae.GatedSAE)

    x = random_input()
    x_enc = (x - sd["decoder_bias"]) @ sd["encoder.weight"].T
    f = (x_enc + sd["gate_bias"] > 0) * torch.relu(torch.exp(sd["r_mag"]) * x_enc + sd["mag_bias"])
    assert 0 < active_fraction(f) < 1
    expected = f @ sd["decoder.weight"].T + sd["decoder_bias"]
    assert_close(sae.encode(x), f, what="Gated encode")
    assert_close(sae(x), expected, what="Gated")


def _topk_style_state(seed: int, threshold: float) -> dict[str, torch.Tensor]:
    return {
        "encoder.weight": randn(D_SAE, D_IN, seed=seed),
        "encoder.bias": randn(D_SAE, seed=seed + 1, scale=0.1),
        "decoder.weight": randn(D_IN, D_SAE, seed=seed + 2),
        "b_dec": randn(D_IN, seed=seed + 3),
        "k": torch.tensor(K, dtype=torch.int64),
        "threshold": torch.tensor(threshold),
    }


def test_dictionary_learning_topk(tmp_path):
    sd = _topk_style_state(50, threshold=-1.0)  # AutoEncoderTopK: threshold unused at k-sparse
    _write_ae(tmp_path, sd, _trainer_config("AutoEncoderTopK", k=K))
    sae = fastsae.SAE.load_from_disk(tmp_path)
    assert isinstance(sae, fastsae.TopKSAE)
    assert sae.cfg.k == K
    assert sae.cfg.metadata.hook_name == "blocks.2.hook_resid_post"

    x = random_input()
    post_relu = torch.relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
    vals, idx = post_relu.topk(K, dim=-1, sorted=False)
    f = torch.zeros_like(post_relu).scatter(-1, idx, vals)
    expected = f @ sd["decoder.weight"].T + sd["b_dec"]
    assert_close(sae.encode(x), f, what="AutoEncoderTopK encode")
    assert_close(sae(x), expected, what="AutoEncoderTopK")


def test_dictionary_learning_batch_topk(tmp_path):
    sd = _topk_style_state(60, threshold=0.4)
    _write_ae(tmp_path, sd, _trainer_config("BatchTopKSAE", k=K))
    sae = fastsae.SAE.load_from_disk(tmp_path)
    assert isinstance(sae, fastsae.JumpReLUSAE)  # saved as JumpReLU, as SAELens does
    assert sae.cfg.apply_b_dec_to_input is True

    x = random_input()
    post_relu = torch.relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
    f = post_relu * (post_relu > sd["threshold"])
    assert 0 < active_fraction(f) < 1
    expected = f @ sd["decoder.weight"].T + sd["b_dec"]
    assert_close(sae.encode(x), f, what="BatchTopKSAE encode")
    assert_close(sae(x), expected, what="BatchTopKSAE")


def test_dictionary_learning_matryoshka_batch_topk_without_config(tmp_path):
    sd = {
        "W_enc": randn(D_IN, D_SAE, seed=70),
        "b_enc": randn(D_SAE, seed=71, scale=0.1),
        "W_dec": randn(D_SAE, D_IN, seed=72),
        "b_dec": randn(D_IN, seed=73),
        "k": torch.tensor(K),
        "threshold": torch.tensor(0.3),
    }
    _write_ae(tmp_path, sd)  # detected from its keys (W_enc + k)
    sae = fastsae.SAE.load_from_disk(tmp_path)
    assert isinstance(sae, fastsae.JumpReLUSAE)

    x = random_input()
    post_relu = torch.relu((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"])
    f = post_relu * (post_relu > sd["threshold"])
    assert 0 < active_fraction(f) < 1
    assert_close(sae(x), f @ sd["W_dec"] + sd["b_dec"], what="Matryoshka")


@pytest.mark.parametrize("with_config", [True, False])
def test_dictionary_learning_jumprelu(with_config, tmp_path):
    sd = {
        "W_enc": randn(D_IN, D_SAE, seed=80),
        "b_enc": randn(D_SAE, seed=81, scale=0.1),
        "W_dec": randn(D_SAE, D_IN, seed=82),
        "b_dec": randn(D_IN, seed=83),
        "threshold": randn(D_SAE, seed=84).abs(),
    }
    _write_ae(tmp_path, sd, _trainer_config("JumpReluAutoEncoder") if with_config else None)
    sae = fastsae.SAE.load_from_disk(tmp_path)
    assert isinstance(sae, fastsae.JumpReLUSAE)
    assert sae.cfg.apply_b_dec_to_input is False

    x = random_input()
    pre = x @ sd["W_enc"] + sd["b_enc"]  # no b_dec subtraction
    f = torch.relu(pre * (pre > sd["threshold"]))
    assert 0 < active_fraction(f) < 1
    assert_close(sae.encode(x), f, what="JumpReluAutoEncoder encode")
    assert_close(sae(x), f @ sd["W_dec"] + sd["b_dec"], what="JumpReluAutoEncoder")


def test_dictionary_learning_dtype_override(tmp_path):
    sd = {
        "encoder.weight": randn(D_SAE, D_IN, seed=30),
        "encoder.bias": randn(D_SAE, seed=31, scale=0.1),
        "decoder.weight": randn(D_IN, D_SAE, seed=32),
        "bias": randn(D_IN, seed=33),
    }
    _write_ae(tmp_path, sd)
    sae = fastsae.SAE.load_from_disk(tmp_path, dtype="float64")
    assert sae.W_enc.dtype == torch.float64
    x = random_input().double()
    f = torch.relu((x - sd["bias"]) @ sd["encoder.weight"].T.double() + sd["encoder.bias"])
    assert_close(sae(x), f @ sd["decoder.weight"].T.double() + sd["bias"], tol=1e-12)


def test_dictionary_learning_unsupported_class(tmp_path):
    sd = {"encoder.weight": torch.zeros(D_SAE, D_IN), "bias": torch.zeros(D_IN)}
    _write_ae(tmp_path, sd, _trainer_config("CrossCoder"))
    with pytest.raises(ValueError, match="'CrossCoder' is not supported") as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert "config.json" in str(e.value)


def test_dictionary_learning_unrecognisable_keys(tmp_path):
    _write_ae(tmp_path, {"mystery": torch.zeros(3)})
    with pytest.raises(ValueError, match="cannot tell the dictionary_learning class") as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert "mystery" in str(e.value)


def test_dictionary_learning_missing_key(tmp_path):
    sd = {"encoder.weight": torch.zeros(D_SAE, D_IN), "decoder.weight": torch.zeros(D_IN, D_SAE)}
    _write_ae(tmp_path, sd, _trainer_config("AutoEncoder"))
    with pytest.raises(ValueError, match=r"missing weights \['encoder.bias', 'bias'\]") as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert str(tmp_path / "ae.pt") in str(e.value)


def test_dictionary_learning_corrupt_ae_pt(tmp_path):
    (tmp_path / "ae.pt").write_bytes(b"garbage: this is not a torch file")
    with pytest.raises(ValueError, match="corrupt") as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert str(tmp_path / "ae.pt") in str(e.value)


def test_dictionary_learning_truncated_ae_pt(tmp_path):
    sd = {"encoder.weight": torch.zeros(D_SAE, D_IN), "bias": torch.zeros(D_IN)}
    torch.save(sd, tmp_path / "ae.pt")
    data = (tmp_path / "ae.pt").read_bytes()
    (tmp_path / "ae.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt") as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert str(tmp_path / "ae.pt") in str(e.value)


def test_dictionary_learning_pickled_non_state_dict(tmp_path):
    torch.save([torch.zeros(3)], tmp_path / "ae.pt")
    with pytest.raises(ValueError, match="state dict") as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert str(tmp_path / "ae.pt") in str(e.value)


def test_dictionary_learning_shape_contradicting_config(tmp_path):
    sd = {
        "encoder.weight": randn(D_SAE, D_IN, seed=30),
        "encoder.bias": randn(D_SAE, seed=31),
        "decoder.weight": randn(D_IN, D_SAE, seed=32),
        "bias": randn(D_IN, seed=33),
    }
    _write_ae(tmp_path, sd, _trainer_config("AutoEncoder", dict_size=D_SAE * 2))
    with pytest.raises(ValueError, match="has shape") as e:
        fastsae.SAE.load_from_disk(tmp_path)
    assert str(tmp_path) in str(e.value)


# --------------------------------------------------------------------------- detection
def test_empty_directory_lists_what_was_looked_for(tmp_path):
    (tmp_path / "README.md").write_text("nothing here")
    with pytest.raises(FileNotFoundError) as e:
        fastsae.SAE.load_from_disk(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg
    for name in ("cfg.json", "sae_weights.safetensors", "sae.safetensors", "params.npz", "ae.pt"):
        assert name in msg, name
    assert "README.md" in msg  # and what it found instead


def test_explicit_converter(tmp_path):
    from fastsae.loading.converters import sparsify_disk_loader

    t = _write_sparsify(tmp_path / "layers.1")
    sae = fastsae.SAE.load_from_disk(tmp_path / "layers.1", converter=sparsify_disk_loader)
    x = random_input()
    assert_close(sae(x), sparsify_forward(x, t, K), what="explicit converter")


def test_converted_sae_saves_and_reloads_in_sae_lens(tmp_path):
    """A converted SAE is an ordinary SAE: saved, it loads in sae-lens with the same outputs."""
    import sae_lens

    t = _write_sparsify(tmp_path / "layers.4")
    sae = fastsae.SAE.load_from_disk(tmp_path / "layers.4")
    sae.save_model(tmp_path / "converted")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "converted")
    assert theirs.cfg.metadata.hook_name == "blocks.4.hook_resid_post"
    x = random_input()
    assert_close(theirs(x), sparsify_forward(x, t, K), what="sae_lens on converted")
