"""``run_evals`` and the trainer's metric functions."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fastsae.evals.config import (
    EvalConfig,
)
from fastsae.evals.metrics import (
    ActivationStats,
    get_downstream_reconstruction_metrics,
    get_featurewise_weight_based_metrics,
    get_sparsity_and_variance_metrics,
    recons_loss_per_token,
)
from fastsae.evals.splice import (
    EvalScaler,
    find_splice,
    ignored_token_ids,
    ratio_or_nan,
    sae_encode_decode,
)
from fastsae.sparse_code import SparseCode


def _looks_like_eval_config(obj: Any) -> bool:
    return hasattr(obj, "n_eval_reconstruction_batches") and hasattr(obj, "compute_kl")


@torch.no_grad()
def run_evals(
    sae: nn.Module,
    activation_store: Any,
    model: Any,
    activation_scaler: Any = None,
    eval_config: Any = None,
    model_kwargs: Mapping[str, Any] | None = None,
    exclude_special_tokens: Iterable[int] | bool = True,
    verbose: bool = False,
    *,
    ignore_tokens: Iterable[int | None] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate ``sae`` spliced into the TransformerLens ``model`` (SAELens 6.x's function).

    Args:
        sae: a fastsae (or sae-lens) SAE or transcoder; it reads at
            ``sae.cfg.metadata.hook_name`` (``hook_head_index`` picks one head of a
            ``[b, pos, n_heads, d_head]`` hook; without it the heads are flattened).
        activation_store: anything with ``get_batch_tokens(n) -> [n, context_size]``,
            ``store_batch_size_prompts`` and ``context_size``, e.g.
            :class:`fastsae.training.ActivationsStore` or sae-lens's.
        model: a TransformerLens ``HookedTransformer``.
        activation_scaler: a sae-lens or fastsae ``ActivationScaler`` when the SAE takes
            normalised activations; None for an SAE with the scaling folded in. An
            ``EvalConfig`` in this position (the SAELens 5.x order) is taken as
            ``eval_config``.
        eval_config: which metrics; default ``EvalConfig()`` (only ``token_stats``).
        model_kwargs: extra keyword arguments for every model call.
        exclude_special_tokens: True leaves out the tokenizer's BOS/EOS/PAD/SEP/decoder
            start tokens; a list leaves out those ids; False keeps every token.
        verbose: progress bars.
        ignore_tokens: SAELens 5.x's spelling: ids to leave out (overrides
            ``exclude_special_tokens``).

    Returns:
        ``(eval_metrics, feature_metrics)``: nested ``{group: {metric: float}}`` with empty
        groups dropped, and ``{metric: [d_sae floats]}`` (see the module docstring).
    """
    if _looks_like_eval_config(activation_scaler) and eval_config is None:
        activation_scaler, eval_config = None, activation_scaler
    cfg = eval_config if eval_config is not None else EvalConfig()
    model_kwargs = model_kwargs or {}
    ignored = ignored_token_ids(model, exclude_special_tokens, ignore_tokens)
    hook_name = sae.cfg.metadata.hook_name or ""
    batch_size = cfg.batch_size_prompts or activation_store.store_batch_size_prompts

    want_downstream = cfg.compute_kl or cfg.compute_ce_loss
    if want_downstream and cfg.n_eval_reconstruction_batches <= 0:
        raise ValueError(
            "eval_config.n_eval_reconstruction_batches must be > 0 when compute_kl or "
            "compute_ce_loss is True."
        )
    want_activations = (
        cfg.compute_l2_norms
        or cfg.compute_sparsity_metrics
        or cfg.compute_variance_metrics
        or cfg.compute_featurewise_density_statistics
    )
    if want_activations and cfg.n_eval_sparsity_variance_batches <= 0:
        raise ValueError(
            "eval_config.n_eval_sparsity_variance_batches must be > 0 when compute_l2_norms, "
            "compute_sparsity_metrics, compute_variance_metrics, or "
            "compute_featurewise_density_statistics is True."
        )

    groups = (
        "model_behavior_preservation", "model_performance_preservation",
        "reconstruction_quality", "shrinkage", "sparsity", "token_stats",
    )  # fmt: skip
    out: dict[str, dict[str, Any]] = {g: {} for g in groups}
    feature_metrics: dict[str, Any] = {}
    # the evals feed flattened [.., n_heads * d_head] activations: no hook_z reshaping
    reshaping = getattr(sae, "hook_z_reshaping_mode", None) if "hook_z" in hook_name else None
    if reshaping:
        sae.turn_off_forward_pass_hook_z_reshaping()
    try:
        if want_downstream:
            m = get_downstream_reconstruction_metrics(
                sae, model, activation_store, activation_scaler,
                compute_kl=cfg.compute_kl, compute_ce_loss=cfg.compute_ce_loss,
                n_batches=cfg.n_eval_reconstruction_batches,
                eval_batch_size_prompts=batch_size, ignore_tokens=ignored,
                verbose=verbose, model_kwargs=model_kwargs,
            )  # fmt: skip
            if cfg.compute_kl:
                for k in ("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"):
                    out["model_behavior_preservation"][k] = m[k]
            if cfg.compute_ce_loss:
                for k in ("ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae",
                          "ce_loss_without_sae"):  # fmt: skip
                    out["model_performance_preservation"][k] = m[k]
        if want_activations:
            m, feature_metrics = get_sparsity_and_variance_metrics(
                sae, model, activation_store, activation_scaler,
                n_batches=cfg.n_eval_sparsity_variance_batches,
                compute_l2_norms=cfg.compute_l2_norms,
                compute_sparsity_metrics=cfg.compute_sparsity_metrics,
                compute_variance_metrics=cfg.compute_variance_metrics,
                compute_featurewise_density_statistics=cfg.compute_featurewise_density_statistics,
                eval_batch_size_prompts=batch_size, model_kwargs=model_kwargs,
                ignore_tokens=ignored, verbose=verbose,
            )  # fmt: skip
            for group, keys in (
                ("shrinkage", ("l2_norm_in", "l2_norm_out", "l2_ratio",
                               "relative_reconstruction_bias")),
                ("sparsity", ("l0", "l1")),
                ("reconstruction_quality", ("explained_variance", "explained_variance_legacy",
                                            "mse", "cossim")),
            ):  # fmt: skip
                out[group].update({k: m[k] for k in keys if k in m})
        if cfg.compute_featurewise_weight_based_metrics:
            feature_metrics |= get_featurewise_weight_based_metrics(sae)
    finally:
        if reshaping:
            sae.turn_on_forward_pass_hook_z_reshaping()

    ctx = activation_store.context_size
    out["token_stats"] = {
        "total_tokens_eval_reconstruction": ctx * cfg.n_eval_reconstruction_batches * batch_size,
        "total_tokens_eval_sparsity_variance": ctx
        * cfg.n_eval_sparsity_variance_batches
        * batch_size,
    }
    return {k: v for k, v in out.items() if v}, feature_metrics


# ----------------------------------------------------------------------------------------
# the trainer's summaries
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def reconstruction_metrics(sae: nn.Module, batches: Iterable[Tensor]) -> dict[str, float]:
    """L0, explained variance, MSE, cosine similarity and L2 ratio over ``[batch, d_in]``
    activation batches, and the latents that never fired.

    Same definitions as :func:`run_evals` except ``metrics/mse``, which is per element
    (``||x - x_hat||^2 / d_in``, as the trainer's own ``metrics/mse``). The SAE runs its
    inference forward (no error term); sums are in at least fp32.
    """
    stats, d_out = reconstruction_stats(
        lambda x: sae_encode_decode(sae, x), sae.cfg.d_sae, sae.W_dec.device, batches
    )
    return reconstruction_summary(
        stats, d_out, stats.mean("l0"), int((stats.feature_acts == 0).sum())
    )


def reconstruction_stats(
    encode_decode: Callable[[Tensor], tuple[Tensor, Tensor | SparseCode]],
    d_sae: int,
    device: torch.device,
    batches: Iterable[Tensor],
) -> tuple[ActivationStats, int]:
    """The running statistics of ``encode_decode(x) -> (x_hat, activations)`` over the
    batches (``d_sae``: the activations' width), and the output width."""
    stats = ActivationStats(d_sae, device)
    d_out = 0
    for x in batches:
        x = x.to(device)
        x_hat, acts = encode_decode(x)
        if isinstance(acts, SparseCode):
            acts = SparseCode(acts.values[:, None], acts.indices[:, None])
        else:
            acts = acts[:, None]
        stats.add(x[:, None], x_hat[:, None], acts, torch.ones(x.shape[0], 1, dtype=torch.bool))
        d_out = x_hat.shape[-1]
    if not stats.n_tokens:
        raise ValueError("reconstruction_metrics: no batches given")
    return stats, d_out


def reconstruction_summary(
    stats: ActivationStats, d_out: int, l0: float, dead: int
) -> dict[str, float]:
    return {
        "metrics/l0": l0,
        "metrics/explained_variance": stats.explained_variance(),
        "metrics/mse": stats.mean("mse") / d_out,
        "metrics/cossim": stats.mean("cossim"),
        "metrics/l2_ratio": stats.mean("l2_ratio"),
        "sparsity/dead_features_in_eval": dead,
    }


@torch.no_grad()
def language_model_metrics(
    sae: nn.Module,
    model: Any,
    tokens: Tensor,
    hook_name: str,
    *,
    hook_head_index: int | None = None,
    predict: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """CE loss (clean, SAE spliced in, zero-ablated), CE loss score, KL and KL score of a
    TransformerLens model on ``tokens [batch, seq]`` with the SAE at ``hook_name``
    (``hook_head_index``: one head of a ``[b, pos, n_heads, d_head]`` hook). Every
    token counts; the values are those of :func:`run_evals` on these tokens.

    ``predict``: ``[b, pos, d_in] -> [b, pos, d_out]``, the output spliced in instead of
    the SAE's own (e.g. a latent-sharded SAE's reconstruction)."""
    splice = find_splice(sae, hook_name, hook_head_index)
    reshaping = getattr(sae, "hook_z_reshaping_mode", None) if "hook_z" in hook_name else None
    if reshaping:
        sae.turn_off_forward_pass_hook_z_reshaping()
    try:
        res = recons_loss_per_token(sae, model, EvalScaler(None), tokens, splice, None, {}, predict)
    finally:
        if reshaping:
            sae.turn_on_forward_pass_hook_z_reshaping()
    m = {k: v.mean().item() for k, v in res.items()}  # as run_evals does
    pre, beh = "model_performance_preservation/", "model_behavior_preservation/"
    ce_zero, ce_sae, ce_clean = (
        m["ce_loss_with_ablation"], m["ce_loss_with_sae"], m["ce_loss_without_sae"]
    )  # fmt: skip
    return {
        f"{pre}ce_loss_without_sae": ce_clean,
        f"{pre}ce_loss_with_sae": ce_sae,
        f"{pre}ce_loss_with_ablation": ce_zero,
        f"{pre}ce_loss_score": ratio_or_nan(ce_zero - ce_sae, ce_zero - ce_clean),
        f"{beh}kl_div_with_sae": m["kl_div_with_sae"],
        f"{beh}kl_div_with_ablation": m["kl_div_with_ablation"],
        f"{beh}kl_div_score": ratio_or_nan(m["kl_div_with_ablation"] - m["kl_div_with_sae"],
                                     m["kl_div_with_ablation"]),
    }  # fmt: skip
