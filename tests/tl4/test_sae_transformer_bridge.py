"""SAETransformerBridge: SAEs spliced into a TransformerLens ``TransformerBridge``.

The TransformerLens 4 lane (no sae-lens) runs this folder; the main lane (TransformerLens
3.x, whose late releases ship ``model_bridge`` too) runs it as well, and there the splice
is also compared with sae-lens's own ``SAETransformerBridge``. The model is a tiny
randomly initialised TransformerLens-native bridge (``boot_native``, offline). What the
tests assert: what the SAE writes at its hook is exactly the SAE applied to the clean
activation (so the model's output equals a run that patches the hook by hand), the error
term gives back the clean output, the SAE's hooks can be cached and hooked under both
spellings of the hook, reset puts every hook point back, and gradients reach the SAE.
"""

from __future__ import annotations

import math

import pytest
import torch
from sae_testing import assert_close

import fastsae
from fastsae.tl_compat import has_transformer_bridge, transformer_lens_version

pytestmark = pytest.mark.skipif(
    not has_transformer_bridge(),
    reason=f"TransformerLens {transformer_lens_version()} has no TransformerBridge",
)

D_MODEL, D_SAE, K = 16, 64, 4
RESID = "blocks.1.hook_resid_pre"
SAE_HOOKS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons")

# name -> (architecture, extra cfg fields, metadata)
SAE_SPECS = {
    "topk": ("topk", {"k": K}, {"hook_name": RESID}),
    "jumprelu": ("jumprelu", {}, {"hook_name": RESID}),
    "hook_z": (
        "topk",
        {"k": K, "reshape_activations": "hook_z"},
        {"hook_name": "blocks.0.attn.hook_z"},
    ),
    "transcoder": (
        "transcoder",
        {"d_out": D_MODEL, "apply_b_dec_to_input": False},
        {"hook_name": "blocks.0.mlp.hook_in", "hook_name_out": "blocks.0.hook_mlp_out"},
    ),
}


def make_bridge(seed: int = 0):
    from transformer_lens.config import TransformerBridgeConfig

    from fastsae import SAETransformerBridge

    cfg = TransformerBridgeConfig(
        d_model=D_MODEL, d_head=4, n_layers=2, n_ctx=16, n_heads=4, d_vocab=50, d_mlp=32,
        act_fn="relu", seed=seed,
    )  # fmt: skip
    return SAETransformerBridge.boot_native(cfg).eval()


@torch.no_grad()
def randomize_(sae: torch.nn.Module, seed: int = 0) -> None:
    """Random weights with features that fire on the tiny model's activations."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(sae.named_parameters()):
        r = torch.randn(p.shape, generator=gen)
        if name == "threshold":
            p.copy_(0.05 + 0.1 * torch.rand(p.shape, generator=gen))
        elif name == "W_enc":
            p.copy_(2.0 * r / math.sqrt(p.shape[0]))
        elif name == "W_dec":
            p.copy_(r / math.sqrt(p.shape[1]))
        else:
            p.copy_(0.1 * r)


def make_sae(spec: str, seed: int = 0) -> fastsae.SAE:
    arch, extra, metadata = SAE_SPECS[spec]
    cfg = {"architecture": arch, "d_in": D_MODEL, "d_sae": D_SAE, "metadata": dict(metadata)}
    sae = fastsae.SAE.from_dict({**cfg, **extra})
    randomize_(sae, seed)
    return sae


def tokens(batch: int = 2, pos: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50, (batch, pos), generator=torch.Generator().manual_seed(seed))


def in_out(sae) -> tuple[str, str]:
    meta = sae.cfg.metadata
    return meta.hook_name, meta.hook_name_out or meta.hook_name


@torch.no_grad()
def expected_write(model, sae, toks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(activation at the output hook, what the SAE must write there)`` on a clean run."""
    hook_in, hook_out = in_out(sae)
    _, cache = model.run_with_cache(toks, names_filter=[hook_in, hook_out])
    x = cache[hook_in]  # hook_z: [batch, pos, n_heads, d_head], as hooks see it
    pred = sae.decode(sae.encode(x))  # none of SAE_SPECS has a skip path
    return cache[hook_out], pred.reshape(cache[hook_out].shape)


@pytest.mark.parametrize("spec", list(SAE_SPECS))
def test_splice_writes_the_sae_output_and_the_error_term_restores_the_model(spec):
    """The logits with the SAE spliced in equal a clean run whose output hook is patched
    with the SAE's prediction by hand; with the error term they equal the clean logits."""
    model = make_bridge()
    sae = make_sae(spec)
    toks = tokens()
    hook_out = in_out(sae)[1]
    clean = model(toks)
    original, pred = expected_write(model, sae, toks)

    def patch(act, hook):
        return pred.reshape(act.shape)

    patched = model.run_with_hooks(toks, fwd_hooks=[(hook_out, patch)])
    spliced, cache = model.run_with_cache_with_saes(toks, saes=[sae])
    assert not torch.allclose(patched, clean, atol=1e-3)  # the SAE does change the model
    assert_close(spliced, patched, 1e-5, "logits with the SAE vs patched by hand")
    assert_close(cache[f"{hook_out}.hook_sae_output"].reshape(pred.shape), pred, 1e-5, "write")
    acts = cache[f"{hook_out}.hook_sae_acts_post"]
    assert acts.shape == (*toks.shape, D_SAE) and (acts > 0).any()

    with_error = model.run_with_saes(toks, saes=[sae], use_error_term=True)
    assert_close(with_error, clean, 1e-5, "logits with the error term")
    assert model.acts_to_saes == {}


def test_sae_hooks_under_both_spellings_and_get_sae_hook_name():
    """An SAE at an alias (blocks.1.hook_resid_pre = blocks.1.hook_in) lists its hooks
    under the alias (HookedSAETransformer's key) and the canonical name (sae-lens's)."""
    model = make_bridge()
    sae = make_sae("topk")
    canonical = model.get_sae_hook_name(sae)
    assert canonical == "blocks.1.hook_in.hook_sae_acts_post"
    _, cache = model.run_with_cache_with_saes(tokens(), saes=[sae])
    for hook in SAE_HOOKS:
        assert torch.equal(cache[f"{RESID}.{hook}"], cache[f"blocks.1.hook_in.{hook}"]), hook
    assert f"{RESID}.hook_sae_error" not in cache  # no error term asked for
    # while the SAE stands there, the hook point it replaced is not offered
    with model.saes(saes=[sae]):
        assert RESID not in model.hook_dict and "blocks.1.hook_in" not in model.hook_dict
        assert canonical in model.hook_dict


def test_interventions_on_sae_hooks_change_the_output():
    """Zero-ablating the active features through hook_sae_acts_post (by either spelling)
    changes the logits even with the error term; a no-op hook does not."""
    model = make_bridge()
    sae = make_sae("topk")
    toks = tokens()
    clean = model(toks)

    def zero(acts, hook):
        return torch.zeros_like(acts)

    def keep(acts, hook):
        return acts

    for name in (f"{RESID}.hook_sae_acts_post", "blocks.1.hook_in.hook_sae_acts_post"):
        ablated = model.run_with_hooks_with_saes(
            toks, saes=[sae], use_error_term=True, fwd_hooks=[(name, zero)]
        )
        assert (ablated - clean).abs().max() > 1e-3, name
    same = model.run_with_hooks_with_saes(
        toks, saes=[sae], use_error_term=True, fwd_hooks=[(f"{RESID}.hook_sae_acts_post", keep)]
    )
    assert_close(same, clean, 1e-5, "no-op hook")


def test_add_and_reset_saes_restore_every_hook_point():
    model = make_bridge()
    toks = tokens()
    clean = model(toks)
    hooks_before = dict(model.hook_dict)
    sae, transcoder = make_sae("topk"), make_sae("transcoder", seed=1)
    model.add_sae(sae)
    model.add_sae(transcoder)
    assert set(model.acts_to_saes) == {RESID, "blocks.0.mlp.hook_in"}
    assert not torch.allclose(model(toks), clean, atol=1e-3)
    model.reset_saes(RESID)
    assert set(model.acts_to_saes) == {"blocks.0.mlp.hook_in"}
    model.reset_saes()
    assert model.acts_to_saes == {}
    hooks_after = model.hook_dict
    assert hooks_after.keys() == hooks_before.keys()
    assert all(hooks_after[name] is hook for name, hook in hooks_before.items())
    assert_close(model(toks), clean, 0.0, "logits after reset")
    # a hook added by the user to the restored hook point still fires
    seen = []
    model.run_with_hooks(toks, fwd_hooks=[(RESID, lambda a, hook: seen.append(a.shape))])
    assert seen == [(*toks.shape, D_MODEL)]


def test_saes_context_restores_the_sae_it_displaced():
    model = make_bridge()
    first, second = make_sae("topk", seed=0), make_sae("topk", seed=5)
    model.add_sae(first)
    with model.saes(saes=[second]):
        assert model.acts_to_saes[RESID] is second
    assert model.acts_to_saes[RESID] is first
    model.reset_saes()


def test_bad_hook_names_and_double_writers_raise():
    model = make_bridge()
    bad = make_sae("topk")
    bad.cfg.metadata.hook_name = "blocks.9.hook_resid_pre"
    with pytest.raises(ValueError, match=r"'blocks\.9\.hook_resid_pre' is not a hook point"):
        model.add_sae(bad)
    model.add_sae(make_sae("transcoder"))
    rival = make_sae("topk")
    rival.cfg.metadata.hook_name = "blocks.0.mlp.hook_out"  # the transcoder's output module
    with pytest.raises(ValueError, match="already writes there"):
        model.add_sae(rival)
    inner = make_sae("topk")
    inner.cfg.metadata.hook_name = "blocks.0.hook_mlp_out.hook_sae_acts_post"
    with pytest.raises(ValueError, match="is a hook of the SAE attached at"):
        model.add_sae(inner)
    model.reset_saes()
    assert model.acts_to_saes == {}


def test_gradients_reach_the_sae_and_the_model():
    model = make_bridge()
    sae = make_sae("topk")
    out = model.run_with_saes(tokens(), saes=[sae])
    out.square().mean().backward()
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0
    assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0
    embed = next(p for n, p in model.named_parameters() if p.shape == (50, D_MODEL))
    assert embed.grad is not None and embed.grad.abs().sum() > 0


def test_from_bridge_converts_in_place_and_refuses_other_models():
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    from fastsae import SAETransformerBridge

    cfg = TransformerBridgeConfig(d_model=16, d_head=4, n_layers=1, n_ctx=8, n_heads=4, d_vocab=20)
    plain = TransformerBridge.boot_native(cfg)
    converted = SAETransformerBridge.from_bridge(plain)
    assert converted is plain and isinstance(plain, SAETransformerBridge)
    sae = fastsae.SAE.from_dict(
        {"architecture": "standard", "d_in": 16, "d_sae": 8,
         "metadata": {"hook_name": "blocks.0.hook_resid_post"}}
    )  # fmt: skip
    out, cache = converted.run_with_cache_with_saes(torch.tensor([[1, 2, 3]]), saes=sae)
    assert out.shape == (1, 3, 20) and "blocks.0.hook_resid_post.hook_sae_acts_post" in cache
    with pytest.raises(TypeError, match="needs a transformer_lens TransformerBridge"):
        SAETransformerBridge.from_bridge(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("use_error_term", [False, True])
@pytest.mark.parametrize("spec", ["topk", "jumprelu", "transcoder"])
def test_parity_with_sae_lens_bridge(spec, use_error_term, tiny_gpt2_dir):
    """Where sae-lens is installed (the TransformerLens 3 lane): logits and every SAE
    cache entry equal sae-lens's SAETransformerBridge, both booted from one GPT-2 folder."""
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed in this lane")
    if not hasattr(sae_lens, "SAETransformerBridge"):
        pytest.skip("this sae-lens has no SAETransformerBridge")
    from fastsae import SAETransformerBridge

    model = SAETransformerBridge.boot_transformers(str(tiny_gpt2_dir), device="cpu")
    ref = sae_lens.SAETransformerBridge.boot_transformers(str(tiny_gpt2_dir), device="cpu")
    sae = make_sae(spec)
    twin = sae.to_sae_lens()
    toks = tokens()
    logits, cache = model.run_with_cache_with_saes(toks, saes=[sae], use_error_term=use_error_term)
    ref_logits, ref_cache = ref.run_with_cache_with_saes(
        toks, saes=[twin], use_error_term=use_error_term
    )
    assert_close(logits, ref_logits, 1e-5, "logits")
    ref_keys = {k for k in ref_cache.cache_dict if ".hook_sae_" in k}
    assert ref_keys and ref_keys <= set(cache.keys())
    for key in sorted(ref_keys):
        assert_close(cache[key], ref_cache[key], 1e-5, key)
