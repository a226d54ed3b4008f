"""Publishers' own hub layouts (``fastsae.loading.formats``): Llama Scope (and its R1
distill), Qwen Scope, qresearch's DeepSeek R1 SAE, Goodfire, Connor & Rob's hook_z SAEs
and temporal SAEs.

Each test writes a tiny folder in the publisher's layout into an offline fake Hugging
Face cache under a real registry release, loads it with ``fastsae.SAE.from_pretrained``
and with sae-lens 6.54.12 from the same cache, and compares class, config, weights and
outputs. Formats whose sizes are fixed in the loader (not read from a file) are checked
two ways: their config at the real sizes against sae-lens's config getter (no files
needed), and a load with ``d_in`` made small in both libraries (``d_sae`` kept real).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import yaml
from fake_hub import sae_lens_from_pretrained
from sae_lens.loading import pretrained_sae_loaders as sl_loaders
from sae_testing import assert_close
from safetensors.torch import save_file

import fastsae
from fastsae.loading.formats import deepseek_r1, goodfire, qwen_scope
from fastsae.loading.hub_loaders import NAMED_PRETRAINED_SAE_LOADERS
from fastsae.loading.pretrained import get_pretrained_saes_directory

D_IN, D_SAE = 16, 48
METADATA_KEYS = (
    "model_name",
    "hook_name",
    "hook_head_index",
    "hf_hook_name",
    "neuronpedia_id",
    "dataset_path",
    "context_size",
    "prepend_bos",
)
MY_FORMATS = (
    "llama_scope",
    "llama_scope_r1_distill",
    "qwen_scope",
    "deepseek_r1",
    "goodfire",
    "connor_rob_hook_z",
    "temporal",
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def registry_entry(release: str, sae_id: str) -> tuple[str, str]:
    info = get_pretrained_saes_directory()[release]
    return info.repo_id, info.saes_map[sae_id]


def assert_same_sae(ours, theirs, x: torch.Tensor, what: str) -> None:
    """Same class, config, metadata, weights and outputs as the sae-lens SAE."""
    assert type(ours).__name__ == type(theirs).__name__, what
    assert ours.cfg.architecture() == theirs.cfg.architecture(), what
    for name in (
        "d_in",
        "d_sae",
        "dtype",
        "apply_b_dec_to_input",
        "normalize_activations",
        "reshape_activations",
    ):
        assert getattr(ours.cfg, name) == getattr(theirs.cfg, name), f"{what}: cfg.{name}"
    for key in METADATA_KEYS:
        assert ours.cfg.metadata[key] == theirs.cfg.metadata[key], f"{what}: metadata {key}"
    theirs_sd = theirs.state_dict()
    assert sorted(ours.state_dict()) == sorted(theirs_sd), what
    for name, tensor in ours.state_dict().items():
        assert tensor.dtype == theirs_sd[name].dtype, f"{what}: {name} dtype"
        assert torch.equal(tensor, theirs_sd[name]), f"{what}: weight {name}"
    with torch.no_grad():
        feats = ours.encode(x)
        assert_close(feats, theirs.encode(x), what=f"{what}: encode")
        assert_close(ours.decode(feats), theirs.decode(feats), what=f"{what}: decode")
        assert_close(ours(x), theirs(x), what=f"{what}: forward")


def test_every_format_of_mine_is_registered():
    for name in MY_FORMATS:
        assert NAMED_PRETRAINED_SAE_LOADERS[name].__module__.startswith(
            "fastsae.loading.formats."
        ), name


# ---------------------------------------------------------------------------- Llama Scope
def write_llama_scope(snap_folder, *, jump: float, avg_norm: float, hook: str, seed: int = 0):
    g = gen(seed)
    snap_folder.mkdir(parents=True)
    hyperparams = {
        "d_model": D_IN,
        "d_sae": D_SAE,
        "hook_point_in": hook,
        "hook_point_out": hook,
        "jump_relu_threshold": jump,
        "dataset_average_activation_norm": {"in": avg_norm, "out": avg_norm * 1.5},
        "act_fn": "jumprelu",
    }
    (snap_folder / "hyperparams.json").write_text(json.dumps(hyperparams))
    weights = {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g) / math.sqrt(D_IN),
        "encoder.bias": torch.randn(D_SAE, generator=g) * 0.1,
        "decoder.weight": torch.randn(D_IN, D_SAE, generator=g),
        "decoder.bias": torch.randn(D_IN, generator=g),
    }
    (snap_folder / "checkpoints").mkdir()
    save_file(weights, str(snap_folder / "checkpoints" / "final.safetensors"))
    return weights


@pytest.mark.parametrize(
    ("release", "sae_id", "hook"),
    [
        ("llama_scope_lxr_8x", "l3r_8x", "blocks.3.hook_resid_post"),
        ("llama_scope_lxm_32x", "l1m_32x", "blocks.1.hook_mlp_out"),
    ],
)
def test_llama_scope_release(release, sae_id, hook, hub, monkeypatch):
    repo, folder = registry_entry(release, sae_id)
    factor = get_pretrained_saes_directory()[release].norm_scaling_factor[sae_id]
    # the dataset norm the registry's factor was computed from: factor = sqrt(d) / norm
    avg_norm = math.sqrt(D_IN) / factor
    w = write_llama_scope(hub.snapshot(repo) / folder, jump=0.3, avg_norm=avg_norm, hook=hook)

    ours = fastsae.SAE.from_pretrained(release, sae_id)
    assert isinstance(ours, fastsae.JumpReLUSAE)
    md = ours.cfg.metadata
    assert md.model_name == "meta-llama/Llama-3.1-8B"
    assert md.hook_name == hook
    assert md.neuronpedia_id == get_pretrained_saes_directory()[release].neuronpedia_id[sae_id]
    assert md.dataset_path == "cerebras/SlimPajama-627B"
    assert ours.cfg.apply_b_dec_to_input is False
    assert ours.cfg.normalize_activations == "none"  # the registry factor was folded in
    # one threshold for every latent: the file's, in the units of the scaled inputs
    assert torch.allclose(ours.threshold, torch.full((D_SAE,), 0.3 * factor))

    x = torch.randn(9, D_IN, generator=gen(5))
    h = x @ (w["encoder.weight"].T * factor) + w["encoder.bias"]
    acts = torch.relu(h) * (h > 0.3 * factor)
    assert 0 < (acts > 0).float().mean() < 1, "the test needs both active and dead latents"
    expected = acts @ (w["decoder.weight"].T / factor) + w["decoder.bias"] / factor
    with torch.no_grad():
        assert_close(ours(x), expected, what="llama scope vs formula")
    assert_same_sae(ours, sae_lens_from_pretrained(monkeypatch, release, sae_id), x, "llama scope")


def test_llama_scope_dtype_follows_the_request(hub, monkeypatch):
    release, sae_id = "llama_scope_lxa_8x", "l0a_8x"
    repo, folder = registry_entry(release, sae_id)
    write_llama_scope(
        hub.snapshot(repo) / folder, jump=0.2, avg_norm=0.5, hook="blocks.0.hook_attn_out"
    )
    ours = fastsae.SAE.from_pretrained(release, sae_id, dtype="bfloat16")
    assert ours.cfg.dtype == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    theirs = sae_lens_from_pretrained(monkeypatch, release, sae_id, dtype="bfloat16")
    x = torch.randn(9, D_IN, generator=gen(6)).to(torch.bfloat16)
    with torch.no_grad():
        assert_close(ours(x).float(), theirs(x).float(), tol=1e-2, what="bfloat16")


def test_llama_scope_missing_checkpoint_names_repo_and_file(hub):
    release, sae_id = "llama_scope_lxr_8x", "l0r_8x"
    repo, folder = registry_entry(release, sae_id)
    write_llama_scope(hub.snapshot(repo) / folder, jump=0.2, avg_norm=1.0, hook="h")
    (hub.snapshot(repo) / folder / "checkpoints" / "final.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as e:
        fastsae.SAE.from_pretrained(release, sae_id)
    assert repo in str(e.value) and f"{folder}/checkpoints/final.safetensors" in str(e.value)


def test_llama_scope_missing_config_field_names_file_and_field(hub):
    release, sae_id = "llama_scope_lxr_8x", "l0r_8x"
    repo, folder = registry_entry(release, sae_id)
    target = hub.snapshot(repo) / folder
    write_llama_scope(target, jump=0.2, avg_norm=1.0, hook="h")
    hp = json.loads((target / "hyperparams.json").read_text())
    del hp["dataset_average_activation_norm"]["in"]
    (target / "hyperparams.json").write_text(json.dumps(hp))
    with pytest.raises(ValueError, match=r"hyperparams\.json.*dataset_average_activation_norm\.in"):
        fastsae.SAE.from_pretrained(release, sae_id)


def test_llama_scope_corrupt_checkpoint_names_it(hub):
    release, sae_id = "llama_scope_lxr_8x", "l0r_8x"
    repo, folder = registry_entry(release, sae_id)
    target = hub.snapshot(repo) / folder
    write_llama_scope(target, jump=0.2, avg_norm=1.0, hook="h")
    (target / "checkpoints" / "final.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(ValueError, match=r"final\.safetensors.*corrupt") as e:
        fastsae.SAE.from_pretrained(release, sae_id)
    assert repo in str(e.value)


# ---------------------------------------------------------------------------- Llama Scope R1
def write_r1_distill(target, *, seed: int = 1, drop: str | None = None):
    g = gen(seed)
    target.mkdir(parents=True)
    config = {
        "d_model": D_IN,
        "expansion_factor": D_SAE // D_IN,
        "hook_point_in": "blocks.2.hook_resid_post",
    }
    (target / "config.json").write_text(json.dumps(config))
    weights = {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g) / math.sqrt(D_IN),
        "encoder.bias": torch.randn(D_SAE, generator=g) * 0.1,
        "decoder.weight": torch.randn(D_IN, D_SAE, generator=g),
        "decoder.bias": torch.randn(D_IN, generator=g),
        "log_jumprelu_threshold": torch.randn(D_SAE, generator=g) - 1.0,
    }
    if drop:
        del weights[drop]
    save_file(weights, str(target / "sae_weights.safetensors"))
    return weights


def test_llama_scope_r1_distill_release(hub, monkeypatch):
    release, sae_id = "llama_scope_r1_distill", "l2r_400m_slimpajama_400m_openr1_math"
    repo, folder = registry_entry(release, sae_id)
    w = write_r1_distill(hub.snapshot(repo) / folder)
    factor = get_pretrained_saes_directory()[release].norm_scaling_factor[sae_id]

    ours = fastsae.SAE.from_pretrained(release, sae_id)
    assert isinstance(ours, fastsae.JumpReLUSAE)
    assert ours.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    # sae-lens names the base model here, not the distill (the registry's model)
    assert ours.cfg.metadata.model_name == "meta-llama/Llama-3.1-8B"
    assert torch.allclose(ours.threshold, w["log_jumprelu_threshold"].exp())
    x = torch.randn(9, D_IN, generator=gen(7))
    h = x @ (w["encoder.weight"].T * factor) + w["encoder.bias"]
    acts = torch.relu(h) * (h > w["log_jumprelu_threshold"].exp())
    expected = acts @ (w["decoder.weight"].T / factor) + w["decoder.bias"] / factor
    with torch.no_grad():
        assert_close(ours(x), expected, what="r1 distill vs formula")
    theirs = sae_lens_from_pretrained(monkeypatch, release, sae_id)
    assert_same_sae(ours, theirs, x, "llama scope r1 distill")


def test_llama_scope_r1_distill_missing_threshold_names_file(hub):
    release, sae_id = "llama_scope_r1_distill", "l0r_800m_slimpajama"
    repo, folder = registry_entry(release, sae_id)
    write_r1_distill(hub.snapshot(repo) / folder, drop="log_jumprelu_threshold")
    with pytest.raises(ValueError, match="log_jumprelu_threshold") as e:
        fastsae.SAE.from_pretrained(release, sae_id)
    assert f"{repo}/{folder}/sae_weights.safetensors" in str(e.value)


def test_llama_scope_r1_distill_missing_config_names_repo_and_file(hub):
    release, sae_id = "llama_scope_r1_distill", "l0r_800m_slimpajama"
    repo, folder = registry_entry(release, sae_id)
    write_r1_distill(hub.snapshot(repo) / folder)
    (hub.snapshot(repo) / folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError) as e:
        fastsae.SAE.from_pretrained(release, sae_id)
    assert repo in str(e.value) and f"{folder}/config.json" in str(e.value)


# ---------------------------------------------------------------------------- Qwen Scope
def qwen_releases() -> list[tuple[str, str, str]]:
    return [
        (release, info.repo_id, next(iter(info.saes_map.values())))
        for release, info in get_pretrained_saes_directory().items()
        if info.conversion_func == "qwen_scope"
    ]


@pytest.mark.parametrize(("release", "repo", "folder"), qwen_releases())
def test_qwen_scope_config_matches_sae_lens_at_real_sizes(release, repo, folder):
    overrides = {"neuronpedia_id": None, "dtype": "float32"}
    ours = qwen_scope.qwen_scope_config(repo, folder, "cpu", overrides)
    theirs = sl_loaders.get_qwen_scope_config_from_hf(repo, folder, "cpu", False, overrides)
    assert ours == theirs
    assert ours["d_sae"] % 1024 == 0 and ours["activation_fn_kwargs"]["k"] in (50, 100)


def test_qwen_scope_release(hub, monkeypatch):
    release, sae_id = "qwen-scope-3-1.7b-base-w32k-l50", "layer3"
    repo, folder = registry_entry(release, sae_id)
    d_in, d_sae, k = 8, 32 * 1024, 50  # d_sae and k come from the repo id
    # a real 2048-wide SAE would be 0.5 GB: both libraries read d_in from the same table
    monkeypatch.setitem(
        qwen_scope.QWEN_SCOPE_MODELS, "Qwen3-1.7B-Base", ("Qwen/Qwen3-1.7B-Base", d_in)
    )
    monkeypatch.setitem(
        sl_loaders.QWEN_SCOPE_MODEL_INFO, "Qwen3-1.7B-Base", ("Qwen/Qwen3-1.7B-Base", d_in)
    )
    g = gen(2)
    raw = {  # Qwen's orientation: W_enc [d_sae, d_in], W_dec [d_in, d_sae]
        "W_enc": torch.randn(d_sae, d_in, generator=g),
        "W_dec": torch.randn(d_in, d_sae, generator=g) * 0.1,
        "b_enc": torch.randn(d_sae, generator=g) * 0.1,
        "b_dec": torch.randn(d_in, generator=g),
    }
    torch.save(raw, hub.snapshot(repo) / folder)

    ours = fastsae.SAE.from_pretrained(release, sae_id)
    assert isinstance(ours, fastsae.TopKSAE)
    assert (ours.cfg.d_in, ours.cfg.d_sae, ours.cfg.k) == (d_in, d_sae, k)
    md = ours.cfg.metadata
    assert (md.model_name, md.hook_name, md.hf_hook_name) == (
        "Qwen/Qwen3-1.7B-Base",
        "blocks.3.hook_resid_post",
        "model.layers.3",
    )
    x = torch.randn(5, d_in, generator=gen(8))
    h = torch.relu(x @ raw["W_enc"].T + raw["b_enc"])  # b_dec not subtracted
    vals, idx = h.topk(k, dim=-1)
    expected = torch.zeros_like(h).scatter(-1, idx, vals) @ raw["W_dec"].T + raw["b_dec"]
    with torch.no_grad():
        assert_close(ours(x), expected, tol=1e-4, what="qwen scope vs formula")
    assert_same_sae(ours, sae_lens_from_pretrained(monkeypatch, release, sae_id), x, "qwen scope")


def test_qwen_scope_corrupt_file_names_it(hub):
    release, sae_id = "qwen-scope-3-8b-base-w64k-l50", "layer1"
    repo, folder = registry_entry(release, sae_id)
    (hub.snapshot(repo) / folder).write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="corrupt") as e:
        fastsae.SAE.from_pretrained(release, sae_id)
    assert f"{repo}/{folder}" in str(e.value)


def test_qwen_scope_integer_weights_are_refused(hub):
    release, sae_id = "qwen-scope-3-8b-base-w64k-l50", "layer1"
    repo, folder = registry_entry(release, sae_id)
    raw = {name: torch.zeros(2, 2) for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
    raw["W_dec"] = raw["W_dec"].long()
    torch.save(raw, hub.snapshot(repo) / folder)
    with pytest.raises(ValueError, match="'W_dec' must be a floating-point tensor") as e:
        fastsae.SAE.from_pretrained(release, sae_id)
    assert f"{repo}/{folder}" in str(e.value)


def test_qwen_scope_missing_file_names_repo_and_file(hub):
    release, sae_id = "qwen-scope-3-8b-base-w64k-l50", "layer1"
    repo, folder = registry_entry(release, sae_id)
    hub.snapshot(repo)
    with pytest.raises(FileNotFoundError) as e:
        fastsae.SAE.from_pretrained(release, sae_id)
    assert repo in str(e.value) and folder in str(e.value)


def test_qwen_scope_unknown_names_are_refused():
    loader = NAMED_PRETRAINED_SAE_LOADERS["qwen_scope"]
    with pytest.raises(ValueError, match="not a Qwen Scope repo id"):
        loader("Qwen/Qwen3-1.7B", "layer0.sae.pt", "cpu", False, None)
    with pytest.raises(ValueError, match="unknown Qwen Scope base model 'Qwen9-1B'"):
        loader("Qwen/SAE-Res-Qwen9-1B-W32K-L0_50", "layer0.sae.pt", "cpu", False, None)
    with pytest.raises(ValueError, match="layer"):
        loader("Qwen/SAE-Res-Qwen3-8B-Base-W64K-L0_50", "weights.pt", "cpu", False, None)


# ---------------------------------------------------------------------------- DeepSeek R1
def test_deepseek_r1_config_matches_sae_lens_at_real_sizes():
    repo, folder = registry_entry(
        "deepseek-r1-distill-llama-8b-qresearch", "blocks.19.hook_resid_post"
    )
    overrides = {"dtype": "float32", "neuronpedia_id": "x"}
    ours = deepseek_r1.deepseek_r1_config(repo, folder, "cpu", overrides)
    assert ours == sl_loaders.get_deepseek_r1_config_from_hf(repo, folder, "cpu", False, overrides)
    assert (ours["d_in"], ours["d_sae"]) == (4096, 65536)


def test_deepseek_r1_release(hub, monkeypatch):
    release, sae_id = "deepseek-r1-distill-llama-8b-qresearch", "blocks.19.hook_resid_post"
    repo, folder = registry_entry(release, sae_id)
    d_in, d_sae = 8, deepseek_r1.D_SAE  # 4096 x 65536 would be 1 GB: only d_in is made small
    monkeypatch.setattr(deepseek_r1, "D_IN", d_in)
    real_config = sl_loaders.get_deepseek_r1_config_from_hf
    monkeypatch.setattr(
        sl_loaders,
        "get_deepseek_r1_config_from_hf",
        lambda *a, **kw: {**real_config(*a, **kw), "d_in": d_in},
    )
    g = gen(3)
    raw = {
        "encoder.weight": torch.randn(d_sae, d_in, generator=g),
        "encoder.bias": torch.randn(d_sae, generator=g) * 0.1,
        "decoder.weight": torch.randn(d_in, d_sae, generator=g) * 0.01,
        "decoder.bias": torch.randn(d_in, generator=g),
    }
    torch.save(raw, hub.snapshot(repo) / folder)

    ours = fastsae.SAE.from_pretrained(release, sae_id)
    assert isinstance(ours, fastsae.StandardSAE)
    assert ours.cfg.metadata.model_name == "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"
    assert ours.cfg.metadata.hook_name == "blocks.19.hook_resid_post"
    x = torch.randn(5, d_in, generator=gen(9))
    acts = torch.relu(x @ raw["encoder.weight"].T + raw["encoder.bias"])
    expected = acts @ raw["decoder.weight"].T + raw["decoder.bias"]
    with torch.no_grad():
        assert_close(ours(x), expected, tol=1e-4, what="deepseek r1 vs formula")
    assert_same_sae(ours, sae_lens_from_pretrained(monkeypatch, release, sae_id), x, "deepseek r1")


def test_deepseek_r1_missing_weight_names_file(hub):
    release, sae_id = "deepseek-r1-distill-llama-8b-qresearch", "blocks.19.hook_resid_post"
    repo, folder = registry_entry(release, sae_id)
    torch.save({"encoder.weight": torch.zeros(2, 2)}, hub.snapshot(repo) / folder)
    with pytest.raises(ValueError, match=r"missing weights \['decoder.weight'") as e:
        fastsae.SAE.from_pretrained(release, sae_id)
    assert f"{repo}/{folder}" in str(e.value)


def test_deepseek_r1_file_without_layer_is_refused():
    with pytest.raises(ValueError, match="no layer number"):
        NAMED_PRETRAINED_SAE_LOADERS["deepseek_r1"]("org/repo", "sae.pt", "cpu", False, None)


# ---------------------------------------------------------------------------- Goodfire
def goodfire_releases() -> list[tuple[str, str, str]]:
    return [
        (release, info.repo_id, next(iter(info.saes_map.values())))
        for release, info in get_pretrained_saes_directory().items()
        if info.conversion_func == "goodfire"
    ]


@pytest.mark.parametrize(("release", "repo", "folder"), goodfire_releases())
def test_goodfire_config_matches_sae_lens_at_real_sizes(release, repo, folder):
    overrides = {"dtype": "float32", "neuronpedia_id": "x"}
    ours = goodfire.goodfire_config(repo, folder, "cpu", overrides)
    assert ours == sl_loaders.get_goodfire_config_from_hf(repo, folder, "cpu", False, overrides)


def test_goodfire_release(hub, monkeypatch):
    release, sae_id = "goodfire-llama-3.1-8b-instruct", "layer_19"
    repo, folder = registry_entry(release, sae_id)
    d_in = 8
    d_sae = goodfire.GOODFIRE_SAES[repo].d_sae  # 65536, kept; d_in made small in both
    monkeypatch.setitem(
        goodfire.GOODFIRE_SAES, repo, dataclasses.replace(goodfire.GOODFIRE_SAES[repo], d_in=d_in)
    )
    real_config = sl_loaders.get_goodfire_config_from_hf
    monkeypatch.setattr(
        sl_loaders,
        "get_goodfire_config_from_hf",
        lambda *a, **kw: {**real_config(*a, **kw), "d_in": d_in},
    )
    g = gen(4)
    raw = {  # nn.Linear layout, stored in bfloat16
        "encoder_linear.weight": torch.randn(d_sae, d_in, generator=g).bfloat16(),
        "encoder_linear.bias": (torch.randn(d_sae, generator=g) * 0.1).bfloat16(),
        "decoder_linear.weight": (torch.randn(d_in, d_sae, generator=g) * 0.01).bfloat16(),
        "decoder_linear.bias": torch.randn(d_in, generator=g).bfloat16(),
    }
    torch.save(raw, hub.snapshot(repo) / folder)

    ours = fastsae.SAE.from_pretrained(release, sae_id)
    assert isinstance(ours, fastsae.StandardSAE)
    assert ours.cfg.dtype == "float32" and ours.W_enc.dtype == torch.float32
    md = ours.cfg.metadata
    assert (md.model_name, md.hook_name, md.neuronpedia_id) == (
        "meta-llama/Llama-3.1-8B-Instruct",
        "blocks.19.hook_resid_post",
        "llama3.1-8b-it/19-resid-post-gf",
    )
    x = torch.randn(5, d_in, generator=gen(10))
    f = {k: v.float() for k, v in raw.items()}
    acts = torch.relu(x @ f["encoder_linear.weight"].T + f["encoder_linear.bias"])
    expected = acts @ f["decoder_linear.weight"].T + f["decoder_linear.bias"]
    with torch.no_grad():
        assert_close(ours(x), expected, tol=1e-4, what="goodfire vs formula")
    assert_same_sae(ours, sae_lens_from_pretrained(monkeypatch, release, sae_id), x, "goodfire")


def test_goodfire_unknown_sae_is_refused():
    loader = NAMED_PRETRAINED_SAE_LOADERS["goodfire"]
    with pytest.raises(ValueError, match="unsupported Goodfire SAE Goodfire/other/x.pt"):
        loader("Goodfire/other", "x.pt", "cpu", False, None)
    with pytest.raises(ValueError, match="unsupported Goodfire SAE"):
        loader("Goodfire/Llama-3.1-8B-Instruct-SAE-l19", "other.pth", "cpu", False, None)


# ---------------------------------------------------------------------------- hook_z (Connor & Rob)
def write_hook_z(snap, folder, *, n_heads: int, d_head: int, seed: int = 5, zip_format=True):
    g = gen(seed)
    d_in = n_heads * d_head
    cfg_name = folder.split(".pt")[0] + "_cfg.json"
    (snap / cfg_name).write_text(
        json.dumps({"act_size": d_in, "dict_size": D_SAE, "act_name": "blocks.4.attn.hook_z"})
    )
    sd = {
        "W_enc": torch.randn(d_in, D_SAE, generator=g) / math.sqrt(d_in),
        "W_dec": torch.randn(D_SAE, d_in, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
        "b_dec": torch.randn(d_in, generator=g),
    }
    torch.save(sd, snap / folder, _use_new_zipfile_serialization=zip_format)
    return sd


# torch's zip format is memory-mapped; the legacy format cannot be and is read whole
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_connor_rob_hook_z_release(zip_format, hub, monkeypatch):
    release, sae_id = "gpt2-small-hook-z-kk", "blocks.4.hook_z"
    repo, folder = registry_entry(release, sae_id)
    n_heads, d_head = 4, 6
    snap = hub.snapshot(repo)
    sd = write_hook_z(snap, folder, n_heads=n_heads, d_head=d_head, zip_format=zip_format)

    ours = fastsae.SAE.from_pretrained(release, sae_id)
    assert isinstance(ours, fastsae.StandardSAE)
    assert ours.cfg.reshape_activations == "hook_z"
    assert ours.cfg.apply_b_dec_to_input is True
    md = ours.cfg.metadata
    assert (md.model_name, md.hook_name, md.neuronpedia_id) == (
        "gpt2-small",
        "blocks.4.attn.hook_z",
        "gpt2-small/4-att-kk",
    )
    x = torch.randn(2, 3, n_heads, d_head, generator=gen(11))  # [batch, pos, head, d_head]
    flat = x.flatten(-2)
    acts = torch.relu((flat - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"])
    expected = (acts @ sd["W_dec"] + sd["b_dec"]).view_as(x)
    with torch.no_grad():
        assert_close(ours(x), expected, what="hook_z vs formula")
    assert_same_sae(ours, sae_lens_from_pretrained(monkeypatch, release, sae_id), x, "hook_z")


def test_connor_rob_missing_cfg_names_repo_and_file(hub):
    release, sae_id = "gpt2-small-hook-z-kk", "blocks.0.hook_z"
    repo, folder = registry_entry(release, sae_id)
    snap = hub.snapshot(repo)
    write_hook_z(snap, folder, n_heads=2, d_head=3)
    cfg_name = folder.split(".pt")[0] + "_cfg.json"
    (snap / cfg_name).unlink()
    with pytest.raises(FileNotFoundError) as e:
        fastsae.SAE.from_pretrained(release, sae_id)
    assert repo in str(e.value) and cfg_name in str(e.value)


def test_connor_rob_corrupt_cfg_names_it(hub):
    release, sae_id = "gpt2-small-hook-z-kk", "blocks.0.hook_z"
    repo, folder = registry_entry(release, sae_id)
    snap = hub.snapshot(repo)
    write_hook_z(snap, folder, n_heads=2, d_head=3)
    cfg_name = folder.split(".pt")[0] + "_cfg.json"
    (snap / cfg_name).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON") as e:
        fastsae.SAE.from_pretrained(release, sae_id)
    assert f"{repo}/{cfg_name}" in str(e.value)


# ---------------------------------------------------------------------------- temporal
def write_temporal(target, *, tied: bool, d_in: int = 8, exp_factor: int = 8, seed: int = 6):
    g = gen(seed)
    d_sae, n_heads, bottleneck = d_in * exp_factor, 2, 4
    conf = {
        "llm": {"dimin": d_in},
        "sae": {
            "exp_factor": exp_factor,
            "n_heads": n_heads,
            "n_attn_layers": 1,
            "bottleneck_factor": bottleneck,
            "sae_diff_type": "topk",
            "kval_topk": 6,
            "tied_weights": tied,
            "scaling_factor": 0.5,
        },
        "data": {"dtype": "float32"},
    }
    target.mkdir(parents=True)
    (target / "conf.yaml").write_text(yaml.safe_dump(conf))
    qk = d_sae // bottleneck
    ckpt = {
        "D": torch.randn(d_sae, d_in, generator=g) / math.sqrt(d_in),
        "b": torch.randn(d_in, generator=g) * 0.1,
        "attn_layers.0.k_ctx.weight": torch.randn(qk, d_sae, generator=g) * 0.1,
        "attn_layers.0.k_ctx.bias": torch.randn(qk, generator=g) * 0.1,
        "attn_layers.0.q_target.weight": torch.randn(qk, d_sae, generator=g) * 0.1,
        "attn_layers.0.q_target.bias": torch.randn(qk, generator=g) * 0.1,
        "attn_layers.0.v_ctx.weight": torch.randn(d_sae, d_sae, generator=g) * 0.1,
        "attn_layers.0.v_ctx.bias": torch.randn(d_sae, generator=g) * 0.1,
        "attn_layers.0.c_proj.weight": torch.randn(d_sae, d_sae, generator=g) * 0.1,
        "attn_layers.0.c_proj.bias": torch.randn(d_sae, generator=g) * 0.1,
    }
    if not tied:
        ckpt["E"] = torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in)
    save_file(ckpt, str(target / "latest_ckpt.safetensors"))
    return conf, ckpt


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_temporal_release(tied, hub, monkeypatch):
    release, sae_id = "temporal-sae-gemma-2-2b", "blocks.12.hook_resid_post"
    repo, folder = registry_entry(release, sae_id)
    _, ckpt = write_temporal(hub.snapshot(repo) / folder, tied=tied)

    ours = fastsae.SAE.from_pretrained(release, sae_id)
    assert type(ours).__name__ == "TemporalSAE" and ours.cfg.architecture() == "temporal"
    assert (ours.cfg.d_in, ours.cfg.d_sae, ours.cfg.kval_topk) == (8, 64, 6)
    assert ours.cfg.tied_weights is tied and ("W_enc" in ours.state_dict()) is not tied
    assert ours.cfg.normalize_activations == "constant_scalar_rescale"
    assert ours.cfg.activation_normalization_factor == 0.5
    md = ours.cfg.metadata
    assert (md.model_name, md.hook_name, md.dataset_path, md.neuronpedia_id) == (
        "gemma-2-2b",
        "blocks.12.hook_resid_post",
        "monology/pile-uncopyrighted",
        "gemma-2-2b/12-temporal-res",
    )
    assert torch.equal(ours.W_dec, ckpt["D"]) and torch.equal(ours.b_dec, ckpt["b"])
    x = torch.randn(2, 5, 8, generator=gen(12))  # [batch, seq, d_in]
    theirs = sae_lens_from_pretrained(monkeypatch, release, sae_id)
    assert_same_sae(ours, theirs, x, f"temporal ({'tied' if tied else 'untied'})")


def test_temporal_hook_from_folder_when_not_overridden(hub, monkeypatch):
    # the Llama release overrides the model but not the hook: it comes from layer_{n}
    release, sae_id = "temporal-sae-llama-3.1-8b", "blocks.26.hook_resid_post"
    repo, folder = registry_entry(release, sae_id)
    write_temporal(hub.snapshot(repo) / folder, tied=True)
    ours = fastsae.SAE.from_pretrained(release, sae_id)
    assert ours.cfg.metadata.hook_name == "blocks.26.hook_resid_post"
    assert ours.cfg.metadata.model_name == "meta-llama/Llama-3.1-8B"
    theirs = sae_lens_from_pretrained(monkeypatch, release, sae_id)
    assert_same_sae(ours, theirs, torch.randn(1, 4, 8, generator=gen(13)), "temporal llama")


def test_temporal_missing_config_field_names_file(hub):
    release, sae_id = "temporal-sae-gemma-2-2b", "blocks.12.hook_resid_post"
    repo, folder = registry_entry(release, sae_id)
    target = hub.snapshot(repo) / folder
    conf, _ = write_temporal(target, tied=True)
    del conf["sae"]["n_heads"]
    (target / "conf.yaml").write_text(yaml.safe_dump(conf))
    with pytest.raises(ValueError, match=r"conf\.yaml: config has no 'sae\.n_heads'") as e:
        fastsae.SAE.from_pretrained(release, sae_id)
    assert repo in str(e.value)


def test_temporal_missing_checkpoint_names_repo_and_file(hub):
    release, sae_id = "temporal-sae-gemma-2-2b", "blocks.12.hook_resid_post"
    repo, folder = registry_entry(release, sae_id)
    target = hub.snapshot(repo) / folder
    write_temporal(target, tied=True)
    (target / "latest_ckpt.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as e:
        fastsae.SAE.from_pretrained(release, sae_id)
    assert repo in str(e.value) and f"{folder}/latest_ckpt.safetensors" in str(e.value)
