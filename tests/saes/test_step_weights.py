"""step_weights: one gradient-merging node per weight matrix gives the same gradients as
using the parameters directly, and hands autograd a single buffer per matrix."""

import pytest
import torch
from sae_testing import assert_close

from fastsae.saes.step_weights import step_weights


def _uses(W_enc, W_dec, dead, rescale, g):
    """A loss touching every use a TopK step makes: encoder, decoder, norms, dead slices."""
    w = step_weights(W_enc, W_dec, dead, rescale)
    x = torch.randn(5, W_enc.shape[0], generator=g, dtype=W_enc.dtype)
    loss = (x @ w.W_enc).square().sum() + (
        torch.randn(5, W_dec.shape[0], generator=g) @ w.W_dec
    ).sum()
    if rescale:
        loss = loss + (w.dec_norm * torch.arange(W_dec.shape[0])).sum()
    if dead is not None:
        loss = loss + (x @ w.W_enc_dead).sin().sum() + w.W_dec_dead.cos().sum()
    return loss


def _direct(W_enc, W_dec, dead, rescale, g):
    x = torch.randn(5, W_enc.shape[0], generator=g, dtype=W_enc.dtype)
    loss = (x @ W_enc).square().sum() + (torch.randn(5, W_dec.shape[0], generator=g) @ W_dec).sum()
    if rescale:
        loss = loss + (W_dec.norm(dim=-1) * torch.arange(W_dec.shape[0])).sum()
    if dead is not None:
        loss = loss + (x @ W_enc[:, dead]).sin().sum() + W_dec[dead].cos().sum()
    return loss


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("with_dead", [True, False])
@pytest.mark.parametrize("create_graph", [False, True])
def test_step_weights_gradients_equal_direct_uses(rescale, with_dead, create_graph):
    torch.manual_seed(0)
    W_enc = torch.randn(6, 20, requires_grad=True)
    W_dec = torch.randn(20, 6, requires_grad=True)
    with torch.no_grad():
        W_dec[3] = 0  # a zero row: its norm's gradient is 0, as torch's
    dead = torch.tensor([1, 3, 7, 19]) if with_dead else None
    grads = torch.autograd.grad(
        _uses(W_enc, W_dec, dead, rescale, torch.Generator().manual_seed(1)),
        (W_enc, W_dec), create_graph=create_graph,
    )  # fmt: skip
    ref = torch.autograd.grad(
        _direct(W_enc, W_dec, dead, rescale, torch.Generator().manual_seed(1)),
        (W_enc, W_dec), create_graph=create_graph,
    )  # fmt: skip
    for name, mine, theirs in zip(("W_enc", "W_dec"), grads, ref, strict=True):
        assert_close(mine, theirs, 1e-6, name)
        assert mine.stride() == theirs.stride(), name
        assert mine.requires_grad == theirs.requires_grad, name


def test_step_weights_unused_alias_and_frozen_matrix():
    """Only the norms and dead rows used: the gradient still comes out whole; a frozen
    W_enc gets none."""
    W_enc = torch.randn(4, 10)
    W_dec = torch.randn(10, 4, requires_grad=True)
    dead = torch.tensor([2, 5])
    w = step_weights(W_enc, W_dec, dead, True)
    (w.dec_norm.sum() + w.W_dec_dead.sum()).backward()
    expected = W_dec.detach() / W_dec.detach().norm(dim=-1, keepdim=True)
    expected[dead] += 1
    assert_close(W_dec.grad, expected, 1e-6, "W_dec")
    assert W_enc.grad is None


def test_step_weights_without_autograd_are_the_parameters():
    W_enc = torch.randn(4, 10, requires_grad=True)
    W_dec = torch.randn(10, 4, requires_grad=True)
    with torch.no_grad():
        w = step_weights(W_enc, W_dec, torch.tensor([1]), True)
    assert w.W_enc is W_enc and w.W_dec is W_dec
    assert_close(w.dec_norm, W_dec.norm(dim=-1), 0, "dec_norm")
    assert torch.equal(w.W_dec_dead, W_dec[[1]]) and torch.equal(w.W_enc_dead, W_enc[:, [1]])
