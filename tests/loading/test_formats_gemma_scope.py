"""The ``gemma_3`` (Gemma Scope 2) and ``gemma_2_transcoder`` registry formats, offline.

Each test writes a tiny folder in Google DeepMind's own layout into a fake Hugging Face
cache (the ``hub`` fixture) and loads it with fastsae and with sae-lens 6.54.12: same
class, same config and metadata, same encode / decode / forward.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from fake_hub import sae_lens_from_pretrained
from sae_lens.loading import pretrained_sae_loaders as sl_loaders
from sae_testing import assert_close
from safetensors.torch import save_file

import fastsae
from fastsae.loading import pretrained
from fastsae.loading.formats.gemma_scope import (
    gemma_2_transcoder_huggingface_loader,
    gemma_3_sae_huggingface_loader,
    gemma_3_site,
)
from fastsae.loading.pretrained import PretrainedRelease, get_pretrained_saes_directory

D_IN, D_SAE, D_OUT = 12, 24, 10
N_TARGETS = 3  # target layers of the fake CLT layer

CFG_KEYS = [
    "architecture",
    "d_in",
    "d_sae",
    "d_out",
    "dtype",
    "apply_b_dec_to_input",
    "normalize_activations",
    "reshape_activations",
]
METADATA_KEYS = [
    "model_name",
    "hook_name",
    "hook_name_out",
    "hook_head_index",
    "hf_hook_name",
    "hf_hook_name_out",
    "neuronpedia_id",
    "context_size",
    "prepend_bos",
    "dataset_path",
    "model_from_pretrained_kwargs",
]


def random_input(d: int = D_IN) -> torch.Tensor:
    return torch.randn(7, d, generator=torch.Generator().manual_seed(7))


def assert_same_sae(ours: fastsae.SAE, theirs, x: torch.Tensor) -> None:
    """Same class name, config, metadata and outputs as the sae-lens SAE."""
    assert type(ours).__name__ == type(theirs).__name__
    ours_cfg, theirs_cfg = ours.cfg.to_dict(), theirs.cfg.to_dict()
    for key in CFG_KEYS:
        assert ours_cfg.get(key) == theirs_cfg.get(key), key
    ours_md, theirs_md = ours_cfg["metadata"], theirs_cfg["metadata"]
    for key in METADATA_KEYS:
        assert ours_md.get(key) == theirs_md.get(key), key
    with torch.no_grad():
        acts = theirs.encode(x)
        assert_close(ours.encode(x), acts, what="encode")
        assert_close(ours.decode(acts), theirs.decode(acts), what="decode")
        assert_close(ours(x), theirs(x), what="forward")


# ---------------------------------------------------------------------------- gemma_3
def gemma_3_weights(d_in: int = D_IN, d_out: int | None = None, *, clt: bool = False, affine=False):
    """Random weights in the Gemma Scope 2 file layout (``w_enc [d_in, d_sae]``...)."""
    g = torch.Generator().manual_seed(3)
    d_out = d_in if d_out is None else d_out
    dec_shape = (D_SAE, N_TARGETS, d_out) if clt else (D_SAE, d_out)
    t = {
        "w_enc": torch.randn(d_in, D_SAE, generator=g),
        "w_dec": torch.randn(*dec_shape, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
        "b_dec": torch.randn(d_out, generator=g),
        "threshold": torch.rand(D_SAE, generator=g),
    }
    if affine:
        t["affine_skip_connection"] = torch.randn(d_in, d_out, generator=g)
    return t


def write_gemma_3(
    hub, repo_id: str, folder: str, *, config: dict | None, clt: bool = False, affine=False
) -> dict[str, torch.Tensor]:
    snap = hub.snapshot(repo_id)
    site = gemma_3_site(folder)
    d_out = D_OUT if site in ("transcoder", "clt") else D_IN
    weights = gemma_3_weights(D_IN, d_out, clt=clt, affine=affine)
    # a CLT layer clt/<variant>/params_layer_L is the file clt/<variant>/params_layer_L.safetensors
    file = snap / f"{folder}.safetensors" if clt else snap / folder / "params.safetensors"
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(file))
    if config is not None:
        (snap / folder).mkdir(parents=True, exist_ok=True)
        (snap / folder / "config.json").write_text(json.dumps(config))
    return weights


def publisher_config(repo_id: str, folder: str, affine: bool) -> dict:
    """A config.json as Gemma Scope 2 writes it, with values the names would not give
    (a ``gemma-v3-...`` model name and the multimodal models' module paths)."""
    layer = int(re.search(r"layer_(\d+)", folder).group(1))
    size_variant = repo_id.removeprefix("google/gemma-scope-2-")
    base = f"model.language_model.layers.{layer}"
    cfg = {
        "architecture": "jump_relu",
        "model_name": f"gemma-v3-{size_variant}",
        "hf_hook_point_in": f"{base}.pre_feedforward_layernorm.output",
        "width": D_SAE,
        "l0": 50,
    }
    if gemma_3_site(folder) in ("transcoder", "clt"):
        cfg["hf_hook_point_out"] = f"{base}.post_feedforward_layernorm.output"
        cfg["affine_connection"] = affine
    return cfg


# release, sae_id, fastsae class, hook_name, hook_name_out, model name without config.json
GEMMA_3_CASES = [
    (
        "gemma-scope-2-270m-pt-res",
        "layer_12_width_16k_l0_medium",
        fastsae.JumpReLUSAE,
        "blocks.12.hook_resid_post",
        None,
        "google/gemma-3-270m",
    ),
    (
        "gemma-scope-2-12b-pt-res-all",
        "layer_0_width_16k_l0_big",
        fastsae.JumpReLUSAE,
        "blocks.0.hook_resid_post",
        None,
        "google/gemma-3-12b-pt",
    ),
    (
        "gemma-scope-2-1b-pt-att",
        "layer_13_width_16k_l0_big",
        fastsae.JumpReLUSAE,
        "blocks.13.attn.hook_z",
        None,
        "google/gemma-3-1b-pt",
    ),
    (
        "gemma-scope-2-4b-it-mlp",
        "layer_17_width_16k_l0_big",
        fastsae.JumpReLUSAE,
        "blocks.17.hook_mlp_out",
        None,
        "google/gemma-3-4b-it",
    ),
    (
        "gemma-scope-2-1b-pt-mlp-all",
        "layer_0_width_16k_l0_big",
        fastsae.JumpReLUSAE,
        "blocks.0.hook_mlp_out",
        None,
        "google/gemma-3-1b-pt",
    ),
    (
        "gemma-scope-2-4b-pt-transcoders",
        "transcoder/layer_17_width_16k_l0_big",
        fastsae.JumpReLUTranscoder,
        "blocks.17.hook_mlp_in",
        "blocks.17.hook_mlp_out",
        "google/gemma-3-4b-pt",
    ),
    (
        "gemma-scope-2-270m-pt-transcoders",
        "transcoder/layer_9_width_16k_l0_small_affine",
        fastsae.JumpReLUSkipTranscoder,
        "blocks.9.hook_mlp_in",
        "blocks.9.hook_mlp_out",
        "google/gemma-3-270m",
    ),
    (
        "gemma-scope-2-1b-it-transcoders-all",
        "layer_0_width_16k_l0_big_affine",
        fastsae.JumpReLUSkipTranscoder,
        "blocks.0.hook_mlp_in",
        "blocks.0.hook_mlp_out",
        "google/gemma-3-1b-it",
    ),
]


@pytest.mark.parametrize("with_config", [True, False], ids=["config.json", "names-only"])
@pytest.mark.parametrize(
    ("release", "sae_id", "cls", "hook", "hook_out", "model"),
    GEMMA_3_CASES,
    ids=[c[0] for c in GEMMA_3_CASES],
)
def test_gemma_3_release_matches_sae_lens(
    hub, monkeypatch, release, sae_id, cls, hook, hook_out, model, with_config
):
    info = get_pretrained_saes_directory()[release]
    assert info.conversion_func == "gemma_3"
    folder = info.saes_map[sae_id]
    affine = "affine" in folder
    config = publisher_config(info.repo_id, folder, affine) if with_config else None
    weights = write_gemma_3(hub, info.repo_id, folder, config=config, affine=affine)

    sae = fastsae.SAE.from_pretrained(release, sae_id)
    theirs = sae_lens_from_pretrained(monkeypatch, release, sae_id)
    assert type(sae) is cls
    md = sae.cfg.metadata
    assert md.hook_name == hook
    assert md.model_name == model  # the config's gemma-v3-... normalises to the same id
    assert md.neuronpedia_id == info.neuronpedia_id.get(sae_id)
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (D_IN, D_SAE)
    if hook_out is None:
        assert md.hook_name_out is None
        assert sae.cfg.reshape_activations == "none"  # hook_z SAEs read the flat heads
    else:
        assert md.hook_name_out == hook_out
        assert sae.cfg.d_out == D_OUT
    expected_hf = config["hf_hook_point_in"] if with_config else None
    if expected_hf is not None:
        assert md.hf_hook_name == expected_hf
    else:
        assert md.hf_hook_name.startswith(f"model.layers.{hook.split('.')[1]}.")
    if affine:  # stored [d_in, d_out], SAELens's W_skip is [d_out, d_in]
        assert torch.equal(sae.W_skip, weights["affine_skip_connection"].T)
    assert_same_sae(sae, theirs, random_input())


def test_gemma_3_forward_by_hand(hub):
    """The affine skip transcoder's output, written out from the raw file."""
    release, sae_id = (
        "gemma-scope-2-4b-pt-transcoders",
        "transcoder/layer_17_width_16k_l0_big_affine",
    )
    info = get_pretrained_saes_directory()[release]
    w = write_gemma_3(hub, info.repo_id, info.saes_map[sae_id], config=None, affine=True)
    sae = fastsae.SAE.from_pretrained(release, sae_id)
    x = random_input()
    h = x @ w["w_enc"] + w["b_enc"]
    acts = torch.relu(h) * (h > w["threshold"])
    assert acts.count_nonzero() > 0
    expected = acts @ w["w_dec"] + w["b_dec"] + x @ w["affine_skip_connection"]
    with torch.no_grad():
        assert_close(sae(x), expected, what="skip transcoder forward")


def use_clt_release(monkeypatch, repo_id: str, folder: str) -> str:
    """The registry plus one Gemma Scope 2 CLT release (the shipped registry has none)."""
    name = "gemma-scope-2-270m-pt-clt-fake"
    directory = dict(get_pretrained_saes_directory())
    directory[name] = PretrainedRelease(
        release=name,
        repo_id=repo_id,
        model="google/gemma-3-270m",
        conversion_func="gemma_3",
        saes_map={"layer_3": folder},
        neuronpedia_id={"layer_3": "gemma-3-270m/3-clt-fake"},
    )
    monkeypatch.setattr(pretrained, "get_pretrained_saes_directory", lambda: directory)
    return name


@pytest.mark.parametrize("with_config", [True, False], ids=["config.json", "names-only"])
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
def test_gemma_3_clt_layer_matches_sae_lens(hub, monkeypatch, affine, with_config):
    repo_id = "google/gemma-scope-2-270m-pt"
    variant = "width_262k_l0_medium_affine" if affine else "width_262k_l0_medium"
    folder = f"clt/{variant}/params_layer_3"
    config = publisher_config(repo_id, folder, affine) if with_config else None
    w = write_gemma_3(hub, repo_id, folder, config=config, clt=True, affine=affine)
    release = use_clt_release(monkeypatch, repo_id, folder)

    with pytest.warns(UserWarning, match="sum of its 3 per-target-layer decoders"):
        sae = fastsae.SAE.from_pretrained(release, "layer_3")
    theirs = sae_lens_from_pretrained(
        monkeypatch, repo_id, folder, converter=sl_loaders.gemma_3_sae_huggingface_loader
    )
    cls = fastsae.JumpReLUSkipTranscoder if affine else fastsae.JumpReLUTranscoder
    assert type(sae) is cls
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_mlp_in"
    assert sae.cfg.metadata.hook_name_out == "blocks.3.hook_mlp_out"
    assert sae.cfg.metadata.neuronpedia_id == "gemma-3-270m/3-clt-fake"
    assert torch.allclose(sae.W_dec, w["w_dec"].sum(dim=1))
    sae.cfg.metadata.neuronpedia_id = None  # sae-lens loaded it by repo id: no registry entry
    assert_same_sae(sae, theirs, random_input())


def test_gemma_3_dtype_and_bfloat16_file(hub):
    release, sae_id = "gemma-scope-2-270m-pt-res", "layer_12_width_16k_l0_big"
    info = get_pretrained_saes_directory()[release]
    folder = info.saes_map[sae_id]
    w = {k: v.to(torch.bfloat16) for k, v in gemma_3_weights().items()}
    target = hub.snapshot(info.repo_id) / folder
    target.mkdir(parents=True)
    save_file(w, str(target / "params.safetensors"))
    sae = fastsae.SAE.from_pretrained(release, sae_id, dtype="float64")
    assert sae.cfg.dtype == "float64"
    assert all(p.dtype == torch.float64 for p in sae.parameters())
    assert torch.equal(sae.W_enc, w["w_enc"].double())


# ---------------------------------------------------------------------------- gemma_3 errors
def test_gemma_3_missing_weights_names_repo_and_file(hub):
    release, sae_id = "gemma-scope-2-1b-pt-att", "layer_13_width_16k_l0_big"
    info = get_pretrained_saes_directory()[release]
    folder = info.saes_map[sae_id]
    (hub.snapshot(info.repo_id) / folder).mkdir(parents=True)
    (hub.snapshot(info.repo_id) / folder / "config.json").write_text(
        json.dumps(publisher_config(info.repo_id, folder, False))
    )
    with pytest.raises(FileNotFoundError, match=rf"{info.repo_id}: missing {folder}/params\."):
        fastsae.SAE.from_pretrained(release, sae_id)


def test_gemma_3_missing_clt_layer_file_names_it(hub, monkeypatch):
    repo_id, folder = "google/gemma-scope-2-270m-pt", "clt/width_262k_l0_medium/params_layer_3"
    hub.snapshot(repo_id)
    release = use_clt_release(monkeypatch, repo_id, folder)
    with pytest.raises(FileNotFoundError, match=rf"missing {folder}\.safetensors"):
        fastsae.SAE.from_pretrained(release, "layer_3")


def test_gemma_3_corrupt_weights_names_file(hub):
    release, sae_id = "gemma-scope-2-4b-it-mlp", "layer_17_width_16k_l0_big"
    info = get_pretrained_saes_directory()[release]
    target = hub.snapshot(info.repo_id) / info.saes_map[sae_id]
    target.mkdir(parents=True)
    (target / "params.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=r"params\.safetensors: truncated or corrupt"):
        fastsae.SAE.from_pretrained(release, sae_id)


def test_gemma_3_corrupt_config_names_file(hub):
    release, sae_id = "gemma-scope-2-4b-it-mlp", "layer_17_width_16k_l0_big"
    info = get_pretrained_saes_directory()[release]
    folder = info.saes_map[sae_id]
    write_gemma_3(hub, info.repo_id, folder, config=None)
    (hub.snapshot(info.repo_id) / folder / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        fastsae.SAE.from_pretrained(release, sae_id)


def test_gemma_3_missing_tensor_and_wrong_architecture(hub):
    release, sae_id = "gemma-scope-2-4b-it-mlp", "layer_17_width_16k_l0_big"
    info = get_pretrained_saes_directory()[release]
    folder = info.saes_map[sae_id]
    target = hub.snapshot(info.repo_id) / folder
    target.mkdir(parents=True)
    w = gemma_3_weights()
    del w["threshold"]
    save_file(w, str(target / "params.safetensors"))
    with pytest.raises(ValueError, match=r"params\.safetensors: missing weights \['threshold'\]"):
        fastsae.SAE.from_pretrained(release, sae_id)

    cfg = publisher_config(info.repo_id, folder, False) | {"architecture": "topk"}
    (target / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: architecture 'topk'"):
        fastsae.SAE.from_pretrained(release, sae_id)


def test_gemma_3_skip_connection_must_agree_with_config(hub):
    release = "gemma-scope-2-4b-pt-transcoders"
    info = get_pretrained_saes_directory()[release]
    # config says affine, file has no affine_skip_connection
    folder = info.saes_map["transcoder/layer_17_width_16k_l0_big_affine"]
    write_gemma_3(hub, info.repo_id, folder, config=publisher_config(info.repo_id, folder, True))
    with pytest.raises(ValueError, match="no 'affine_skip_connection'"):
        fastsae.SAE.from_pretrained(release, "transcoder/layer_17_width_16k_l0_big_affine")
    # file has one, the config says there is none
    folder = info.saes_map["transcoder/layer_17_width_16k_l0_big"]
    write_gemma_3(
        hub, info.repo_id, folder, config=publisher_config(info.repo_id, folder, False), affine=True
    )
    with pytest.raises(ValueError, match="has an 'affine_skip_connection'"):
        fastsae.SAE.from_pretrained(release, "transcoder/layer_17_width_16k_l0_big")


def test_gemma_3_clt_decoder_must_be_per_target_layer(hub, monkeypatch):
    repo_id, folder = "google/gemma-scope-2-270m-pt", "clt/width_262k_l0_medium/params_layer_3"
    snap = hub.snapshot(repo_id)
    (snap / "clt/width_262k_l0_medium").mkdir(parents=True)
    save_file(gemma_3_weights(), str(snap / f"{folder}.safetensors"))  # 2-D w_dec
    release = use_clt_release(monkeypatch, repo_id, folder)
    with pytest.raises(ValueError, match=r"w_dec has shape \[24, 12\], expected \[d_sae, n_target"):
        fastsae.SAE.from_pretrained(release, "layer_3")


@pytest.mark.parametrize(
    ("folder", "match"),
    [
        ("embedding/layer_3_width_16k", "names no site"),
        ("resid_post/layer_3_transcoder", "names several sites"),
        ("resid_post/width_16k_l0_big", "no layer_<N>"),
    ],
)
def test_gemma_3_folder_names_that_say_nothing(hub, folder, match):
    with pytest.raises(ValueError, match=match):
        gemma_3_sae_huggingface_loader("google/gemma-scope-2-1b-pt", folder)


# ---------------------------------------------------------------------------- gemma_2_transcoder
def gemma_2_transcoder_weights(d_in: int, d_sae: int, keys=("W_enc", "W_dec", "b_enc", "b_dec")):
    g = torch.Generator().manual_seed(5)
    w_enc, w_dec = torch.randn(d_in, d_sae, generator=g), torch.randn(d_sae, d_in, generator=g)
    b_enc, b_dec = torch.randn(d_sae, generator=g) * 0.1, torch.randn(d_in, generator=g)
    arrays = dict(zip(keys, (w_enc, w_dec, b_enc, b_dec), strict=True))
    arrays["threshold"] = torch.rand(d_sae, generator=g) * 0.5
    return {k: v.numpy() for k, v in arrays.items()}


def test_gemma_2_transcoder_release(hub):
    release, sae_id = "gemma-scope-2b-pt-transcoders", "layer_3/width_16k/average_l0_54"
    info = get_pretrained_saes_directory()[release]
    assert info.conversion_func == "gemma_2_transcoder"
    target = hub.snapshot(info.repo_id) / info.saes_map[sae_id]
    target.mkdir(parents=True)
    # other spellings of the weights' names that Gemma Scope transcoder files use
    w = gemma_2_transcoder_weights(D_IN, D_SAE, keys=("W_E", "wdec", "bEnc", "b_d"))
    np.savez(target / "params.npz", **w)

    sae = fastsae.SAE.from_pretrained(release, sae_id)
    assert type(sae) is fastsae.JumpReLUTranscoder
    md = sae.cfg.metadata
    assert (md.model_name, md.hook_name, md.hook_name_out) == (
        "gemma-2-2b",
        "blocks.3.ln2.hook_normalized",
        "blocks.3.hook_mlp_out",
    )
    assert md.neuronpedia_id == "gemma-2-2b/3-gemmascope-transcoder-16k"
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.d_out) == (D_IN, D_SAE, D_IN)
    assert not sae.cfg.apply_b_dec_to_input
    t = {k: torch.from_numpy(v) for k, v in w.items()}
    x = random_input()
    h = x @ t["W_E"] + t["bEnc"]
    acts = torch.relu(h) * (h > t["threshold"])
    assert acts.count_nonzero() > 0
    with torch.no_grad():
        assert_close(sae(x), acts @ t["wdec"] + t["b_d"], what="gemma 2 transcoder forward")


def test_gemma_2_transcoder_matches_sae_lens(hub, monkeypatch):
    # sae-lens takes d_in from the model (2304 for gemma-2-2b) and d_sae from the
    # folder's width: a 1k-wide transcoder is the smallest file it can read
    repo_id, folder = "google/gemma-scope-2b-pt-transcoders", "layer_5/width_1k/average_l0_7"
    target = hub.snapshot(repo_id) / folder
    target.mkdir(parents=True)
    np.savez(target / "params.npz", **gemma_2_transcoder_weights(2304, 1024))

    with pytest.warns(UserWarning, match="registered"):
        sae = fastsae.SAE.from_pretrained(
            repo_id, folder, converter=gemma_2_transcoder_huggingface_loader
        )
    with pytest.warns(UserWarning, match="registered"):
        theirs = sae_lens_from_pretrained(
            monkeypatch,
            repo_id,
            folder,
            converter=sl_loaders.gemma_2_transcoder_huggingface_loader,
        )
    assert sae.cfg.metadata.hook_name == "blocks.5.ln2.hook_normalized"
    assert_same_sae(sae, theirs, random_input(2304))


def test_gemma_2_transcoder_errors(hub, monkeypatch):
    release, sae_id = "gemma-scope-2b-pt-transcoders", "layer_3/width_16k/average_l0_54"
    info = get_pretrained_saes_directory()[release]
    folder = info.saes_map[sae_id]
    target = hub.snapshot(info.repo_id) / folder
    target.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=rf"{info.repo_id}: missing {folder}/params\.npz"):
        fastsae.SAE.from_pretrained(release, sae_id)

    (target / "params.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ValueError, match=r"params\.npz: truncated or corrupt npz"):
        fastsae.SAE.from_pretrained(release, sae_id)

    w = gemma_2_transcoder_weights(D_IN, D_SAE)
    del w["threshold"]
    np.savez(target / "params.npz", **w)
    with pytest.raises(ValueError, match=r"params\.npz: missing weights \['threshold'\]"):
        fastsae.SAE.from_pretrained(release, sae_id)

    with pytest.raises(ValueError, match="cannot tell which Gemma 2 model"):
        gemma_2_transcoder_huggingface_loader("user/transcoders", folder)
