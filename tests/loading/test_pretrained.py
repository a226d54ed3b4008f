"""``SAE.from_pretrained``: registry releases, plain Hugging Face repo ids and local
repo directories, all offline.

Every test that touches the hub builds a Hugging Face cache by hand under
``tmp_path`` (``models--user--repo/snapshots/<sha>/<folder>/...`` plus
``refs/main``), turns on ``HF_HUB_OFFLINE`` and blocks sockets, so a test that
tried to download would fail instead of reaching the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sae_lens
import torch
from sae_testing import assert_close
from safetensors.torch import save_file

import fastsae
from fastsae.loading import pretrained
from fastsae.loading.hub_loaders import NAMED_PRETRAINED_SAE_LOADERS
from fastsae.loading.pretrained import PretrainedRelease, get_pretrained_saes_directory

D_IN, D_SAE, K = 20, 60, 5
FP32_TOL = 1e-5
HOOK = "blocks.0.hook_resid_pre"


def random_input(d: int = D_IN) -> torch.Tensor:
    return torch.randn(7, d, generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def random_sae(arch: str = "standard", seed: int = 1, **extra) -> fastsae.SAE:
    cfg = {
        "architecture": arch,
        "d_in": D_IN,
        "d_sae": D_SAE,
        "metadata": {"model_name": "gpt2", "hook_name": HOOK},
    }
    if "topk" in arch:
        cfg["k"] = K
    cfg.update(extra)
    sae = fastsae.SAE.from_dict(cfg)
    g = torch.Generator().manual_seed(seed)
    for name, p in sae.named_parameters():
        if name == "threshold":
            p.copy_(torch.rand(p.shape, generator=g) * 0.4)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return sae


def use_registry(monkeypatch, *releases: PretrainedRelease) -> None:
    registry = {r.release: r for r in releases}
    monkeypatch.setattr(pretrained, "get_pretrained_saes_directory", lambda: registry)


def release(name: str = "fake-release", repo_id: str = "user/repo", **kwargs) -> PretrainedRelease:
    kwargs.setdefault("saes_map", {HOOK: "blocks.0"})
    kwargs.setdefault("conversion_func", None)
    return PretrainedRelease(release=name, repo_id=repo_id, model="gpt2", **kwargs)


def write_pre6_folder(folder: Path, sae: fastsae.SAE, **cfg_extra) -> None:
    """``sae`` in the flat pre-6.0 SAELens layout (as most registry repos still are)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model_name": "gpt2-small",
        "hook_point": HOOK,
        "hook_point_layer": 0,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "dtype": "torch.float32",
        "device": "cuda",
        "context_size": 128,
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        **cfg_extra,
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(
        {k: v.detach().contiguous() for k, v in sae.state_dict().items()},
        str(folder / "sae_weights.safetensors"),
    )


# --------------------------------------------------------------------------- plain repo ids
@pytest.mark.parametrize("blobs", [False, True], ids=["files", "blob-symlinks"])
def test_repo_id_and_folder_load_offline(blobs, hub):
    sae = random_sae("topk")
    snap = hub.snapshot("user/repo")
    sae.save_model(snap / "blocks.0")
    if blobs:
        hub.to_blobs(snap)

    loaded = fastsae.SAE.from_pretrained("user/repo", "blocks.0")
    assert isinstance(loaded, fastsae.TopKSAE)
    assert loaded.cfg.metadata.hook_name == HOOK
    x = random_input()
    assert_close(loaded(x), sae(x), tol=0.0, what="from_pretrained")
    # sae-lens reads the same cache to the same SAE
    theirs = sae_lens.SAE.from_pretrained("user/repo", "blocks.0")
    assert_close(loaded(x), theirs(x), what="vs sae_lens")


def test_nested_folder_and_dtype(hub):
    sae = random_sae("jumprelu")
    sae.save_model(hub.snapshot("user/repo") / "res" / "layer_0")
    loaded = fastsae.SAE.from_pretrained("user/repo", "res/layer_0", dtype=torch.float64)
    assert loaded.cfg.dtype == "float64"
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    x = random_input()
    assert_close(loaded(x.double()), sae(x), what="float64")


def test_fold_W_dec_norm(hub):
    sae = random_sae("standard")
    sae.save_model(hub.snapshot("user/repo") / "blocks.0")
    loaded = fastsae.SAE.from_pretrained("user/repo", "blocks.0", fold_W_dec_norm=True)
    norms = loaded.W_dec.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    x = random_input()
    assert_close(loaded(x), sae(x), what="folded")


def test_missing_folder_offline_names_repo_and_files(hub):
    random_sae().save_model(hub.snapshot("user/repo") / "blocks.0")
    with pytest.raises(FileNotFoundError) as e:
        fastsae.SAE.from_pretrained("user/repo", "blocks.7")
    msg = str(e.value)
    assert "user/repo/blocks.7" in msg
    assert "sae_weights.safetensors" in msg
    assert "offline=True" in msg


def test_uncached_repo_offline(hub):
    with pytest.raises(FileNotFoundError, match="offline=True"):
        fastsae.SAE.from_pretrained("nobody/nothing", "blocks.0")


def test_folder_with_cfg_but_no_weights(hub):
    snap = hub.snapshot("user/repo")
    random_sae().save_model(snap / "blocks.0")
    (snap / "blocks.0" / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="user/repo"):
        fastsae.SAE.from_pretrained("user/repo", "blocks.0")


def test_force_download_offline_is_refused(hub):
    random_sae().save_model(hub.snapshot("user/repo") / "blocks.0")
    with pytest.raises(ValueError, match="offline"):
        fastsae.SAE.from_pretrained("user/repo", "blocks.0", force_download=True)


def test_wrong_class_is_refused(hub):
    random_sae("standard").save_model(hub.snapshot("user/repo") / "blocks.0")
    with pytest.raises(ValueError, match="not a TopKSAE") as e:
        fastsae.TopKSAE.from_pretrained("user/repo", "blocks.0")
    assert "user/repo/blocks.0" in str(e.value)


def test_registered_repo_id_warns_to_use_the_release(hub, monkeypatch):
    use_registry(monkeypatch, release())
    random_sae().save_model(hub.snapshot("user/repo") / "blocks.0")
    with pytest.warns(UserWarning, match="fake-release"):
        sae = fastsae.SAE.from_pretrained("user/repo", "blocks.0")
    assert isinstance(sae, fastsae.StandardSAE)


# --------------------------------------------------------------------------- registry releases
@pytest.mark.parametrize("layout", ["6.x", "pre-6"])
def test_registry_release_metadata_and_norm_scaling_folded(layout, hub, monkeypatch):
    factor = 2.5
    use_registry(
        monkeypatch,
        release(
            neuronpedia_id={HOOK: "gpt2-small/0-fake"},
            norm_scaling_factor={HOOK: factor},
            config_overrides={"dataset_path": "Skylion007/openwebtext"},
        ),
    )
    sae = random_sae("standard", normalize_activations="expected_average_only_in")
    folder = hub.snapshot("user/repo") / "blocks.0"
    if layout == "6.x":
        sae.save_model(folder)
    else:
        write_pre6_folder(folder, sae, normalize_activations=True)

    loaded, cfg_dict, _ = fastsae.SAE.from_pretrained_with_cfg_and_sparsity("fake-release", HOOK)
    assert loaded.cfg.metadata.neuronpedia_id == "gpt2-small/0-fake"
    assert loaded.cfg.metadata.dataset_path == "Skylion007/openwebtext"
    assert loaded.cfg.metadata.hook_name == HOOK
    assert cfg_dict["neuronpedia_id"] == "gpt2-small/0-fake"
    # the factor is folded into the weights: same function of the raw activations
    assert loaded.cfg.normalize_activations == "none"
    assert cfg_dict["normalize_activations"] == "none"
    x = random_input()
    expected = sae(x * factor) / factor  # normalise the input, un-normalise the output
    assert_close(loaded(x), expected, what=f"norm scaling ({layout})")
    assert not torch.allclose(loaded(x), sae(x))


def test_registry_norm_scaling_without_factor_warns(hub, monkeypatch):
    use_registry(monkeypatch, release())
    sae = random_sae("standard", normalize_activations="expected_average_only_in")
    sae.save_model(hub.snapshot("user/repo") / "blocks.0")
    with pytest.warns(UserWarning, match="norm_scaling_factor"):
        loaded = fastsae.SAE.from_pretrained("fake-release", HOOK)
    assert loaded.cfg.normalize_activations == "expected_average_only_in"


def test_unknown_release_without_slash(hub):
    with pytest.raises(ValueError, match="Release no-such-release not found"):
        fastsae.SAE.from_pretrained("no-such-release", "whatever")


def test_unknown_sae_id_lists_valid_ids(hub, monkeypatch):
    use_registry(monkeypatch, release(saes_map={"a": "fa", "b": "fb"}))
    with pytest.raises(ValueError, match=r"ID c not found in release fake-release") as e:
        fastsae.SAE.from_pretrained("fake-release", "c")
    assert "['a', 'b']" in str(e.value)


def test_unknown_sae_id_shortens_a_long_list(hub, monkeypatch):
    ids = {f"id{i}": f"f{i}" for i in range(8)}
    use_registry(monkeypatch, release(saes_map=ids))
    with pytest.raises(ValueError, match=r"Valid IDs are \['id0', .*'id4', \.\.\.\]") as e:
        fastsae.SAE.from_pretrained("fake-release", "nope")
    assert "id7" not in str(e.value)


def test_unknown_conversion_func_names_the_known_formats(hub, monkeypatch):
    use_registry(monkeypatch, release(conversion_func="no_such_format"))
    with pytest.raises(ValueError, match="no_such_format") as e:
        fastsae.SAE.from_pretrained("fake-release", HOOK)
    assert "'gemma_2'" in str(e.value) and "'sae_lens'" in str(e.value)


def test_every_registry_format_has_a_loader():
    formats = {r.conversion_func or "sae_lens" for r in get_pretrained_saes_directory().values()}
    missing = sorted(formats - set(NAMED_PRETRAINED_SAE_LOADERS))
    assert not missing, f"registry formats without a loader: {missing}"


def test_user_converter_is_a_hub_loader(hub, monkeypatch):
    # sae-lens's converter= protocol: called with repo_id/folder_name, returns 3 things
    sae = random_sae()
    calls = []

    def loader(repo_id, folder_name, device, force_download, cfg_overrides):
        calls.append((repo_id, folder_name, device, force_download, cfg_overrides["dtype"]))
        cfg = {**sae.cfg.to_dict(), **(cfg_overrides or {})}
        return cfg, dict(sae.state_dict()), None

    use_registry(monkeypatch, release(saes_map={HOOK: "anywhere"}))
    got = fastsae.SAE.from_pretrained("fake-release", HOOK, converter=loader)
    assert calls == [("user/repo", "anywhere", "cpu", False, "float32")]
    x = random_input()
    assert_close(got(x), sae(x), what="user converter")


def test_gemma_scope_release(hub, monkeypatch):
    folder = "layer_3/width_16k/average_l0_50"
    repo = "google/gemma-scope-2b-pt-res"
    use_registry(
        monkeypatch,
        release(
            "gemma-scope-2b-pt-res-fake",
            repo_id=repo,
            conversion_func="gemma_2",
            saes_map={"layer_3/width_16k/average_l0_50": folder},
            neuronpedia_id={folder: "gemma-2-2b/3-gemmascope-res-16k"},
        ),
    )
    g = torch.Generator().manual_seed(11)
    W_enc, W_dec = torch.randn(D_IN, D_SAE, generator=g), torch.randn(D_SAE, D_IN, generator=g)
    b_enc, b_dec = torch.randn(D_SAE, generator=g) * 0.1, torch.randn(D_IN, generator=g)
    threshold = torch.rand(D_SAE, generator=g)
    target = hub.snapshot(repo) / folder
    target.mkdir(parents=True)
    np.savez(
        target / "params.npz",
        W_enc=W_enc.numpy(),
        W_dec=W_dec.numpy(),
        b_enc=b_enc.numpy(),
        b_dec=b_dec.numpy(),
        threshold=threshold.numpy(),
    )

    sae = fastsae.SAE.from_pretrained("gemma-scope-2b-pt-res-fake", folder)
    assert isinstance(sae, fastsae.JumpReLUSAE)
    md = sae.cfg.metadata
    assert md.hook_name == "blocks.3.hook_resid_post"
    assert md.model_name == "gemma-2-2b"
    assert md.neuronpedia_id == "gemma-2-2b/3-gemmascope-res-16k"
    x = random_input()
    h = x @ W_enc + b_enc
    expected = (torch.relu(h) * (h > threshold)) @ W_dec + b_dec
    assert_close(sae(x), expected, what="gemma scope release")


def test_sparsify_repo_probed_without_registry(hub):
    snap = hub.snapshot("EleutherAI/sae-fake")
    (snap / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m"}))
    folder = snap / "layers.3"
    folder.mkdir()
    (folder / "cfg.json").write_text(
        json.dumps({"activation": "topk", "num_latents": D_SAE, "k": K, "d_in": D_IN})
    )
    g = torch.Generator().manual_seed(12)
    t = {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g),
        "encoder.bias": torch.randn(D_SAE, generator=g) * 0.1,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_dec": torch.randn(D_IN, generator=g),
    }
    save_file(t, str(folder / "sae.safetensors"))

    sae = fastsae.SAE.from_pretrained("EleutherAI/sae-fake", "layers.3")
    assert isinstance(sae, fastsae.TopKSAE)
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert sae.cfg.metadata.model_name == "EleutherAI/pythia-70m"
    x = random_input()
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    vals, idx = pre.topk(K, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, idx, vals) @ t["W_dec"] + t["b_dec"]
    assert_close(sae(x), expected, what="sparsify repo")


def test_dictionary_learning_release(hub, monkeypatch):
    repo = "org/dl-saes"
    use_registry(
        monkeypatch,
        release(
            "dl-fake",
            repo_id=repo,
            conversion_func="dictionary_learning_1",
            saes_map={"blocks.2.hook_resid_post": "resid_2/trainer_0"},
        ),
    )
    folder = hub.snapshot(repo) / "resid_2" / "trainer_0"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(13)
    sd = {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g),
        "encoder.bias": torch.randn(D_SAE, generator=g) * 0.1,
        "decoder.weight": torch.randn(D_IN, D_SAE, generator=g),
        "bias": torch.randn(D_IN, generator=g),
    }
    torch.save(sd, folder / "ae.pt")
    trainer = {
        "dict_class": "AutoEncoder",
        "activation_dim": D_IN,
        "dict_size": D_SAE,
        "layer": 2,
        "lm_name": "EleutherAI/pythia-70m-deduped",
    }
    (folder / "config.json").write_text(json.dumps({"trainer": trainer}))

    sae = fastsae.SAE.from_pretrained("dl-fake", "blocks.2.hook_resid_post")
    assert isinstance(sae, fastsae.StandardSAE)
    assert sae.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    assert sae.cfg.metadata.model_name == "pythia-70m-deduped"
    x = random_input()
    f = torch.relu((x - sd["bias"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
    assert_close(sae(x), f @ sd["decoder.weight"].T + sd["bias"], what="dictionary_learning")


def test_shipped_registry():
    directory = get_pretrained_saes_directory()
    assert "gpt2-small-res-jb" in directory
    rel = directory["gpt2-small-res-jb"]
    assert isinstance(rel, PretrainedRelease)
    assert rel.repo_id == "jbloom/GPT2-Small-SAEs-Reformatted"
    assert "blocks.8.hook_resid_pre" in rel.saes_map
    assert rel.saes_map["blocks.8.hook_resid_pre"] == "blocks.8.hook_resid_pre"
    assert rel.neuronpedia_id["blocks.8.hook_resid_pre"] == "gpt2-small/8-res-jb"


def test_shipped_registry_matches_installed_sae_lens():
    from sae_lens.loading.pretrained_saes_directory import (
        get_pretrained_saes_directory as sae_lens_directory,
    )

    ours, theirs = get_pretrained_saes_directory(), sae_lens_directory()
    hint = "regenerate it with `python scripts/build_registry.py`"
    assert set(ours) == set(theirs), f"releases differ: {set(ours) ^ set(theirs)}; {hint}"
    for name, info in theirs.items():
        mine = ours[name]
        assert mine.repo_id == info.repo_id, name
        assert mine.saes_map == info.saes_map, name
        assert mine.conversion_func == info.conversion_func, name
        assert mine.config_overrides == info.config_overrides, name
        their_np = {k: v for k, v in (info.neuronpedia_id or {}).items() if v is not None}
        assert mine.neuronpedia_id == their_np, name
        assert mine.norm_scaling_factor == (info.norm_scaling_factor or {}), name


# --------------------------------------------------------------------------- tuples and sparsity
def test_with_cfg_and_sparsity(hub):
    sae = random_sae("topk")
    log_sparsity = torch.randn(D_SAE)
    sae.save_model(hub.snapshot("user/repo") / "blocks.0", sparsity=log_sparsity)
    loaded, cfg_dict, got = fastsae.SAE.from_pretrained_with_cfg_and_sparsity(
        "user/repo", "blocks.0"
    )
    assert isinstance(loaded, fastsae.TopKSAE)
    assert torch.equal(got, log_sparsity)
    assert cfg_dict["architecture"] == "topk"
    assert cfg_dict["d_sae"] == D_SAE and cfg_dict["k"] == K
    assert cfg_dict["hook_name"] == HOOK  # flat, as older code reads it
    assert cfg_dict["metadata"]["hook_name"] == HOOK
    # sae-lens returns the same sparsity from the same cache
    _, _, theirs = sae_lens.SAE.from_pretrained_with_cfg_and_sparsity("user/repo", "blocks.0")
    assert torch.equal(theirs, log_sparsity)


def test_with_cfg_and_sparsity_without_sparsity_file(hub):
    random_sae().save_model(hub.snapshot("user/repo") / "blocks.0")
    _, _, got = fastsae.SAE.from_pretrained_with_cfg_and_sparsity("user/repo", "blocks.0")
    assert got is None


def test_old_tuple_unpacking_warns(hub):
    sae = random_sae("gated")
    log_sparsity = torch.randn(D_SAE)
    sae.save_model(hub.snapshot("user/repo") / "blocks.0", sparsity=log_sparsity)
    with pytest.warns(DeprecationWarning, match="from_pretrained_with_cfg_and_sparsity"):
        loaded, cfg_dict, sparsity = fastsae.SAE.from_pretrained("user/repo", "blocks.0")
    assert isinstance(loaded, fastsae.GatedSAE)
    assert cfg_dict["architecture"] == "gated"
    # the pre-6 flat spelling works on the unpacked dict, as on the returned one
    assert cfg_dict["hook_name"] == loaded.cfg.metadata.hook_name
    assert "metadata" in cfg_dict
    assert torch.equal(sparsity, log_sparsity)
    x = random_input()
    assert_close(loaded(x), sae(x), tol=0.0)
    # indexing, the other spelling of the old tuple
    with pytest.warns(DeprecationWarning):
        assert torch.equal(loaded[2], log_sparsity)
    with pytest.warns(DeprecationWarning), pytest.raises(IndexError):
        loaded[3]


# --------------------------------------------------------------------------- local directories
def test_local_directory_as_release(tmp_path, hub):
    sae = random_sae("jumprelu")
    sae.save_model(tmp_path / "my_saes" / "layer_0", sparsity=torch.zeros(D_SAE))
    loaded, _, sparsity = fastsae.SAE.from_pretrained_with_cfg_and_sparsity(
        str(tmp_path / "my_saes"), "layer_0"
    )
    assert isinstance(loaded, fastsae.JumpReLUSAE)
    assert torch.equal(sparsity, torch.zeros(D_SAE))
    x = random_input()
    assert_close(loaded(x), sae(x), tol=0.0)


def test_local_directory_missing_folder(tmp_path, hub):
    (tmp_path / "my_saes").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        fastsae.SAE.from_pretrained(str(tmp_path / "my_saes"), "layer_9")
    assert str(tmp_path / "my_saes" / "layer_9") in str(e.value)


def test_local_directory_pre_6_folder(tmp_path, hub):
    sae = random_sae("standard")
    write_pre6_folder(tmp_path / "repo" / "blocks.0", sae)
    loaded = fastsae.SAE.from_pretrained(str(tmp_path / "repo"), "blocks.0")
    assert loaded.cfg.metadata.hook_name == HOOK
    assert loaded.cfg.metadata.context_size == 128
    x = random_input()
    assert_close(loaded(x), sae(x), tol=0.0)
