"""SAE evaluation: SAELens 6.x's ``run_evals`` (same config, metric groups, keys and numbers
on the same tokens), and the two summaries the trainer logs during training.

``run_evals(sae, activation_store, model, activation_scaler, eval_config)`` returns
``(eval_metrics, feature_metrics)``:

* ``model_behavior_preservation``: ``kl_div_score``, ``kl_div_with_ablation``,
  ``kl_div_with_sae`` (KL of the spliced / zero-ablated model's next-token distribution
  from the clean one, per token, averaged; score ``(KL_zero - KL_sae) / KL_zero``);
* ``model_performance_preservation``: ``ce_loss_score``, ``ce_loss_with_ablation``,
  ``ce_loss_with_sae``, ``ce_loss_without_sae`` (score
  ``(CE_zero - CE_sae) / (CE_zero - CE_clean)``);
* ``reconstruction_quality``: ``explained_variance`` (``1 - E||x - x_hat||^2 / Var(x)`` over
  all tokens), ``explained_variance_legacy`` (per token against the batch mean, averaged),
  ``mse`` (``||x - x_hat||^2`` summed over dimensions, averaged over tokens), ``cossim``;
* ``shrinkage``: ``l2_norm_in``, ``l2_norm_out``, ``l2_ratio``,
  ``relative_reconstruction_bias`` (``E||x_hat||^2 / E<x, x_hat>`` per batch, averaged);
* ``sparsity``: ``l0``, ``l1`` (of the feature activations, ``!= 0`` and ``|.|``);
* ``token_stats``: ``total_tokens_eval_reconstruction``,
  ``total_tokens_eval_sparsity_variance``;
* feature metrics: ``feature_density``, ``consistent_activation_heuristic`` (active
  tokens / prompts with the feature active), and ``encoder_norm``,
  ``encoder_decoder_cosine_sim``, ``encoder_bias``, each a list of ``d_sae`` floats.

Where fastsae deliberately differs from sae-lens 6.54:

* transcoders are evaluated as transcoders: input read at ``hook_name``, prediction
  (with the skip path) compared with and spliced in at ``metadata.hook_name_out``.
  sae-lens treats them as SAEs at the input hook;
* a score whose denominator is zero is NaN (sae-lens raises ``ZeroDivisionError``);
* the reconstruction/sparsity statistics are computed in at least fp32 and summed over
  batches in fp64 (sae-lens: the model's dtype); CE and KL are averaged exactly as
  sae-lens does, since their scores are differences of close numbers;
* TopK SAEs run through ``encode_sparse``/``decode_sparse`` (no ``[tokens, d_sae]``
  tensor) unless a hook sits on ``hook_sae_acts_pre/post``; the numbers agree with the
  dense path to float rounding;
* ``hook_z`` reshaping is restored even when an eval raises.

Kept as sae-lens has it: ``feature_density`` and ``consistent_activation_heuristic`` are
returned (as NaN lists) whenever any activation metric runs, even with
``compute_featurewise_density_statistics=False``; ``exclude_special_tokens`` is
``run_evals``'s own argument (the store's setting is not used).

From ``activation_store`` only ``get_batch_tokens(n)``, ``store_batch_size_prompts`` and
``context_size`` are read, so fastsae's ``ActivationsStore`` and sae-lens's both work.

The CE/KL batches and then the sparsity/variance batches are taken one after the other
from ``activation_store.get_batch_tokens``, without rewinding in between: sae-lens 6.54
calls ``reset_input_dataset()`` there, but that resets an iterator its token stream does
not read, so its second pass sees the following rows too; we reproduce what it computes.
"""

from __future__ import annotations

import functools
import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from fastsae.saes.base import SAE
from fastsae.sparse_code import SparseCode

__all__ = [
    "EvalConfig",
    "get_eval_everything_config",
    "run_evals",
    "get_downstream_reconstruction_metrics",
    "get_sparsity_and_variance_metrics",
    "get_recons_loss",
    "get_featurewise_weight_based_metrics",
    "reconstruction_metrics",
    "language_model_metrics",
]

# tokenizer attributes whose ids run_evals leaves out with exclude_special_tokens=True
_SPECIAL_TOKEN_ATTRS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
)


def get_library_version() -> str:
    try:
        return version("fastsae")
    except PackageNotFoundError:
        return "unknown"


@functools.lru_cache(maxsize=1)
def get_git_hash() -> str:
    """Short commit hash of the fastsae checkout, or ``"unknown"``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        return out.stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return "unknown"


@dataclass
class EvalConfig:
    """Which metrics ``run_evals`` computes and on how many batches (SAELens's fields).

    Every ``compute_*`` is off by default: turn on the ones you want, or use
    :func:`get_eval_everything_config`.
    """

    batch_size_prompts: int | None = None
    """Rows of ``context_size`` tokens per batch; None (or 0) takes the store's
    ``store_batch_size_prompts``."""
    n_eval_reconstruction_batches: int = 10
    """Batches for the CE loss and KL metrics."""
    compute_kl: bool = False
    """KL of the spliced and zero-ablated models from the clean one, and the KL score."""
    compute_ce_loss: bool = False
    """Next-token CE with/without the SAE and zero-ablated, and the CE loss score."""
    n_eval_sparsity_variance_batches: int = 1
    """Batches for the L2, sparsity, variance and density metrics."""
    compute_l2_norms: bool = False
    """``shrinkage``: input/output L2 norms, their ratio, relative reconstruction bias."""
    compute_sparsity_metrics: bool = False
    """``sparsity``: L0 and L1 of the feature activations per token."""
    compute_variance_metrics: bool = False
    """``reconstruction_quality``: explained variance (both formulas), MSE, cosine."""
    compute_featurewise_density_statistics: bool = False
    """Feature metrics ``feature_density`` and ``consistent_activation_heuristic``."""
    compute_featurewise_weight_based_metrics: bool = False
    """Feature metrics ``encoder_norm``, ``encoder_decoder_cosine_sim``, ``encoder_bias``."""
    library_version: str = field(default_factory=get_library_version)
    """fastsae's version (recorded with the results)."""
    git_hash: str = field(default_factory=get_git_hash)
    """fastsae's commit when run from a checkout, else ``"unknown"``."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("compute_") and not isinstance(value, bool):
                raise ValueError(f"EvalConfig.{f.name} must be a bool, got {value!r}")
            if f.name.startswith("n_eval_") and (
                isinstance(value, bool) or not isinstance(value, int)
            ):
                raise ValueError(f"EvalConfig.{f.name} must be an int, got {value!r}")
        bs = self.batch_size_prompts
        if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 0):
            raise ValueError(
                f"EvalConfig.batch_size_prompts must be None or an int >= 0, got {bs!r}"
            )


def get_eval_everything_config(
    batch_size_prompts: int | None = None,
    n_eval_reconstruction_batches: int = 10,
    n_eval_sparsity_variance_batches: int = 1,
) -> EvalConfig:
    """An :class:`EvalConfig` with every metric turned on."""
    return EvalConfig(
        batch_size_prompts=batch_size_prompts,
        n_eval_reconstruction_batches=n_eval_reconstruction_batches,
        compute_kl=True,
        compute_ce_loss=True,
        compute_l2_norms=True,
        n_eval_sparsity_variance_batches=n_eval_sparsity_variance_batches,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True,
    )


# ----------------------------------------------------------------------------------------
# where the SAE reads and writes in the model
# ----------------------------------------------------------------------------------------
class _Splice(NamedTuple):
    """The hooks an SAE reads from and writes to (the same one unless a transcoder)."""

    in_hook: str
    in_head: int | None
    out_hook: str
    out_head: int | None
    transcoder: bool


def _is_transcoder(sae: nn.Module) -> bool:
    return getattr(sae.cfg, "d_out", None) is not None and hasattr(sae, "forward_with_activations")


def _splice(sae: nn.Module, hook_name: str | None = None, head: Any = ...) -> _Splice:
    md = sae.cfg.metadata
    hook_name = hook_name or md.hook_name
    if not hook_name:
        raise ValueError("the SAE has no cfg.metadata.hook_name; pass hook_name=")
    head = md.hook_head_index if head is ... else head
    if not _is_transcoder(sae):
        return _Splice(hook_name, head, hook_name, head, False)
    if not md.hook_name_out:
        raise ValueError(
            "a transcoder needs cfg.metadata.hook_name_out (where its output is compared "
            "with the model and spliced in)"
        )
    return _Splice(hook_name, head, md.hook_name_out, md.hook_head_index_out, True)


# hooks with a head dimension [b, pos, n_heads, d_head], by name as SAELens tells them
_HEAD_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_z")


def _read(act: Tensor, head: int | None, hook_name: str) -> Tensor:
    """Hook activations -> SAE input ``[b, pos, d]``: one head (``head``), all heads of a
    q/k/v/z hook flattened, or the activations as they are."""
    if head is not None and act.ndim == 4:
        return act[:, :, head]
    if head is None and any(h in hook_name for h in _HEAD_HOOKS):
        return act.flatten(-2, -1)
    return act


def _write(act: Tensor, new: Tensor, head: int | None) -> Tensor:
    """Inverse of :func:`_read`: ``act`` with ``new`` put back where it was read from."""
    if head is not None and act.ndim == 4:
        act = act.clone()
        act[:, :, head] = new
        return act
    return new.reshape(act.shape)


def _stop_at_layer(hook_names: Iterable[str]) -> int | None:
    """One past the deepest ``blocks.<n>`` the hooks need (None: run the whole model)."""
    layers = [re.search(r"\.(\d+)(?:\.|$)", name) for name in hook_names]
    if any(m is None for m in layers):
        return None
    return max(int(m.group(1)) for m in layers) + 1  # type: ignore[union-attr]


# ----------------------------------------------------------------------------------------
# the SAE's forward pieces, fast where that changes nothing
# ----------------------------------------------------------------------------------------
def _encode_decode(sae: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | SparseCode]:
    """``x [..., d_in]`` -> ``(prediction [..., d_out], activations)``; activations are a
    ``SparseCode`` for TopK-style fastsae SAEs (no dense ``[..., d_sae]``), else dense."""
    if _is_transcoder(sae):
        return sae.forward_with_activations(x)
    if isinstance(sae, SAE) and sae._fixed_k and not sae._acts_hooked():
        code = sae.encode_sparse(x)
        return sae.decode_sparse(code), code
    acts = sae.encode(x)
    return sae.decode(acts), acts


def _predict(sae: nn.Module, x: Tensor) -> Tensor:
    """The SAE's output for ``x`` without the error term (transcoders add their skip)."""
    if _is_transcoder(sae):
        return sae(x)
    if isinstance(sae, SAE):
        return sae._reconstruct(x)
    return sae.decode(sae.encode(x))


class _Scaler:
    """``scale`` / ``unscale`` for a sae-lens ``ActivationScaler``, fastsae's, or None."""

    def __init__(self, scaler: Any):
        self.scaler = scaler

    def scale(self, x: Tensor) -> Tensor:
        s = self.scaler
        if s is None:
            return x
        return s.scale(x) if hasattr(s, "scale") else s(x)

    def unscale(self, x: Tensor) -> Tensor:
        s = self.scaler
        if s is None:
            return x
        if hasattr(s, "unscale"):
            return s.unscale(x)
        if getattr(s, "matrix", None) is not None:
            x = x @ s.inverse_matrix.to(x) + s.mean.to(x)
        if getattr(s, "scaling_factor", None) is not None:
            x = x / s.scaling_factor
        return x


def _token_mask(tokens: Tensor, ignore_tokens: list[int] | None) -> Tensor:
    """``[batch, pos]`` bool: True where the token is not ignored."""
    if not ignore_tokens:
        return torch.ones_like(tokens, dtype=torch.bool)
    return ~torch.isin(tokens, torch.tensor(ignore_tokens, device=tokens.device))


def _ignored_ids(model: Any, exclude_special_tokens: Any, ignore_tokens: Any) -> list[int]:
    if ignore_tokens is not None:  # the SAELens 5.x keyword: a set of ids (None allowed)
        return sorted({int(t) for t in ignore_tokens if t is not None})
    if exclude_special_tokens is True:
        tok = getattr(model, "tokenizer", None)
        ids = (getattr(tok, a, None) for a in _SPECIAL_TOKEN_ATTRS)
        return sorted({int(i) for i in ids if i is not None})
    if not exclude_special_tokens:
        return []
    return sorted({int(t) for t in exclude_special_tokens})


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


# ----------------------------------------------------------------------------------------
# CE loss and KL with the SAE spliced in
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def _recons_loss(
    sae: nn.Module,
    model: Any,
    scaler: _Scaler,
    tokens: Tensor,
    splice: _Splice,
    ignore_tokens: list[int] | None,
    model_kwargs: Mapping[str, Any],
) -> dict[str, Tensor]:
    clean_logits, clean_ce = model(tokens, return_type="both", loss_per_token=True, **model_kwargs)
    device = sae.W_dec.device
    mask = _token_mask(tokens, ignore_tokens).to(device)
    captured: dict[str, Tensor] = {}

    def capture(act: Tensor, hook: Any) -> None:
        captured["x"] = act

    def replace(act: Tensor, hook: Any) -> Tensor:
        x = captured.pop("x") if splice.transcoder else act
        x = _read(x, splice.in_head, splice.in_hook).to(device)
        target = _read(act, splice.out_head, splice.out_hook)
        new = _predict(sae, scaler.scale(x)).to(target.dtype)
        new = scaler.unscale(new)
        new = torch.where(mask[..., None], new, target.to(device))
        return _write(act, new.to(act.device), splice.out_head)

    def zero(act: Tensor, hook: Any) -> Tensor:
        zeros = torch.zeros_like(_read(act, splice.out_head, splice.out_hook))
        return _write(act, zeros, splice.out_head)

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
    splice = _splice(sae, hook_name)
    res = _recons_loss(
        sae, model, _Scaler(activation_scaler), batch_tokens, splice, ignore_tokens,
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
        mask = _token_mask(tokens, ignore_tokens) if ignore_tokens else None
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
        metrics["kl_div_score"] = _ratio(kl_zero - kl_sae, kl_zero)
    if compute_ce_loss:
        ce_zero, ce_sae = metrics["ce_loss_with_ablation"], metrics["ce_loss_with_sae"]
        metrics["ce_loss_score"] = _ratio(
            ce_zero - ce_sae, ce_zero - metrics["ce_loss_without_sae"]
        )
    return metrics


# ----------------------------------------------------------------------------------------
# reconstruction, sparsity and density statistics, streamed over batches
# ----------------------------------------------------------------------------------------
class _ActivationStats:
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
            return _ratio(self.rrb_sum, self.n_batches)
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
    splice = _splice(sae)
    scaler = _Scaler(activation_scaler)
    device = sae.W_dec.device
    stats = _ActivationStats(sae.cfg.d_sae, device)
    names = list(dict.fromkeys([splice.in_hook, splice.out_hook]))
    batches = range(n_batches)
    for _ in (
        tqdm(batches, desc="Sparsity and Variance Batches", leave=False) if verbose else batches
    ):
        tokens = activation_store.get_batch_tokens(eval_batch_size_prompts)
        _, cache = model.run_with_cache(
            tokens, prepend_bos=False, names_filter=names,
            stop_at_layer=_stop_at_layer(names), **(model_kwargs or {}),
        )  # fmt: skip
        x_in = _read(cache[splice.in_hook], splice.in_head, splice.in_hook)
        target = _read(cache[splice.out_hook], splice.out_head, splice.out_hook)
        del cache
        x_hat, acts = _encode_decode(sae, scaler.scale(x_in).to(device))
        x_hat = scaler.unscale(x_hat.to(x_in.device))
        stats.add(target, x_hat, acts, _token_mask(tokens, ignore_tokens))

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
    ignored = _ignored_ids(model, exclude_special_tokens, ignore_tokens)
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
    stats = None
    for x in batches:
        x = x.to(sae.W_dec.device)
        if stats is None:
            stats = _ActivationStats(sae.cfg.d_sae, x.device)
        x_hat, acts = _encode_decode(sae, x)
        if isinstance(acts, SparseCode):
            acts = SparseCode(acts.values[:, None], acts.indices[:, None])
        else:
            acts = acts[:, None]
        stats.add(x[:, None], x_hat[:, None], acts, torch.ones(x.shape[0], 1, dtype=torch.bool))
    if stats is None or not stats.n_tokens:
        raise ValueError("reconstruction_metrics: no batches given")
    d_out = x_hat.shape[-1]
    return {
        "metrics/l0": stats.mean("l0"),
        "metrics/explained_variance": stats.explained_variance(),
        "metrics/mse": stats.mean("mse") / d_out,
        "metrics/cossim": stats.mean("cossim"),
        "metrics/l2_ratio": stats.mean("l2_ratio"),
        "sparsity/dead_features_in_eval": int((stats.feature_acts == 0).sum()),
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
    TransformerLens model on ``tokens [batch, seq]`` with the SAE at ``hook_name``
    (``hook_head_index``: one head of a ``[b, pos, n_heads, d_head]`` hook). Every
    token counts; the values are those of :func:`run_evals` on these tokens."""
    splice = _splice(sae, hook_name, hook_head_index)
    reshaping = getattr(sae, "hook_z_reshaping_mode", None) if "hook_z" in hook_name else None
    if reshaping:
        sae.turn_off_forward_pass_hook_z_reshaping()
    try:
        res = _recons_loss(sae, model, _Scaler(None), tokens, splice, None, {})
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
        f"{pre}ce_loss_score": _ratio(ce_zero - ce_sae, ce_zero - ce_clean),
        f"{beh}kl_div_with_sae": m["kl_div_with_sae"],
        f"{beh}kl_div_with_ablation": m["kl_div_with_ablation"],
        f"{beh}kl_div_score": _ratio(m["kl_div_with_ablation"] - m["kl_div_with_sae"],
                                     m["kl_div_with_ablation"]),
    }  # fmt: skip
