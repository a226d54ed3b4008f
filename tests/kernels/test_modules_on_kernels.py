"""The SAE modules routed through the Triton kernels (``impl="auto"`` picks them on CUDA;
here ``auto`` is pointed at the kernels for CPU tensors under the interpreter), compared
with sae-lens on the same weights: outputs and gradients."""

import pytest
import torch
from sae_testing import assert_close

import fastsae

sae_lens = pytest.importorskip("sae_lens", reason="module parity needs sae-lens (dev extra)")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _pair(arch, device, **extra):
    cfg = {"architecture": arch, "d_in": 48, "d_sae": 300, **extra}
    ours = fastsae.SAE.from_dict(cfg).to(device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            scale = 0.3 if name == "threshold" else 0.2
            p.copy_(
                (torch.rand if name == "threshold" else torch.randn)(p.shape, generator=g) * scale
            )
    cls, cfg_cls = sae_lens.registry.get_sae_class(arch)
    theirs = cls(cfg_cls(**{k: v for k, v in cfg.items() if k != "architecture"})).to(device)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize(
    "arch,extra",
    [
        ("topk", {"k": 7}),
        ("topk", {"k": 7, "rescale_acts_by_decoder_norm": True}),
        ("abstopk", {"k": 5}),
        ("jumprelu", {}),
    ],
)
def test_forward_and_grads_match_sae_lens(arch, extra, device, auto_means_triton):
    ours, theirs = _pair(arch, device, **extra)
    x = torch.randn(2, 9, 48, device=device)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = ours(x_ours)
    ref = theirs(x_theirs)
    encode_op = "jumprelu_encode" if arch == "jumprelu" else "topk_encode"
    assert {"sparse_decode", encode_op} <= set(auto_means_triton)  # the kernels were used
    assert_close(out, ref, what="forward")
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    assert_close(x_ours.grad, x_theirs.grad, what="x.grad")
    for name, p in theirs.named_parameters():
        mine = dict(ours.named_parameters())[name].grad
        if p.grad is None or p.grad.abs().sum() == 0:
            assert mine is None or mine.abs().sum() == 0, name
        else:
            assert_close(mine, p.grad, what=f"{name}.grad")
