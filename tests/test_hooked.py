"""HookedSAETransformer: SAEs spliced into a tiny TransformerLens model.

Parity tests run sae-lens's HookedSAETransformer on the same model weights with
sae-lens twins of the same SAEs (``to_sae_lens``) and compare logits, every SAE
cache entry and gradients. The rest assert what the workflows promise: the error
term gives back the clean logits, ablation and steering change the outputs,
attribution gradients obey the linear algebra, reset puts everything back.
"""

from __future__ import annotations

import copy
import math

import pytest
import sae_lens
import torch
from sae_testing import assert_close
from tiny_runs import tiny_config
from transformer_lens import HookedTransformer

import fastsae
from fastsae.hooked import HookedSAETransformer
from fastsae.saes import base as saes_base

pytestmark = pytest.mark.filterwarnings(
    "ignore:HookedTransformer is deprecated:DeprecationWarning",
    "ignore:Setting use_error_term directly:DeprecationWarning",
)

D_MODEL, D_SAE, K = 16, 64, 4  # D_MODEL: tiny_runs' model width
RESID = "blocks.1.hook_resid_pre"
TOL = 1e-5
SAE_HOOKS = (
    "hook_sae_input",
    "hook_sae_acts_pre",
    "hook_sae_acts_post",
    "hook_sae_output",
    "hook_sae_recons",
    "hook_sae_error",
)

# name -> (architecture, extra cfg fields, metadata)
SAE_SPECS = {
    "standard": ("standard", {}, {"hook_name": RESID}),
    "topk": ("topk", {"k": K}, {"hook_name": RESID}),
    "jumprelu": ("jumprelu", {}, {"hook_name": RESID}),
    "gated": ("gated", {}, {"hook_name": RESID}),
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
    "jumprelu_transcoder": (
        "jumprelu_transcoder",
        {"d_out": D_MODEL, "apply_b_dec_to_input": False},
        {"hook_name": "blocks.1.ln2.hook_normalized", "hook_name_out": "blocks.1.hook_mlp_out"},
    ),
}


def make_model(**overrides) -> HookedSAETransformer:
    return HookedSAETransformer(tiny_config(**overrides))


def sae_lens_twin_model(model: HookedSAETransformer) -> sae_lens.HookedSAETransformer:
    ref = sae_lens.HookedSAETransformer(model.cfg)
    ref.load_state_dict(model.state_dict())
    return ref


@torch.no_grad()
def randomize_(sae: torch.nn.Module, seed: int = 0) -> None:
    """Random weights with features that fire on the tiny model's activations."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(sae.named_parameters()):
        r = torch.randn(p.shape, generator=gen)
        if name == "threshold":
            value = 0.05 + 0.1 * torch.rand(p.shape, generator=gen)
        elif name in ("W_enc", "W_skip"):
            value = 2.0 * r / math.sqrt(p.shape[0] if name == "W_enc" else p.shape[1])
        elif name == "W_dec":
            value = r / math.sqrt(p.shape[1])
        elif name == "r_mag":
            value = 0.3 * r
        else:  # b_enc, b_dec, b_gate, b_mag
            value = 0.1 * r
        p.copy_(value)


def make_sae(spec: str, seed: int = 0) -> fastsae.SAE:
    arch, extra, metadata = SAE_SPECS[spec]
    cfg = {"architecture": arch, "d_in": D_MODEL, "d_sae": D_SAE, "metadata": dict(metadata)}
    sae = fastsae.SAE.from_dict({**cfg, **extra})
    randomize_(sae, seed)
    return sae


def tokens(batch: int = 2, pos: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50, (batch, pos), generator=torch.Generator().manual_seed(seed))


def out_hook(sae) -> str:
    return sae.cfg.metadata.hook_name_out or sae.cfg.metadata.hook_name


# --------------------------------------------------------------------------- sae-lens parity
@pytest.mark.parametrize("use_error_term", [False, True])
@pytest.mark.parametrize("spec", list(SAE_SPECS))
def test_parity_with_sae_lens(spec, use_error_term):
    """Logits, every SAE cache entry, and gradients (sparse path) equal sae-lens's."""
    model = make_model()
    ref = sae_lens_twin_model(model)
    sae = make_sae(spec)
    twin = sae.to_sae_lens()
    toks = tokens()

    logits, cache = model.run_with_cache_with_saes(toks, saes=[sae], use_error_term=use_error_term)
    ref_logits, ref_cache = ref.run_with_cache_with_saes(
        toks, saes=[twin], use_error_term=use_error_term
    )
    assert_close(logits, ref_logits, TOL, "logits")
    assert set(cache.keys()) == set(ref_cache.keys())
    hook = out_hook(sae)
    sae_keys = {k for k in ref_cache.cache_dict if ".hook_sae_" in k}
    expected = {f"{hook}.{h}" for h in SAE_HOOKS if h != "hook_sae_error" or use_error_term}
    assert sae_keys == expected
    for key in sorted(sae_keys):
        assert cache[key].shape == ref_cache[key].shape, key
        assert torch.allclose(cache[key], ref_cache[key], atol=1e-5, rtol=1e-5), key
    acts = cache[f"{hook}.hook_sae_acts_post"]
    assert acts.shape == (*toks.shape, D_SAE) and (acts > 0).any()
    if spec == "hook_z":
        assert cache[f"{hook}.hook_sae_output"].shape == (*toks.shape, 4, 4)
    # both models are left as they were
    assert model.acts_to_saes == {} and ref.acts_to_saes == {}

    # gradients through the spliced SAE, run without a cache (fastsae's sparse path)
    proj = torch.randn(model.cfg.d_vocab, generator=torch.Generator().manual_seed(2))
    ours_out = model.run_with_saes(toks, saes=[sae], use_error_term=use_error_term)
    (ours_out @ proj).sum().backward()
    ref_out = ref.run_with_saes(toks, saes=[twin], use_error_term=use_error_term)
    (ref_out @ proj).sum().backward()
    assert_close(ours_out, ref_out, TOL, "run_with_saes logits")
    assert_close(model.embed.W_E.grad, ref.embed.W_E.grad, TOL, "grad W_E")
    assert_close(model.blocks[0].attn.W_Q.grad, ref.blocks[0].attn.W_Q.grad, TOL, "grad W_Q")
    for name, p in sae.named_parameters():
        their_grad = dict(twin.named_parameters())[name].grad
        if their_grad is None or not their_grad.abs().sum():
            assert p.grad is None or not p.grad.abs().sum(), name
        else:
            assert_close(p.grad, their_grad, 1e-4, f"grad {name}")


def test_sparse_path_unless_acts_hooked(monkeypatch):
    """run_with_saes decodes sparsely; caching the activations makes the SAE go dense."""
    calls = []
    real = saes_base.ops.sparse_decode

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(saes_base.ops, "sparse_decode", spy)
    model, sae = make_model(), make_sae("topk")
    sparse_logits = model.run_with_saes(tokens(), saes=[sae])
    assert calls, "run_with_saes did not take the sparse path"
    calls.clear()
    dense_logits, cache = model.run_with_cache_with_saes(tokens(), saes=[sae])
    assert not calls, "hooked activations must be computed densely"
    assert_close(sparse_logits, dense_logits, TOL, "sparse vs dense logits")
    assert ((cache[f"{RESID}.hook_sae_acts_post"] != 0).sum(-1) == K).all()


def test_residual_input_gradient_matches_dense_formula():
    """x.grad through the sparse TopK path equals autograd through the dense maths."""
    model, sae = make_model(), make_sae("topk")
    gen = torch.Generator().manual_seed(3)
    resid = torch.randn(2, 6, D_MODEL, generator=gen)
    target = torch.randint(0, 50, (2, 6), generator=gen)

    x = resid.clone().requires_grad_(True)
    logits = model.run_with_saes(x, start_at_layer=1, saes=[sae])
    logits.gather(-1, target[..., None]).sum().backward()

    def dense_sae(act, hook):
        pre = (act - sae.b_dec) @ sae.W_enc + sae.b_enc
        top = pre.topk(K, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        return acts @ sae.W_dec + sae.b_dec

    x_ref = resid.clone().requires_grad_(True)
    ref_logits = model.run_with_hooks(x_ref, start_at_layer=1, fwd_hooks=[(RESID, dense_sae)])
    ref_logits.gather(-1, target[..., None]).sum().backward()
    assert_close(logits, ref_logits, TOL, "logits")
    assert_close(x.grad, x_ref.grad, TOL, "x.grad")


# --------------------------------------------------------------------------- error term, reset
@pytest.mark.parametrize("spec", ["standard", "topk", "hook_z", "transcoder"])
def test_error_term_gives_clean_logits(spec):
    model, sae = make_model(), make_sae(spec)
    toks = tokens()
    clean = model(toks)
    spliced = model.run_with_saes(toks, saes=[sae])
    assert (spliced - clean).abs().max() > 1e-2, "the SAE should change the logits"
    with_error, cache = model.run_with_cache_with_saes(toks, saes=[sae], use_error_term=True)
    assert torch.allclose(with_error, clean, atol=1e-5), (with_error - clean).abs().max()
    hook = out_hook(sae)
    error, recons = cache[f"{hook}.hook_sae_error"], cache[f"{hook}.hook_sae_recons"]
    if spec == "hook_z":
        error = error.flatten(-2)
    if spec != "transcoder":  # a transcoder's error lives in the output space
        assert_close(error + recons, cache[f"{hook}.hook_sae_input"], TOL, "error + recons")
    assert sae.use_error_term is False


def test_interventions_survive_the_error_term():
    """Ablating all features with use_error_term=True leaves b_dec + the clean error."""
    model, sae = make_model(), make_sae("standard")
    toks = tokens()
    _, cache = model.run_with_cache_with_saes(toks, saes=[sae], use_error_term=True)
    seen = {}

    def zero(acts, hook):
        return torch.zeros_like(acts)

    def grab(out, hook):
        seen["out"] = out.detach().clone()

    clean = model(toks)
    ablated = model.run_with_hooks_with_saes(
        toks,
        saes=[sae],
        use_error_term=True,
        fwd_hooks=[(f"{RESID}.hook_sae_acts_post", zero), (f"{RESID}.hook_sae_output", grab)],
    )
    assert (ablated - clean).abs().max() > 1e-2
    expected = sae.b_dec + cache[f"{RESID}.hook_sae_error"]
    assert_close(seen["out"], expected, TOL, "ablated output")


def test_add_sae_and_reset_saes_restore_the_model():
    model = make_model()
    toks = tokens()
    clean = model(toks)
    original_hook = model.hook_dict[RESID]
    seen = []
    original_hook.add_hook(lambda act, hook: seen.append(1), is_permanent=True)

    sae = make_sae("standard")
    model.add_sae(sae, use_error_term=True)
    assert model.acts_to_saes == {RESID: sae}
    assert RESID not in model.hook_dict
    assert {f"{RESID}.{h}" for h in SAE_HOOKS} <= set(model.hook_dict)
    assert sae.use_error_term is False  # the SAE itself is not modified
    assert torch.allclose(model(toks), clean, atol=1e-5)
    assert seen == []  # the model's own hook point is out of the loop

    # the context manager attaches on top and gives back the previous splice as it was
    other = make_sae("topk", seed=5)
    with model.saes(saes=[other]) as m:
        assert m is model and model.acts_to_saes == {RESID: other}
        assert (model(toks) - clean).abs().max() > 1e-2
    assert model.acts_to_saes == {RESID: sae}
    assert torch.allclose(model(toks), clean, atol=1e-5)

    # reset_saes_end=False keeps the SAEs; a second add at a hook replaces the first
    model.run_with_saes(toks, saes=[other], reset_saes_end=False)
    assert model.acts_to_saes == {RESID: other}
    model.add_sae(sae)
    assert model.acts_to_saes == {RESID: sae}
    assert (model(toks) - clean).abs().max() > 1e-2

    model.reset_saes(RESID)
    assert model.acts_to_saes == {}
    assert model.hook_dict[RESID] is original_hook
    assert torch.equal(model(toks), clean)
    assert seen == [1]  # its permanent hook came back with it
    assert sae.hook_sae_acts_post.name == "hook_sae_acts_post"
    with pytest.warns(UserWarning, match="nothing to reset"):
        model.reset_saes(RESID)


def test_sae_use_error_term_is_the_default():
    model, sae = make_model(), make_sae("jumprelu")
    sae.use_error_term = True
    toks = tokens()
    assert torch.allclose(model.run_with_saes(toks, saes=[sae]), model(toks), atol=1e-5)
    spliced = model.run_with_saes(toks, saes=[sae], use_error_term=False)
    assert (spliced - model(toks)).abs().max() > 1e-2
    assert sae.use_error_term is True


def test_two_saes_at_one_hook_in_one_context_unwind():
    model = make_model()
    a, b = make_sae("standard"), make_sae("topk")
    with model.saes(saes=[a, b]):
        assert model.acts_to_saes == {RESID: b}
    assert model.acts_to_saes == {}
    assert RESID in model.hook_dict


# --------------------------------------------------------------------------- errors
def test_bad_hook_names_raise():
    model = make_model()
    sae = fastsae.SAE.from_dict(
        {"architecture": "standard", "d_in": D_MODEL, "d_sae": D_SAE,
         "metadata": {"hook_name": "blocks.7.hook_resid_typo"}}
    )  # fmt: skip
    with pytest.raises(ValueError, match="blocks.7.hook_resid_typo"):
        model.add_sae(sae)
    with pytest.raises(ValueError, match="blocks.7.hook_resid_typo"):
        model.run_with_saes(tokens(), saes=[sae])
    sae.cfg.metadata.hook_name = None
    with pytest.raises(ValueError, match="hook_name"):
        model.add_sae(sae)
    tc = make_sae("transcoder")
    tc.cfg.metadata.hook_name_out = "blocks.0.hook_mlp_typo"
    with pytest.raises(ValueError, match="blocks.0.hook_mlp_typo"):
        model.add_sae(tc)
    assert model.acts_to_saes == {}


def test_output_hook_taken_by_a_transcoder_raises():
    model = make_model()
    model.add_sae(make_sae("transcoder"))
    sae = make_sae("standard")
    sae.cfg.metadata.hook_name = "blocks.0.hook_mlp_out"
    with pytest.raises(ValueError, match="already writes there"):
        model.add_sae(sae)
    sae.cfg.metadata.hook_name = "blocks.0.hook_mlp_out.hook_sae_input"
    with pytest.raises(ValueError, match="hook of the SAE attached at 'blocks.0.mlp.hook_in'"):
        model.add_sae(sae)
    assert list(model.acts_to_saes) == ["blocks.0.mlp.hook_in"]


def test_transcoder_whose_input_hook_never_runs_raises():
    model = make_model()
    tc = make_sae("transcoder")
    tc.cfg.metadata.hook_name = "blocks.0.hook_mlp_in"  # only runs with use_hook_mlp_in
    with pytest.raises(RuntimeError, match="hook_mlp_in"):
        model.run_with_saes(tokens(), saes=[tc])
    model.set_use_hook_mlp_in(True)
    ref = sae_lens_twin_model(model)
    ref.set_use_hook_mlp_in(True)
    assert_close(
        model.run_with_saes(tokens(), saes=[tc]),
        ref.run_with_saes(tokens(), saes=[tc.to_sae_lens()]),
        TOL,
        "hook_mlp_in transcoder",
    )


# --------------------------------------------------------------------------- transcoders
def test_chained_transcoders():
    """A transcoder reading the hook another transcoder writes sees that one's output."""
    model = make_model()
    first = make_sae("transcoder")  # blocks.0.mlp.hook_in -> blocks.0.hook_mlp_out
    second = make_sae("transcoder", seed=1)
    second.cfg.metadata.hook_name = "blocks.0.hook_mlp_out"
    second.cfg.metadata.hook_name_out = "blocks.0.hook_resid_post"
    for order in ([first, second], [second, first]):
        _, cache = model.run_with_cache_with_saes(tokens(), saes=order)
        assert_close(
            cache["blocks.0.hook_resid_post.hook_sae_input"],
            cache["blocks.0.hook_mlp_out.hook_sae_output"],
            TOL,
            "second transcoder's input",
        )
        assert model.acts_to_saes == {}
    model.add_sae(second)
    model.add_sae(first)
    model.reset_saes("blocks.0.mlp.hook_in")
    _, cache = model.run_with_cache(tokens())
    assert_close(
        cache["blocks.0.hook_resid_post.hook_sae_input"],
        cache["blocks.0.hook_mlp_out"],
        TOL,
        "input after the first is removed",
    )


def test_skip_transcoder_writes_its_full_prediction():
    """The skip path is part of what a skip transcoder writes (sae-lens leaves it out)."""
    model = make_model()
    arch, extra, metadata = SAE_SPECS["transcoder"]
    tc = fastsae.SAE.from_dict(
        {"architecture": "skip_transcoder", "d_in": D_MODEL, "d_sae": D_SAE,
         "metadata": metadata, **extra}
    )  # fmt: skip
    randomize_(tc)
    _, cache = model.run_with_cache_with_saes(tokens(), saes=[tc])
    mlp_in = cache["blocks.0.mlp.hook_in"]
    written = cache["blocks.0.hook_mlp_out.hook_sae_output"]
    assert_close(written, tc(mlp_in), TOL, "skip transcoder output")
    recons = cache["blocks.0.hook_mlp_out.hook_sae_recons"]
    assert_close(written - recons, mlp_in @ tc.W_skip.T, TOL, "skip term")


# --------------------------------------------------------------------------- workflows
def test_zero_ablating_active_features_changes_logits():
    model, sae = make_model(), make_sae("standard")
    toks = tokens()
    _, cache = model.run_with_cache_with_saes(toks, saes=[sae])
    active = (cache[f"{RESID}.hook_sae_acts_post"] > 0).flatten(0, 1).any(0).nonzero().squeeze(-1)
    assert active.numel() > 0

    def ablate(acts, hook):
        acts[..., active] = 0.0
        return acts

    spliced = model.run_with_saes(toks, saes=[sae])
    ablated = model.run_with_hooks_with_saes(
        toks, saes=[sae], fwd_hooks=[(f"{RESID}.hook_sae_acts_post", ablate)]
    )
    assert (ablated - spliced).abs().max() > 1e-2
    # the same through run_with_hooks on a model the SAE is attached to
    model.add_sae(sae)
    again = model.run_with_hooks(toks, fwd_hooks=[(f"{RESID}.hook_sae_acts_post", ablate)])
    model.reset_saes()
    assert torch.equal(again, ablated)
    # with every feature off the SAE writes b_dec: the same as patching b_dec in directly
    patched = model.run_with_hooks(
        toks, fwd_hooks=[(RESID, lambda act, hook: sae.b_dec.detach().expand_as(act))]
    )
    assert_close(ablated, patched, TOL, "ablated vs b_dec patched")


GEN_KWARGS = dict(max_new_tokens=5, do_sample=False, verbose=False, stop_at_eos=False)


def greedy(model, prompt: torch.Tensor, n: int = 5) -> torch.Tensor:
    """Greedy decoding by full forward passes (what generate without a KV cache does)."""
    seq = prompt
    for _ in range(n):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def test_generate_with_saes_and_steering():
    model, sae = make_model(), make_sae("standard")
    ref = sae_lens_twin_model(model)
    prompt = tokens(batch=1, pos=4, seed=7)
    clean = model.generate(prompt, **GEN_KWARGS)
    assert clean.shape == (1, 9)

    model.add_sae(sae, use_error_term=True)
    try:
        assert torch.equal(model.generate(prompt, **GEN_KWARGS), clean)
        direction = sae.W_dec[int(sae.W_dec.norm(dim=-1).argmax())].detach()

        def steer(out, hook):
            return out + 50.0 * direction

        with model.hooks(fwd_hooks=[(f"{RESID}.hook_sae_output", steer)]):
            steered = model.generate(prompt, **GEN_KWARGS)
            assert torch.equal(model.generate(prompt, use_past_kv_cache=False, **GEN_KWARGS),
                               greedy(model, prompt))  # fmt: skip
    finally:
        model.reset_saes()
    assert torch.equal(steered[:, :4], prompt)
    assert not torch.equal(steered, clean)

    # the spliced SAE alone (no error term): same tokens as sae-lens, with and without a
    # KV cache, and as greedy decoding through full forward passes
    with model.saes(saes=[sae]), ref.saes(saes=[sae.to_sae_lens()]):
        for kv in (True, False):
            ours = model.generate(prompt, use_past_kv_cache=kv, **GEN_KWARGS)
            assert torch.equal(ours, ref.generate(prompt, use_past_kv_cache=kv, **GEN_KWARGS))
        assert torch.equal(ours, greedy(model, prompt))
        assert not torch.equal(ours, clean)


def test_generate_excludes_special_tokens():
    """TransformerLens's generate feeds embeddings; the excluded ids are still found."""
    model, sae = make_model(), make_sae("standard")
    prompt = tokens(batch=1, pos=4, seed=7)
    special = int(prompt[0, 0])
    seen = {"in": [], "out": []}

    def record(key):
        def hook(act, hook):
            seen[key].append(act.clone())

        return hook

    hooks = [(f"{RESID}.hook_sae_input", record("in")), (f"{RESID}.hook_sae_output", record("out"))]
    with model.saes(saes=[sae], exclude_special_tokens=[special]):
        gen = model.generate(prompt, use_past_kv_cache=False, **GEN_KWARGS).clone()
        assert torch.equal(gen, greedy(model, prompt))  # greedy passes token ids
        with model.hooks(fwd_hooks=hooks):
            model.generate(prompt, use_past_kv_cache=True, **GEN_KWARGS)
    # the KV-cache steps see the prompt, then one new token each
    assert [t.shape[1] for t in seen["out"]] == [4, 1, 1, 1, 1]
    first_in, first_out = seen["in"][0], seen["out"][0]
    assert torch.equal(first_out[:, 0], first_in[:, 0])  # bypassed at the special token
    assert not torch.allclose(first_out[:, 1:], first_in[:, 1:])
    plain = model.run_with_saes(gen[:, :-1], saes=[sae])
    masked = model.run_with_saes(gen[:, :-1], saes=[sae], exclude_special_tokens=[special])
    assert (plain - masked).abs().max() > 1e-3, "test setup: the exclusion should matter"


def test_feature_attribution_obeys_the_decoder():
    """d logit / d acts[p, f] == W_dec[f] . d logit / d (SAE output)[p]; the feature
    contributions at p sum to (output - b_dec - error) . d logit / d output."""
    model, sae = make_model(), make_sae("standard")
    toks = tokens(batch=1, pos=6)
    saved = {}

    def keep(name):
        def hook(act, hook):
            if act.requires_grad:  # the error term carries no gradient, as in sae-lens
                act.retain_grad()
            saved[name] = act
            return act

        return hook

    logits = model.run_with_hooks_with_saes(
        toks,
        saes=[sae],
        use_error_term=True,
        fwd_hooks=[
            (f"{RESID}.hook_sae_acts_post", keep("acts")),
            (f"{RESID}.hook_sae_error", keep("error")),
            (f"{RESID}.hook_sae_output", keep("out")),
        ],
        bwd_hooks=[(f"{RESID}.hook_sae_acts_post", lambda grad, hook: saved.update(bwd=grad))],
        reset_hooks_end=False,  # the backward hook must outlive the forward pass
    )
    target = 3
    logits[0, -1, target].backward()
    model.reset_hooks()
    acts, out = saved["acts"], saved["out"]
    expected = out.grad @ sae.W_dec.detach().T  # [1, pos, d_sae]
    assert_close(acts.grad, expected, TOL, "d logit / d acts")
    assert_close(saved["bwd"], expected, TOL, "backward hook's gradient")
    contributions = (acts * acts.grad).sum(-1)
    linear = ((out - sae.b_dec - saved["error"]) * out.grad).sum(-1)
    assert_close(contributions.detach(), linear.detach(), TOL, "attribution sum")
    assert acts.grad[0, :-1].abs().sum() > 0  # earlier positions matter through attention


def test_exclude_special_tokens_bypasses_those_positions():
    model, sae = make_model(), make_sae("topk")
    ref = sae_lens_twin_model(model)
    toks = tokens()
    toks[:, 0] = 7
    toks[1, 4] = 7
    out, cache = model.run_with_cache_with_saes(toks, saes=[sae], exclude_special_tokens=[7])
    ref_out, ref_cache = ref.run_with_cache_with_saes(
        toks, saes=[sae.to_sae_lens()], exclude_special_tokens=[7]
    )
    assert_close(out, ref_out, TOL, "logits")
    written = cache[f"{RESID}.hook_sae_output"]
    assert_close(written, ref_cache[f"{RESID}.hook_sae_output"], TOL, "output")
    bypass = toks == 7
    assert torch.equal(written[bypass], cache[f"{RESID}.hook_sae_input"][bypass])
    assert not torch.allclose(written[~bypass], cache[f"{RESID}.hook_sae_input"][~bypass])
    with pytest.warns(UserWarning, match="no tokenizer"):
        model.run_with_saes(toks, saes=[sae], exclude_special_tokens=True)


def test_sae_loaded_from_disk(tmp_path):
    model, sae = make_model(), make_sae("jumprelu")
    sae.save_model(tmp_path / "sae")
    loaded = fastsae.SAE.load_from_disk(tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
    toks = tokens()
    ours = model.run_with_saes(toks, saes=[loaded])
    assert_close(ours, model.run_with_saes(toks, saes=[sae]), TOL, "loaded vs original")
    ref = sae_lens_twin_model(model)
    assert_close(ours, ref.run_with_saes(toks, saes=[theirs]), TOL, "vs sae-lens")


def test_sae_dtype_differs_from_model():
    """A float64 SAE in a float32 model: the stream keeps float32."""
    model, sae = make_model(), make_sae("topk")
    sae64 = fastsae.SAE.from_dict({**sae.cfg.to_dict(), "dtype": "float64"})
    sae64.load_state_dict({k: v.double() for k, v in sae.state_dict().items()})
    toks = tokens()
    out64 = model.run_with_saes(toks, saes=[sae64])
    assert out64.dtype == torch.float32
    assert_close(out64, model.run_with_saes(toks, saes=[sae]), TOL, "float64 SAE")


# --------------------------------------------------------------------------- construction
def test_construction_state_dict_processing_and_copy():
    assert issubclass(HookedSAETransformer, HookedTransformer)
    plain = HookedTransformer(tiny_config())
    model = HookedSAETransformer(tiny_config())
    state = plain.state_dict()
    # what from_pretrained does after construction: load and fold LN into the weights
    for m in (plain, model):
        m.load_and_process_state_dict(
            state, fold_ln=True, center_writing_weights=True, center_unembed=True
        )
    assert isinstance(model, HookedSAETransformer)
    assert model.cfg.normalization_type == "LNPre"
    toks = tokens()
    assert_close(model(toks), plain(toks), TOL, "same model as HookedTransformer")
    assert {"blocks.0.mlp.hook_in", "blocks.1.mlp.hook_in"} <= set(model.hook_dict)

    tc = make_sae("transcoder")
    _, cache = model.run_with_cache_with_saes(toks, saes=[tc])
    assert_close(
        cache["blocks.0.mlp.hook_in"], cache["blocks.0.ln2.hook_normalized"], TOL, "hook_in"
    )
    assert_close(cache["blocks.0.hook_mlp_out.hook_sae_input"], cache["blocks.0.mlp.hook_in"])

    # a deep copy keeps its own mlp.hook_in wiring
    clone = copy.deepcopy(model)
    fired = []
    clone.blocks[0].mlp.hook_in.add_hook(lambda act, hook: fired.append(act.shape))
    model(toks)
    assert fired == []
    clone(toks)
    assert fired == [(*toks.shape, D_MODEL)]
    assert_close(clone.run_with_saes(toks, saes=[tc]), model.run_with_saes(toks, saes=[tc]))


def test_attn_only_model_has_no_mlp_hooks():
    model = make_model(attn_only=True)
    assert not any(k.endswith("mlp.hook_in") for k in model.hook_dict)
    sae = make_sae("standard")
    _, cache = model.run_with_cache_with_saes(tokens(), saes=[sae])
    assert f"{RESID}.hook_sae_acts_post" in cache.cache_dict
