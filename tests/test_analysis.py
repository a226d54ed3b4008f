"""fastsae.analysis on a tiny TransformerLens model: outputs checked, not just run."""

from __future__ import annotations

import pytest
import torch
from tiny_runs import tiny_model

import fastsae
from fastsae.analysis import (
    ablation_hook,
    feature_attribution,
    feature_logit_lens,
    generate_with_steering,
    steering_hook,
    top_activating_contexts,
)

HOOK = "blocks.1.hook_resid_pre"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def sae():
    s = fastsae.SAE.from_dict(
        {"architecture": "standard", "d_in": 16, "d_sae": 64, "metadata": {"hook_name": HOOK}}
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in s.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return s


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 50, (6, 12), generator=torch.Generator().manual_seed(1))


def _dense_acts(sae, model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    return sae.encode(cache[HOOK])


def test_top_activating_contexts_are_the_largest_activations(sae, model, tokens):
    acts = _dense_acts(sae, model, tokens)  # [6, 12, 64]
    features = [0, 5, 17]
    res = top_activating_contexts(sae, model, tokens, features, k=4, window=2, batch_size=4)
    for f in features:
        expected = acts[..., f].flatten().topk(4).values
        got = [ex.activation for ex in res[f]]
        torch.testing.assert_close(torch.tensor(got), expected[expected > 0], rtol=1e-5, atol=1e-6)
        for ex in res[f]:
            assert acts[ex.sequence, ex.position, f].item() == pytest.approx(
                ex.activation, rel=1e-5
            )
            lo = max(ex.position - 2, 0)
            assert ex.context == tokens[ex.sequence, lo : ex.position + 3].tolist()
    # a batch iterable gives the same as one tensor
    split = top_activating_contexts(sae, model, list(tokens.split(2)), features, k=4, window=2)
    assert [e.activation for e in split[5]] == [e.activation for e in res[5]]
    with pytest.raises(ValueError, match="d_sae=64"):
        top_activating_contexts(sae, model, tokens, [64])


def test_feature_logit_lens_is_w_dec_times_w_u(sae, model):
    res = feature_logit_lens(sae, model, [3, 9], k=5)
    for lens in res:
        logits = sae.W_dec[lens.feature] @ model.W_U
        assert lens.top_tokens == logits.topk(5).indices.tolist()
        assert lens.bottom_tokens == (-logits).topk(5).indices.tolist()
        assert lens.top_logits[0] == pytest.approx(logits.max().item(), rel=1e-5)
        assert lens.bottom_logits[0] == pytest.approx(logits.min().item(), rel=1e-5)


def test_attribution_sums_as_the_linear_algebra_says(sae, model, tokens):
    seq = tokens[:1]
    target = 7
    attr = feature_attribution(sae, model, seq, target, position=-1)
    # the gradient of the same logit w.r.t. the hook's activation, without any SAE
    grads = {}
    x_saved = {}

    def keep(x, hook):
        x = x.detach().requires_grad_(True)
        x_saved["x"] = x
        return x

    logits = model.run_with_hooks(seq, fwd_hooks=[(HOOK, keep)])
    (g,) = torch.autograd.grad(logits[0, -1, target], [x_saved["x"]])
    grads["x"] = g[0]
    x = x_saved["x"].detach()[0]
    assert attr.metric == pytest.approx(logits[0, -1, target].item(), rel=1e-5)
    # with the error term the spliced output is x itself: sum over features plus error
    # equals <x - b_dec, g> at every position
    total = attr.scores.sum(-1) + attr.error
    expected = ((x - sae.b_dec) * grads["x"]).sum(-1)
    torch.testing.assert_close(total, expected, rtol=1e-4, atol=1e-5)
    # and each feature's gradient is <W_dec[f], g>
    torch.testing.assert_close(attr.gradients, grads["x"] @ sae.W_dec.T, rtol=1e-4, atol=1e-6)
    assert attr.scores.abs().sum() > 0


def test_ablating_every_active_feature_changes_the_logits(sae, model, tokens):
    clean = model(tokens)
    # ablating a feature that never fires changes nothing (the error term is kept)
    acts = _dense_acts(sae, model, tokens)
    silent = (acts.reshape(-1, 64) == 0).all(0).nonzero().flatten().tolist()
    if silent:
        same = model.run_with_hooks(tokens, fwd_hooks=[ablation_hook(sae, silent)])
        torch.testing.assert_close(same, clean, rtol=1e-4, atol=1e-5)
    active = (acts.reshape(-1, 64) != 0).any(0).nonzero().flatten().tolist()
    ablated = model.run_with_hooks(tokens, fwd_hooks=[ablation_hook(sae, active)])
    assert (ablated - clean).abs().max() > 1e-3


def test_steering_changes_the_generated_tokens(sae, model, tokens):
    prompt = tokens[:2, :6]
    kw = dict(max_new_tokens=5, do_sample=False, verbose=False, stop_at_eos=False,
              use_past_kv_cache=False)  # fmt: skip
    plain = model.generate(prompt, **kw)
    steered = generate_with_steering(model, sae, 4, 50.0, prompt, **kw)
    assert plain.shape == steered.shape
    assert not torch.equal(plain[:, 6:], steered[:, 6:])
    # the hook is removed afterwards
    torch.testing.assert_close(model.generate(prompt, **kw), plain)
    name, fn = steering_hook(sae, 4, 2.0)
    x = torch.zeros(1, 3, 16)
    torch.testing.assert_close(fn(x, None)[0, 1], 2.0 * sae.W_dec[4].detach())
    assert name == HOOK
