"""What works on which TransformerLens: fastsae itself and its SAE modules on every
supported version; HookedSAETransformer / model_class_name HookedTransformer only on
TransformerLens 3, with an error naming the installed version elsewhere; the
TransformerBridge path only where ``transformer_lens.model_bridge`` exists, likewise."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

import fastsae
from fastsae.tl_compat import (
    has_hooked_transformer,
    require_transformer_bridge,
    transformer_lens_version,
)

VERSION = transformer_lens_version()
MAJOR = int(VERSION.split(".")[0])


def test_declared_transformer_lens_range_admits_both_lanes():
    """pyproject declares 3.x and 4.x (the two CI lanes) and nothing outside them."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    (spec,) = [Requirement(d).specifier for d in deps if Requirement(d).name == "transformer-lens"]
    assert VERSION in spec
    candidates = ["2.16.0", "3.0.0", "3.9.0", "4.0.0", "4.3.0", "5.0.0"]
    assert list(spec.filter(candidates)) == ["3.0.0", "3.9.0", "4.0.0", "4.3.0"]


def test_sae_modules_and_their_hooks_work():
    """The SAE modules subclass TransformerLens's HookedRootModule/HookPoint on every
    supported version: run_with_cache sees the SAE's hooks and a hook can edit them."""
    sae = fastsae.SAE.from_dict(
        {"architecture": "topk", "d_in": 8, "d_sae": 32, "k": 3,
         "metadata": {"hook_name": "blocks.0.hook_resid_pre"}}
    )  # fmt: skip
    x = torch.randn(5, 8)
    out, cache = sae.run_with_cache(x)
    assert set(cache.keys()) >= {"hook_sae_input", "hook_sae_acts_post", "hook_sae_output"}
    assert int((cache["hook_sae_acts_post"] > 0).sum(-1).max()) <= 3
    zeroed = sae.run_with_hooks(
        x, fwd_hooks=[("hook_sae_acts_post", lambda acts, hook: torch.zeros_like(acts))]
    )
    assert torch.allclose(zeroed, sae.b_dec.expand_as(zeroed)) and not torch.equal(out, zeroed)


@pytest.mark.skipif(MAJOR < 4, reason=f"TransformerLens {VERSION} has HookedTransformer")
def test_hooked_sae_transformer_names_the_version_on_transformer_lens_4(tmp_path):
    with pytest.raises(ImportError, match=rf"TransformerLens {VERSION}.*SAETransformerBridge"):
        from fastsae import HookedSAETransformer  # noqa: F401
    assert not fastsae.has_hooked_transformer() and fastsae.has_transformer_bridge()
    # the runner's default model_class_name fails before any download, naming the version
    import tiny_runs

    from fastsae.training.runner import load_model

    cfg = tiny_runs.runner_config(tmp_path, model_name="gpt2")
    assert cfg.model_class_name == "HookedTransformer"
    with pytest.raises(ImportError, match=rf"TransformerLens {VERSION}.*'TransformerBridge'"):
        load_model(cfg)


@pytest.mark.skipif(
    not has_hooked_transformer(), reason=f"TransformerLens {VERSION} has no HookedTransformer"
)
def test_hooked_sae_transformer_imports_on_transformer_lens_3():
    from transformer_lens import HookedTransformer

    from fastsae import HookedSAETransformer

    assert issubclass(HookedSAETransformer, HookedTransformer)


def test_bridge_path_names_the_version_without_model_bridge(monkeypatch):
    """A TransformerLens without ``model_bridge`` (2.x, early 3.x) gets an error naming
    it from SAETransformerBridge and from model_class_name TransformerBridge."""
    monkeypatch.setitem(sys.modules, "transformer_lens.model_bridge", None)
    monkeypatch.delitem(sys.modules, "fastsae.sae_bridge", raising=False)
    assert not fastsae.has_transformer_bridge()
    with pytest.raises(ImportError, match=rf"TransformerLens {VERSION}.*HookedSAETransformer"):
        require_transformer_bridge()
    with pytest.raises(ImportError, match=rf"TransformerLens {VERSION}"):
        from fastsae import SAETransformerBridge  # noqa: F401
