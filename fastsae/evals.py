"""SAE quality metrics: reconstruction (L0, explained variance, MSE, cosine), dead
latents, and, for language models, the CE-loss score and KL with the SAE spliced in.

Definitions follow SAELens's ``evals.py`` (same names for the same quantities):

* explained variance ``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over tokens;
* CE loss score ``(CE_zero_ablation - CE_sae) / (CE_zero_ablation - CE_clean)``;
* KL score ``(KL_zero - KL_sae) / KL_zero`` with KL of the spliced model's next-token
  distribution from the clean one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def reconstruction_metrics(sae: nn.Module, batches: Iterable[Tensor]) -> dict[str, float]:
    """L0, explained variance, MSE, cosine similarity and L2 ratio over ``[batch, d_in]`` batches.

    The SAE runs its inference forward (no error term). Sums are in fp32.
    """
    sq_err = n = 0.0
    l0_sum = cos_sum = l2_ratio_sum = 0.0
    sum_x = sum_x2 = None
    fired = None
    for x in batches:
        x = x.to(sae.W_dec.device)
        code = sae.encode_sparse(x)
        x_hat = sae.decode_sparse(code).float()
        x = x.float()
        values, indices = code
        active = values != 0
        l0_sum += float(active.sum())
        f = torch.zeros(sae.cfg.d_sae, device=x.device)
        f.index_add_(0, indices.reshape(-1).long(), active.reshape(-1).float())
        fired = f if fired is None else fired + f
        sq_err += float((x - x_hat).pow(2).sum())
        sum_x = x.sum(0) if sum_x is None else sum_x + x.sum(0)
        sum_x2 = x.pow(2).sum() if sum_x2 is None else sum_x2 + x.pow(2).sum()
        cos_sum += float(F.cosine_similarity(x, x_hat, dim=-1).sum())
        l2_ratio_sum += float((x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).sum())
        n += x.shape[0]
    if not n:
        raise ValueError("reconstruction_metrics: no batches given")
    assert sum_x is not None and sum_x2 is not None and fired is not None
    # sum ||x - mean||^2 = sum ||x||^2 - n ||mean||^2
    total_var = float(sum_x2) - float((sum_x / n).pow(2).sum()) * n
    d_in = sum_x.shape[0]
    return {
        "metrics/l0": l0_sum / n,
        "metrics/explained_variance": 1 - sq_err / total_var,
        "metrics/mse": sq_err / (n * d_in),
        "metrics/cossim": cos_sum / n,
        "metrics/l2_ratio": l2_ratio_sum / n,
        "sparsity/dead_features_in_eval": int((fired == 0).sum()),
    }


@torch.no_grad()
def language_model_metrics(
    sae: nn.Module,
    model: Any,
    tokens: Tensor,
    hook_name: str,
    *,
    hook_head_index: int | None = None,
) -> dict[str, float]:
    """CE loss (clean, SAE spliced in, zero-ablated), CE loss score, KL and KL score of a
    TransformerLens model on ``tokens [batch, seq]`` with the SAE at ``hook_name``."""
    if hook_head_index is not None:
        raise NotImplementedError("language_model_metrics: hook_head_index is not supported yet")

    def splice(act: Tensor, hook: Any) -> Tensor:
        return sae(act.to(sae.W_dec.dtype)).to(act.dtype)

    def zero(act: Tensor, hook: Any) -> Tensor:
        return torch.zeros_like(act)

    clean_logits = model(tokens, return_type="logits")
    sae_logits = model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(hook_name, splice)])
    zero_logits = model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(hook_name, zero)])
    ce_clean = _next_token_ce(clean_logits, tokens)
    ce_sae = _next_token_ce(sae_logits, tokens)
    ce_zero = _next_token_ce(zero_logits, tokens)
    kl_sae = _kl(clean_logits, sae_logits)
    kl_zero = _kl(clean_logits, zero_logits)
    return {
        "model_performance_preservation/ce_loss_without_sae": ce_clean,
        "model_performance_preservation/ce_loss_with_sae": ce_sae,
        "model_performance_preservation/ce_loss_with_ablation": ce_zero,
        "model_performance_preservation/ce_loss_score": (ce_zero - ce_sae) / (ce_zero - ce_clean)
        if ce_zero != ce_clean
        else float("nan"),
        "model_behavior_preservation/kl_div_with_sae": kl_sae,
        "model_behavior_preservation/kl_div_with_ablation": kl_zero,
        "model_behavior_preservation/kl_div_score": (kl_zero - kl_sae) / kl_zero
        if kl_zero
        else float("nan"),
    }


def _next_token_ce(logits: Tensor, tokens: Tensor) -> float:
    logp = logits[:, :-1].float().log_softmax(-1)
    return float(-logp.gather(-1, tokens[:, 1:, None]).mean())


def _kl(clean_logits: Tensor, other_logits: Tensor) -> float:
    p = clean_logits.float().log_softmax(-1)
    q = other_logits.float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())
