"""The circuit-tracer transcoder formats (``mwhanna_transcoder``,
``mntss_clt_layer_transcoder``), offline.

Each test writes tiny files in the publisher's own repo layout into a fake Hugging Face
cache (the ``hub`` fixture) and loads them with fastsae and with sae-lens 6.54.12.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from fake_hub import sae_lens_from_pretrained
from sae_testing import assert_close
from safetensors.torch import save_file
from test_formats_gemma_scope import assert_same_sae

import fastsae
from fastsae.loading.formats.circuit_tracer import (
    mntss_clt_layer_huggingface_loader,
    mwhanna_transcoder_huggingface_loader,
)
from fastsae.loading.pretrained import get_pretrained_saes_directory

D_MODEL, D_SAE, N_TARGETS = 12, 24, 3


def random_input(d: int = D_MODEL) -> torch.Tensor:
    return torch.randn(7, d, generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------------------- mwhanna_transcoder
def mwhanna_weights(skip: bool = False) -> dict[str, torch.Tensor]:
    """A layer file as published: ``W_enc [d_sae, d_in]``, ``W_dec [d_sae, d_out]``."""
    g = torch.Generator().manual_seed(4)
    t = {
        "W_enc": torch.randn(D_SAE, D_MODEL, generator=g),
        "W_dec": torch.randn(D_SAE, D_MODEL, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
        "b_dec": torch.randn(D_MODEL, generator=g),
    }
    if skip:
        t["W_skip"] = torch.randn(D_MODEL, D_MODEL, generator=g) * 0.1
    return t


def write_mwhanna(
    hub,
    repo_id: str,
    layer_file: str,
    *,
    wandb_name: str | None = "wandb-config.yaml",
    model_name: str | None = None,
    skip: bool = False,
) -> dict[str, torch.Tensor]:
    snap = hub.snapshot(repo_id)
    w = mwhanna_weights(skip)
    save_file(w, str(snap / layer_file))
    if wandb_name is not None:  # a W&B run config: every entry is {value: ...}
        wandb = {
            "d_model": {"value": D_MODEL},
            "d_feature": {"value": D_SAE},
            "batch_size": {"value": 4096},
            "lr": {"desc": None, "value": 0.0002},
        }
        (snap / wandb_name).write_text(yaml.safe_dump(wandb))
    if model_name is not None:
        cfg = {
            "model_name": model_name,
            "model_kind": "transcoder_set",
            "feature_input_hook": "mlp.hook_in",
            "feature_output_hook": "mlp.hook_out",
        }
        (snap / "config.yaml").write_text(yaml.safe_dump(cfg))
    return w


MWHANNA_CASES = [
    # release, sae_id, W&B config file name, config.yaml model (None: no config.yaml), model
    ("mwhanna-qwen3-4b-transcoders", "layer_5", "wandb-config.yaml", "Qwen/Qwen3-4B", "Qwen/Qwen3-4B"),
    ("mwhanna-qwen3-0.6b-transcoders-lowl0", "layer_2", "wanb-config.yaml", "Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B"),
    ("mwhanna-qwen3-14b-transcoders", "layer_11", "wandb-config.yaml", None, "Qwen/Qwen3-14B"),
    ("mwhanna-qwen3-1.7b-transcoders-lowl0", "layer_0", "wandb-config.yaml", None, "Qwen/Qwen3-1.7B"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("release", "sae_id", "wandb_name", "cfg_model", "model"),
    MWHANNA_CASES,
    ids=[c[0] for c in MWHANNA_CASES],
)
def test_mwhanna_release_matches_sae_lens(
    hub, monkeypatch, release, sae_id, wandb_name, cfg_model, model
):
    info = get_pretrained_saes_directory()[release]
    assert info.conversion_func == "mwhanna_transcoder"
    layer_file = info.saes_map[sae_id]
    w = write_mwhanna(hub, info.repo_id, layer_file, wandb_name=wandb_name, model_name=cfg_model)

    sae = fastsae.SAE.from_pretrained(release, sae_id)
    theirs = sae_lens_from_pretrained(monkeypatch, release, sae_id)
    assert type(sae) is fastsae.Transcoder
    layer = int(sae_id.removeprefix("layer_"))
    md = sae.cfg.metadata
    assert md.model_name == model
    assert md.hook_name == f"blocks.{layer}.mlp.hook_in"
    assert md.hook_name_out == f"blocks.{layer}.hook_mlp_out"
    assert md.neuronpedia_id == info.neuronpedia_id[sae_id]
    assert md.model_from_pretrained_kwargs == {"fold_ln": False}
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.d_out) == (D_MODEL, D_SAE, D_MODEL)
    assert torch.equal(sae.W_enc, w["W_enc"].T)  # stored [d_sae, d_in]
    assert_same_sae(sae, theirs, random_input())


def test_mwhanna_skip_connection_is_kept(hub):
    release, sae_id = "mwhanna-qwen3-4b-transcoders", "layer_3"
    info = get_pretrained_saes_directory()[release]
    w = write_mwhanna(
        hub, info.repo_id, info.saes_map[sae_id], model_name="Qwen/Qwen3-4B", skip=True
    )
    sae = fastsae.SAE.from_pretrained(release, sae_id)
    assert type(sae) is fastsae.SkipTranscoder
    x = random_input()
    acts = torch.relu(x @ w["W_enc"].T + w["b_enc"])
    assert acts.count_nonzero() > 0
    expected = acts @ w["W_dec"] + w["b_dec"] + x @ w["W_skip"].T
    with torch.no_grad():
        assert_close(sae(x), expected, what="mwhanna skip transcoder forward")


def test_mwhanna_errors(hub):
    release, sae_id = "mwhanna-qwen3-4b-transcoders", "layer_3"
    info = get_pretrained_saes_directory()[release]
    repo = info.repo_id
    write_mwhanna(hub, repo, "layer_3.safetensors", wandb_name=None, model_name="Qwen/Qwen3-4B")
    with pytest.raises(FileNotFoundError, match=r"wandb-config\.yaml', 'wanb-config\.yaml"):
        fastsae.SAE.from_pretrained(release, sae_id)

    snap = hub.snapshot(repo)
    (snap / "wandb-config.yaml").write_text("d_model: {value: 12}\nd_feature: [oops")
    with pytest.raises(ValueError, match=r"wandb-config\.yaml: not valid YAML"):
        fastsae.SAE.from_pretrained(release, sae_id)
    (snap / "wandb-config.yaml").write_text(yaml.safe_dump({"d_model": {"value": D_MODEL}}))
    with pytest.raises(ValueError, match=r"wandb-config\.yaml: config has no 'd_feature'"):
        fastsae.SAE.from_pretrained(release, sae_id)

    write_mwhanna(hub, repo, "layer_3.safetensors", model_name="Qwen/Qwen3-4B")
    (snap / "layer_3.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"layer_3\.safetensors: truncated or corrupt"):
        fastsae.SAE.from_pretrained(release, sae_id)
    (snap / "layer_3.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{repo}: missing layer_3\.safetensors"):
        fastsae.SAE.from_pretrained(release, sae_id)

    w = mwhanna_weights()
    del w["b_dec"]
    save_file(w, str(snap / "layer_3.safetensors"))
    with pytest.raises(ValueError, match=r"layer_3\.safetensors: missing weights \['b_dec'\]"):
        fastsae.SAE.from_pretrained(release, sae_id)

    with pytest.raises(ValueError, match=r"layer_<N>\.safetensors"):
        mwhanna_transcoder_huggingface_loader(repo, "encoder.safetensors")

    other = "user/transcoders"
    write_mwhanna(hub, other, "layer_1.safetensors")  # no config.yaml, no size in the id
    with pytest.raises(ValueError, match="names no Qwen3 size"):
        mwhanna_transcoder_huggingface_loader(other, "layer_1.safetensors")


# ---------------------------------------------------------------------------- mntss CLT layer
def write_mntss(hub, repo_id: str, layer: str) -> dict[str, torch.Tensor]:
    snap = hub.snapshot(repo_id)
    g = torch.Generator().manual_seed(6)
    enc = {
        f"W_enc_{layer}": torch.randn(D_SAE, D_MODEL, generator=g),
        f"b_enc_{layer}": torch.randn(D_SAE, generator=g) * 0.1,
        f"b_dec_{layer}": torch.randn(D_MODEL, generator=g),
    }
    dec = {f"W_dec_{layer}": torch.randn(D_SAE, N_TARGETS, D_MODEL, generator=g)}
    save_file(enc, str(snap / f"W_enc_{layer}.safetensors"))
    save_file(dec, str(snap / f"W_dec_{layer}.safetensors"))
    cfg = {
        "model_name": "google/gemma-2-2b",
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out",
    }
    (snap / "config.yaml").write_text(yaml.safe_dump(cfg))
    return enc | dec


def test_mntss_clt_layer_matches_sae_lens(hub, monkeypatch):
    release, sae_id = "mntss-gemma-2-2b-2.5m-clt-as-per-layer", "layer_3"
    info = get_pretrained_saes_directory()[release]
    assert info.conversion_func == "mntss_clt_layer_transcoder"
    layer = info.saes_map[sae_id]
    w = write_mntss(hub, info.repo_id, layer)

    with pytest.warns(UserWarning, match="sum of all its per-target-layer decoders"):
        sae = fastsae.SAE.from_pretrained(release, sae_id)
    with pytest.warns(UserWarning, match="summing all decoders"):
        theirs = sae_lens_from_pretrained(monkeypatch, release, sae_id)
    assert type(sae) is fastsae.Transcoder
    md = sae.cfg.metadata
    assert (md.model_name, md.hook_name, md.hook_name_out) == (
        "google/gemma-2-2b",
        "blocks.3.hook_resid_mid",
        "blocks.3.hook_mlp_out",
    )
    assert md.neuronpedia_id == "gemma-2-2b/3-clt-hp"
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.d_out) == (D_MODEL, D_SAE, D_MODEL)
    assert torch.equal(sae.W_dec, w["W_dec_3"].sum(dim=1))
    assert_same_sae(sae, theirs, random_input())


def test_mntss_clt_layer_errors(hub):
    release, sae_id = "mntss-gemma-2-2b-2.5m-clt-as-per-layer", "layer_3"
    repo = get_pretrained_saes_directory()[release].repo_id
    w = write_mntss(hub, repo, "3")
    snap = hub.snapshot(repo)
    (snap / "W_dec_3.safetensors").unlink()
    with (
        pytest.warns(UserWarning),
        pytest.raises(FileNotFoundError, match=rf"{repo}: missing W_dec_3\.safetensors"),
    ):
        fastsae.SAE.from_pretrained(release, sae_id)

    (snap / "W_dec_3.safetensors").write_bytes(b"\x00" * 3)
    with (
        pytest.warns(UserWarning),
        pytest.raises(ValueError, match=r"W_dec_3\.safetensors: truncated or corrupt"),
    ):
        fastsae.SAE.from_pretrained(release, sae_id)

    save_file({"W_dec_3": w["W_dec_3"][:, 0].contiguous()}, str(snap / "W_dec_3.safetensors"))
    with (
        pytest.warns(UserWarning),
        pytest.raises(
            ValueError, match=r"W_dec_3 has shape \[24, 12\], expected \[d_sae, n_target_layers"
        ),
    ):
        fastsae.SAE.from_pretrained(release, sae_id)

    (snap / "config.yaml").write_text(yaml.safe_dump({"model_name": "google/gemma-2-2b"}))
    with (
        pytest.warns(UserWarning),
        pytest.raises(ValueError, match=r"config\.yaml: config has no 'feature_input_hook'"),
    ):
        fastsae.SAE.from_pretrained(release, sae_id)

    with pytest.raises(ValueError, match="not a layer number"):
        mntss_clt_layer_huggingface_loader(repo, "layer_3")
