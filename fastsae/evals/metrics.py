"""The metric groups of ``run_evals``: downstream CE/KL, reconstruction, sparsity, weights."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from fastsae.evals.splice import (
    EvalScaler,
    Splice,
    find_splice,
    ratio_or_nan,
    read_hook_acts,
    sae_encode_decode,
    sae_prediction,
    stop_layer,
    token_mask,
    write_hook_acts,
)
from fastsae.sparse_code import SparseCode


@torch.no_grad()
def recons_loss_per_token(
    sae: nn.Module,
    model: Any,
    scaler: EvalScaler,
    tokens: Tensor,
    splice: Splice,
    ignore_tokens: list[int] | None,
    model_kwargs: Mapping[str, Any],
    predict: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """``predict``: the SAE's output for an input (default: its inference forward)."""
    predict = predict if predict is not None else (lambda x: sae_prediction(sae, x))
    clean_logits, clean_ce = model(tokens, return_type="both", loss_per_token=True, **model_kwargs)
    device = sae.W_dec.device
    mask = token_mask(tokens, ignore_tokens).to(device)
    captured: dict[str, Tensor] = {}

    def capture(act: Tensor, hook: Any) -> None:
        captured["x"] = act

    def replace(act: Tensor, hook: Any) -> Tensor:
        x = captured.pop("x") if splice.transcoder else act
        x = read_hook_acts(x, splice.in_head, splice.in_hook).to(device)
        target = read_hook_acts(act, splice.out_head, splice.out_hook)
        new = predict(scaler.scale(x)).to(target.dtype)
        new = scaler.unscale(new)
        new = torch.where(mask[..., None], new, target.to(device))
        return write_hook_acts(act, new.to(act.device), splice.out_head)

    def zero(act: Tensor, hook: Any) -> Tensor:
        zeros = torch.zeros_like(read_hook_acts(act, splice.out_head, splice.out_hook))
        return write_hook_acts(act, zeros, splice.out_head)

    hooks = [(splice.out_hook, replace)]
    if splice.transcoder:
        hooks.insert(0, (splice.in_hook, capture))
    sae_logits, sae_ce = model.run_with_hooks(
        tokens, return_type="both", fwd_hooks=hooks, loss_per_token=True, **model_kwargs
    )
    zero_logits, zero_ce = model.run_with_hooks(
        tokens,
        return_type="both",
        fwd_hooks=[(splice.out_hook, zero)],
        loss_per_token=True,
        **model_kwargs,
    )
    return {
        "kl_div_with_sae": _kl(clean_logits, sae_logits),
        "kl_div_with_ablation": _kl(clean_logits, zero_logits),
        "ce_loss_with_sae": sae_ce,
        "ce_loss_without_sae": clean_ce,
        "ce_loss_with_ablation": zero_ce,
    }


def _kl(clean_logits: Tensor, new_logits: Tensor) -> Tensor:
    """``[batch, pos]`` KL(clean || new) of the next-token distributions."""
    log_q = F.log_softmax(new_logits, dim=-1)
    p = F.softmax(clean_logits, dim=-1)
    return F.kl_div(log_q, p, reduction="none").sum(dim=-1)


def get_recons_loss(
    sae: nn.Module,
    model: Any,
    activation_scaler: Any,
    batch_tokens: Tensor,
    compute_kl: bool,
    compute_ce_loss: bool,
    ignore_tokens: list[int] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    hook_name: str | None = None,
) -> dict[str, Tensor]:
    """Per-token KL ``[batch, pos]`` and CE ``[batch, pos - 1]`` of the model on
    ``batch_tokens [batch, pos]`` clean, with the SAE spliced in (ignored tokens keep
    their clean activations) and with the hook zero-ablated (SAELens's function)."""
    splice = find_splice(sae, hook_name)
    res = recons_loss_per_token(
        sae, model, EvalScaler(activation_scaler), batch_tokens, splice, ignore_tokens,
        model_kwargs or {},
    )  # fmt: skip
    keep = ([] if not compute_kl else ["kl_div_with_sae", "kl_div_with_ablation"]) + (
        [] if not compute_ce_loss else ["ce_loss_with_sae", "ce_loss_without_sae",
                                        "ce_loss_with_ablation"]
    )  # fmt: skip
    return {k: res[k] for k in keep}


def get_downstream_reconstruction_metrics(
    sae: nn.Module,
    model: Any,
    activation_store: Any,
    activation_scaler: Any,
    compute_kl: bool,
    compute_ce_loss: bool,
    n_batches: int,
    eval_batch_size_prompts: int,
    ignore_tokens: list[int] | None = None,
    verbose: bool = False,
    model_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """CE / KL metrics averaged over the non-ignored tokens of ``n_batches`` batches."""
    per_token: dict[str, list[Tensor]] = {}
    batches = range(n_batches)
    for _ in tqdm(batches, desc="Reconstruction Batches", leave=False) if verbose else batches:
        tokens = activation_store.get_batch_tokens(eval_batch_size_prompts)
        values = get_recons_loss(
            sae, model, activation_scaler, tokens, compute_kl, compute_ce_loss,
            ignore_tokens, model_kwargs,
        )  # fmt: skip
        mask = token_mask(tokens, ignore_tokens) if ignore_tokens else None
        for name, value in values.items():
            if mask is not None:
                # the CE of position i predicts token i + 1: mask by the input token
                value = value[mask[:, : value.shape[1]].to(value.device)]
            per_token.setdefault(name, []).append(value)
    # one mean over every token in the values' dtype, as SAELens: the scores below are
    # differences of close numbers, so any other summation order shows in the 5th digit
    metrics = {name: torch.cat(v).mean().item() for name, v in per_token.items()}
    if compute_kl:
        kl_zero, kl_sae = metrics["kl_div_with_ablation"], metrics["kl_div_with_sae"]
        metrics["kl_div_score"] = ratio_or_nan(kl_zero - kl_sae, kl_zero)
    if compute_ce_loss:
        ce_zero, ce_sae = metrics["ce_loss_with_ablation"], metrics["ce_loss_with_sae"]
        metrics["ce_loss_score"] = ratio_or_nan(
            ce_zero - ce_sae, ce_zero - metrics["ce_loss_without_sae"]
        )
    return metrics


# ----------------------------------------------------------------------------------------
# reconstruction, sparsity and density statistics, streamed over batches
# ----------------------------------------------------------------------------------------
class ActivationStats:
    """Running sums for the reconstruction/sparsity metrics of ``[b, pos, d]`` batches."""

    _PER_TOKEN = (
        "l2_norm_in", "l2_norm_out", "l2_ratio", "l0", "l1",
        "explained_variance_legacy", "mse", "cossim",
    )  # fmt: skip

    def __init__(self, d_sae: int, device: torch.device):
        self.sums = dict.fromkeys(self._PER_TOKEN, 0.0)
        self.n_tokens = 0
        self.rrb_sum, self.n_batches = 0.0, 0  # relative reconstruction bias, per batch
        self.sum_x: Tensor | None = None  # [d] float64, for the explained variance
        self.sum_sq_norm = self.sum_sq_resid = 0.0
        self.feature_acts = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.feature_prompts = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.d_sae = d_sae

    @torch.no_grad()
    def add(self, x: Tensor, x_hat: Tensor, acts: Tensor | SparseCode, mask: Tensor) -> None:
        """``x``, ``x_hat [b, pos, d]``; ``acts`` dense ``[b, pos, d_sae]`` or a code
        ``[b, pos, K]``; ``mask [b, pos]`` bool (False: leave the token out)."""
        b, pos = mask.shape
        dtype = torch.promote_types(x.dtype, torch.float32)
        keep = mask.reshape(-1).to(x.device)
        xf = x.reshape(b * pos, -1)[keep].to(dtype)
        hf = x_hat.reshape(b * pos, -1).to(x.device)[keep].to(dtype)
        norm_in, norm_out = xf.norm(dim=-1), hf.norm(dim=-1)
        resid = (xf - hf).pow(2).sum(-1)
        if isinstance(acts, SparseCode):
            values, indices = acts.values, acts.indices.long()
        else:
            values, indices = acts, None
        values = values.reshape(b * pos, -1)
        vk = values[keep.to(values.device)]
        per_token = {
            "l2_norm_in": norm_in,
            "l2_norm_out": norm_out,
            "l2_ratio": norm_out / torch.where(norm_in.abs() < 1e-4, 1.0, norm_in),
            "l0": (vk != 0).sum(-1).to(dtype),
            "l1": vk.abs().to(dtype).sum(-1),
            "explained_variance_legacy": 1 - resid / (xf - xf.mean(0)).pow(2).sum(-1),
            "mse": resid,
            "cossim": ((xf / norm_in[:, None]) * (hf / norm_out[:, None])).sum(-1),
        }
        rrb = norm_out.pow(2).mean() / (xf * hf).sum(-1).mean()
        batch_x = xf.sum(0).to(device="cpu", dtype=torch.float64)
        scalars = torch.stack(
            [*(v.double().sum().to(rrb.device) for v in per_token.values()), rrb.double(),
             xf.pow(2).sum().double(), resid.double().sum()]
        ).tolist()  # fmt: skip
        for name, s in zip(self._PER_TOKEN, scalars[: len(self._PER_TOKEN)], strict=True):
            self.sums[name] += s
        self.rrb_sum += scalars[-3]
        self.sum_sq_norm += scalars[-2]
        self.sum_sq_resid += scalars[-1]
        self.n_tokens += xf.shape[0]
        self.n_batches += 1
        self.sum_x = batch_x if self.sum_x is None else self.sum_x + batch_x

        # density: tokens where each latent fires, and prompts where it fires at least once
        active = (values != 0).reshape(b, pos, -1) & mask.to(values.device)[..., None]
        if indices is None:
            self.feature_acts += active.sum((0, 1)).to(self.feature_acts.device)
            self.feature_prompts += active.any(1).sum(0).to(self.feature_prompts.device)
        else:
            idx = indices.reshape(b, -1).to(self.feature_acts.device)
            hits = active.reshape(b, -1).to(self.feature_acts.device, torch.long)
            per_prompt = torch.zeros(b, self.d_sae, dtype=torch.long, device=idx.device)
            per_prompt.scatter_add_(1, idx, hits)
            self.feature_acts += per_prompt.sum(0)
            self.feature_prompts += (per_prompt > 0).sum(0)

    def mean(self, name: str) -> float:
        if name == "relative_reconstruction_bias":
            return ratio_or_nan(self.rrb_sum, self.n_batches)
        return self.sums[name] / self.n_tokens if self.n_tokens else float("nan")

    def explained_variance(self) -> float:
        """``1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2)`` over every token added."""
        if not self.n_tokens or self.sum_x is None:
            return 0.0
        mean_x = self.sum_x / self.n_tokens
        total_variance = self.sum_sq_norm / self.n_tokens - float(mean_x.pow(2).sum())
        mse = self.sum_sq_resid / self.n_tokens
        if total_variance < 1e-10:
            return 1.0 if mse < 1e-10 else 0.0
        return 1.0 - mse / total_variance


def get_sparsity_and_variance_metrics(
    sae: nn.Module,
    model: Any,
    activation_store: Any,
    activation_scaler: Any,
    n_batches: int,
    compute_l2_norms: bool,
    compute_sparsity_metrics: bool,
    compute_variance_metrics: bool,
    compute_featurewise_density_statistics: bool,
    eval_batch_size_prompts: int,
    model_kwargs: Mapping[str, Any] | None = None,
    ignore_tokens: list[int] | None = None,
    verbose: bool = False,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Reconstruction, shrinkage, sparsity and density metrics over ``n_batches`` batches
    of the model's activations at the SAE's hook (ignored tokens left out).

    Returns ``(metrics, feature_metrics)``; as in SAELens, ``feature_metrics`` always
    holds ``feature_density`` and ``consistent_activation_heuristic`` (NaN lists unless
    ``compute_featurewise_density_statistics``)."""
    splice = find_splice(sae)
    scaler = EvalScaler(activation_scaler)
    device = sae.W_dec.device
    stats = ActivationStats(sae.cfg.d_sae, device)
    names = list(dict.fromkeys([splice.in_hook, splice.out_hook]))
    batches = range(n_batches)
    for _ in (
        tqdm(batches, desc="Sparsity and Variance Batches", leave=False) if verbose else batches
    ):
        tokens = activation_store.get_batch_tokens(eval_batch_size_prompts)
        _, cache = model.run_with_cache(
            tokens, prepend_bos=False, names_filter=names,
            stop_at_layer=stop_layer(names), **(model_kwargs or {}),
        )  # fmt: skip
        x_in = read_hook_acts(cache[splice.in_hook], splice.in_head, splice.in_hook)
        target = read_hook_acts(cache[splice.out_hook], splice.out_head, splice.out_hook)
        del cache
        x_hat, acts = sae_encode_decode(sae, scaler.scale(x_in).to(device))
        x_hat = scaler.unscale(x_hat.to(x_in.device))
        stats.add(target, x_hat, acts, token_mask(tokens, ignore_tokens))

    metrics: dict[str, float] = {}
    if compute_l2_norms:
        for name in ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"):
            metrics[name] = stats.mean(name)
    if compute_sparsity_metrics:
        metrics["l0"], metrics["l1"] = stats.mean("l0"), stats.mean("l1")
    if compute_variance_metrics:
        for name in ("explained_variance_legacy", "mse", "cossim"):
            metrics[name] = stats.mean(name)
        metrics["explained_variance"] = stats.explained_variance()
    if compute_featurewise_density_statistics:
        acts_f = stats.feature_acts.float()
        density = acts_f / stats.n_tokens if stats.n_tokens else acts_f * float("nan")
        cah = acts_f / stats.feature_prompts.float()
    else:
        density = cah = torch.full((sae.cfg.d_sae,), float("nan"))
    return metrics, {
        "feature_density": density.tolist(),
        "consistent_activation_heuristic": cah.tolist(),
    }


@torch.no_grad()
def get_featurewise_weight_based_metrics(sae: nn.Module) -> dict[str, list[float]]:
    """Per latent: ``encoder_norm`` (of its ``W_enc`` column), ``encoder_decoder_cosine_sim``
    (of its ``W_enc`` column and ``W_dec`` row; left out when ``d_out != d_in``) and
    ``encoder_bias`` (``b_enc``, when the SAE has one)."""
    W_enc, W_dec = sae.W_enc, sae.W_dec
    metrics: dict[str, list[float]] = {"encoder_norm": W_enc.norm(dim=0).cpu().tolist()}
    if W_dec.shape[1] == W_enc.shape[0]:
        enc = W_enc / W_enc.norm(dim=0, keepdim=True)
        dec = W_dec / W_dec.norm(dim=1, keepdim=True)
        metrics["encoder_decoder_cosine_sim"] = F.cosine_similarity(dec, enc.T).cpu().tolist()
    b_enc = getattr(sae, "b_enc", None)
    if b_enc is not None:
        metrics["encoder_bias"] = b_enc.cpu().tolist()
    return metrics


# ----------------------------------------------------------------------------------------
# run_evals
# ----------------------------------------------------------------------------------------
