"""The temporal architecture (SAELens ``TemporalSAE``, https://arxiv.org/abs/2511.01836):
each token's activation is split into a part predicted from the earlier tokens of its
sequence (causal attention over their codes) and a novel part, coded sparsely.

Inference only, as in SAELens: sae-lens 6.54.12 has no training class for it.

Inputs are ``[batch, seq, d_in]`` (``[batch, seq, n_heads, d_head]`` with hook_z
reshaping): the attention runs along ``seq``, so a flat ``[tokens, d_in]`` batch has no
meaning here and is a ValueError.

Parameters (SAELens names and shapes): ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``,
``W_enc [d_in, d_sae]`` only when ``tied_weights=False`` (tied: the encoder is
``W_dec.T``), and per attention layer ``attn_layers.{i}.k_ctx`` / ``q_target``
(``d_sae -> d_sae // bottleneck_factor``), ``v_ctx`` / ``c_proj`` (``d_sae -> d_sae``),
each a ``weight`` and a ``bias``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastsae import ops
from fastsae.saes.base import SAE
from fastsae.saes.config import SAEConfig
from fastsae.saes.registry import register
from fastsae.sparse_code import SparseCode

# SAELens's list for this architecture: the shared modes less covariance whitening, plus
# a constant scalar factor taken from the config
TEMPORAL_NORMALIZE_ACTIVATIONS = (
    "none",
    "expected_average_only_in",
    "constant_norm_rescale",
    "constant_scalar_rescale",
    "layer_norm",
)
SAE_DIFF_TYPES = ("relu", "topk")
_EPS = 1e-6  # added to norms before dividing by them (initialisation and projections)


def _positive_int(value: object, name: str, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass
class TemporalSAEConfig(SAEConfig):
    """Config of a :class:`TemporalSAE` (SAELens ``TemporalSAEConfig``: same fields,
    defaults and ``architecture() == "temporal"``).

    ``n_heads``: attention heads per layer. ``n_attn_layers``: attention layers, each
    predicting a further part of the input from the context. ``bottleneck_factor``: the
    query/key width is ``d_sae // bottleneck_factor``; ``d_sae`` must be a multiple of
    ``bottleneck_factor * n_heads`` when there is an attention layer.
    ``sae_diff_type``: how the novel codes are made, ``"relu"`` or ``"topk"`` (ReLU, then
    only the ``kval_topk`` largest kept per token; ``kval_topk=None`` keeps all).
    ``tied_weights``: encode with ``W_dec.T`` (no ``W_enc`` parameter).
    ``activation_normalization_factor``: the input is multiplied by it (and the output
    divided) when ``normalize_activations="constant_scalar_rescale"``.
    """

    n_heads: int = 8
    n_attn_layers: int = 1
    bottleneck_factor: int = 64
    sae_diff_type: str = "topk"
    kval_topk: int | None = None
    tied_weights: bool = True
    activation_normalization_factor: float = 1.0

    _architecture: ClassVar[str | None] = "temporal"

    def __post_init__(self) -> None:
        mode = self.normalize_activations
        if mode not in TEMPORAL_NORMALIZE_ACTIVATIONS:
            raise ValueError(
                f"normalize_activations must be one of {TEMPORAL_NORMALIZE_ACTIVATIONS} "
                f"for a temporal SAE, got {mode!r}"
            )
        # the shared checks know only the modes every SAE has; this one is ours
        if mode == "constant_scalar_rescale":
            self.normalize_activations = "none"
        try:
            super().__post_init__()
        finally:
            self.normalize_activations = mode
        _positive_int(self.n_heads, "n_heads")
        _positive_int(self.n_attn_layers, "n_attn_layers", minimum=0)
        _positive_int(self.bottleneck_factor, "bottleneck_factor")
        if self.n_attn_layers and self.d_sae % (self.bottleneck_factor * self.n_heads):
            raise ValueError(
                f"d_sae={self.d_sae} must be a multiple of bottleneck_factor * n_heads "
                f"= {self.bottleneck_factor} * {self.n_heads} (each attention head gets "
                "an equal share of the query/key width d_sae // bottleneck_factor)"
            )
        if self.sae_diff_type not in SAE_DIFF_TYPES:
            raise ValueError(
                f"sae_diff_type must be one of {SAE_DIFF_TYPES}, got {self.sae_diff_type!r}"
            )
        if self.kval_topk is not None:
            _positive_int(self.kval_topk, "kval_topk")
            if self.kval_topk > self.d_sae:
                raise ValueError(f"kval_topk={self.kval_topk} exceeds d_sae={self.d_sae}")
        if not isinstance(self.tied_weights, bool):
            raise ValueError(f"tied_weights must be a bool, got {self.tied_weights!r}")
        factor = self.activation_normalization_factor
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real):
            raise ValueError(f"activation_normalization_factor must be a number, got {factor!r}")
        if mode == "constant_scalar_rescale" and not (math.isfinite(factor) and factor != 0):
            raise ValueError(
                "normalize_activations='constant_scalar_rescale' divides the output by "
                f"activation_normalization_factor, which must be finite and non-zero, got {factor!r}"
            )


def causal_attention_weights(query: Tensor, key: Tensor) -> Tensor:
    """Softmax attention weights ``[..., L, S]`` of ``query [..., L, d]`` over
    ``key [..., S, d]``, scaled by ``1/sqrt(d)``; position ``i`` sees keys ``0..i``."""
    scores = (query @ key.transpose(-2, -1)) * (1 / math.sqrt(query.shape[-1]))
    L, S = scores.shape[-2:]
    future = torch.ones(L, S, dtype=torch.bool, device=query.device).triu(diagonal=1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


class ManualAttention(nn.Module):
    """Multi-head causal attention from context codes to target codes (SAELens
    ``ManualAttention``: same submodule names, shapes and initialisation).

    Keys and values come from ``x_ctx``, queries from ``x_target`` (both
    ``[batch, seq, dimin]``); queries and keys are ``dimin // bottleneck_factor`` wide,
    values ``dimin``; ``c_proj`` maps the joined heads back to ``dimin``.
    """

    def __init__(
        self,
        dimin: int,
        n_heads: int = 4,
        bottleneck_factor: int = 64,
        bias_k: bool = True,
        bias_q: bool = True,
        bias_v: bool = True,
        bias_o: bool = True,
        *,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if dimin % (bottleneck_factor * n_heads):
            raise ValueError(
                f"attention width dimin={dimin} must be a multiple of bottleneck_factor * "
                f"n_heads = {bottleneck_factor} * {n_heads}"
            )
        self.n_heads = n_heads
        self.n_embds = dimin // bottleneck_factor
        self.dimin = dimin
        # On the meta device (a load: the weights are assigned afterwards) the layers are
        # made there directly; otherwise on the CPU in the default dtype, initialised, and
        # left for the caller to move, which is what SAELens does (same seed, same weights).
        meta = device is not None and torch.device(device).type == "meta"
        kw = {"device": "meta"} if meta else {}
        self.k_ctx = nn.Linear(dimin, self.n_embds, bias=bias_k, **kw)
        self.q_target = nn.Linear(dimin, self.n_embds, bias=bias_q, **kw)
        self.v_ctx = nn.Linear(dimin, dimin, bias=bias_v, **kw)
        self.c_proj = nn.Linear(dimin, dimin, bias=bias_o, **kw)
        if not meta:
            self._rescale_rows()

    @torch.no_grad()
    def _rescale_rows(self) -> None:
        """Every weight row to a fixed norm: ``1/sqrt(head width)`` for the query, key and
        value maps, ``1/sqrt(dimin)`` for the output map."""
        qk_norm = 1 / math.sqrt(self.n_embds // self.n_heads)
        targets = (
            (self.k_ctx, qk_norm),
            (self.q_target, qk_norm),
            (self.v_ctx, 1 / math.sqrt(self.dimin // self.n_heads)),
            (self.c_proj, 1 / math.sqrt(self.dimin)),
        )
        for layer, norm in targets:
            w = layer.weight
            row_norms = torch.linalg.vector_norm(w, dim=1, keepdim=True)
            w.copy_((norm * w) / (_EPS + row_norms))

    def _split_heads(self, t: Tensor, batch: int, seq: int) -> Tensor:
        # [batch, seq, n_heads * width] -> [batch, n_heads, seq, width]
        return t.view(batch, seq, self.n_heads, t.shape[-1] // self.n_heads).transpose(1, 2)

    def forward(
        self, x_ctx: Tensor, x_target: Tensor, get_attn_map: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """``(output [batch, seq, dimin], attention weights [batch, n_heads, seq, seq] or
        None)``; target position ``t`` attends to context positions ``0..t``."""
        batch, seq, _ = x_ctx.shape
        k = self._split_heads(self.k_ctx(x_ctx), batch, seq)
        v = self._split_heads(self.v_ctx(x_ctx), batch, seq)
        q = self._split_heads(self.q_target(x_target), batch, seq)
        attn_map = causal_attention_weights(q, k) if get_attn_map else None
        heads = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=True)
        joined = heads.transpose(1, 2).contiguous().view(batch, seq, self.dimin)
        return self.c_proj(joined), attn_map


class TemporalSAE(SAE[TemporalSAEConfig]):
    """SAELens ``TemporalSAE``: codes = predicted codes (from the context) + novel codes.

    Per attention layer: the residual (the processed input at first) is encoded with
    ReLU at scale ``lam = 1 / (4 d_in)``; each position attends over the codes of the
    positions before it (shifted one step; position 0 sees a zero code); the ReLU of
    that prediction, decoded, is projected onto the residual, and the projected part is
    added to the predicted codes and removed from the residual. The novel codes encode
    what is left (ReLU, then top-``kval_topk`` for ``sae_diff_type="topk"``).

    ``encode`` gives the novel codes (the features; through ``hook_sae_acts_pre`` /
    ``hook_sae_acts_post``), ``encode_with_predictions`` both. ``forward`` decodes
    their sum; ``decode`` the codes it is given only, so ``decode(encode(x))`` misses
    the predicted part, as in SAELens. ``b_dec`` is added on decoding unless the weights
    are tied and ``apply_b_dec_to_input`` is False.

    Differences from sae-lens 6.54.12: ``use_error_term`` is honoured (sae-lens's
    temporal forward ignores it, so a spliced SAE with the error term on still returned
    only the reconstruction); inputs that are not ``[batch, seq, d_in]`` and bad
    configs are ValueErrors naming the problem instead of failed unpackings or asserts.
    """

    config_class = TemporalSAEConfig
    cfg: TemporalSAEConfig
    attn_layers: nn.ModuleList
    eps: float
    lam: float

    def __init__(self, cfg: TemporalSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.attn_layers = nn.ModuleList(
            ManualAttention(
                dimin=cfg.d_sae,
                n_heads=cfg.n_heads,
                bottleneck_factor=cfg.bottleneck_factor,
                device=self.device,
            ).to(device=self.device, dtype=self.dtype)
            for _ in range(cfg.n_attn_layers)
        )
        self.eps = _EPS
        self.lam = 1 / (4 * cfg.d_in)

    def _init_parameters(self) -> None:
        """SAELens's initialisation: standard-normal ``W_dec`` (and ``W_enc`` when untied),
        zero ``b_dec``."""
        cfg = self.cfg
        self.W_dec = nn.Parameter(
            torch.randn(cfg.d_sae, cfg.d_in, dtype=self.dtype, device=self.device)
        )
        self.b_dec = self._param(cfg.d_in)
        if not cfg.tied_weights:
            self.W_enc = nn.Parameter(
                torch.randn(cfg.d_in, cfg.d_sae, dtype=self.dtype, device=self.device)
            )

    def _encoder_weight(self) -> Tensor:
        return self.W_dec.T if self.cfg.tied_weights else self.W_enc

    # ------------------------------------------------------------------ input
    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 3 or x.shape[-1] != self.cfg.d_in:
            layout = (
                "[batch, seq, n_heads, d_head] (hook_z)"
                if self.hook_z_reshaping_mode
                else f"[batch, seq, d_in={self.cfg.d_in}]"
            )
            raise ValueError(
                f"TemporalSAE input must be {layout}: it attends over the seq dimension "
                f"(input last dimension d_in={self.cfg.d_in}); got shape {tuple(x.shape)}"
            )

    def _normalize_in(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        if self.cfg.normalize_activations == "constant_scalar_rescale":
            return x * self.cfg.activation_normalization_factor, None
        return super()._normalize_in(x)

    def _normalize_out(self, x: Tensor, stats: tuple[Tensor, ...] | None) -> Tensor:
        if self.cfg.normalize_activations == "constant_scalar_rescale":
            return x / self.cfg.activation_normalization_factor
        return super()._normalize_out(x, stats)

    # ------------------------------------------------------------------ encode
    def _encode_both(self, sae_in: Tensor) -> tuple[Tensor, Tensor]:
        """Processed ``[batch, seq, d_in]`` -> ``(novel codes, predicted codes)``, both
        ``[batch, seq, d_sae]``; the novel codes go through the activation hooks."""
        W_enc = self._encoder_weight()
        batch, seq, _ = sae_in.shape
        residual = sae_in
        z_pred = sae_in.new_zeros(batch, seq, self.cfg.d_sae)
        for layer in self.attn_layers:
            z_in = F.relu((residual * self.lam) @ W_enc)
            # the context of position t is the codes of 0..t-1 (a zero code first)
            z_ctx = torch.cat((torch.zeros_like(z_in[:, :1]), z_in[:, :-1]), dim=1)
            z_layer = F.relu(layer(z_ctx, z_in)[0])
            pred = z_layer @ self.W_dec
            denom = (pred.norm(dim=-1, keepdim=True) + self.eps).pow(2)
            coeff = (pred * residual).sum(dim=-1, keepdim=True) / denom
            z_pred = z_pred + z_layer * coeff
            residual = residual - coeff * pred
        hidden_pre = self.hook_sae_acts_pre((residual * self.lam) @ W_enc)
        z_novel = F.relu(hidden_pre)
        k = self.cfg.kval_topk
        if self.cfg.sae_diff_type == "topk" and k is not None:
            keep = torch.zeros_like(z_novel).scatter_(-1, z_novel.topk(k, dim=-1).indices, 1)
            z_novel = z_novel * keep
        return self.hook_sae_acts_post(z_novel), z_pred

    def _encode_dense(self, sae_in: Tensor) -> Tensor:
        return self._encode_both(sae_in)[0]

    def encode_with_predictions(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [batch, seq, d_in]`` -> ``(novel codes, predicted codes)``, each
        ``[batch, seq, d_sae]`` (SAELens ``encode_with_predictions``); ``forward``
        decodes their sum."""
        sae_in, self._norm_stats = self._process_sae_in(x)
        return self._encode_both(sae_in)

    # ------------------------------------------------------------------ decode
    def _adds_b_dec(self) -> bool:
        return not self.cfg.tied_weights or self.cfg.apply_b_dec_to_input

    def _dense_decoder(self, feature_acts: Tensor) -> Tensor:
        out = feature_acts @ self.W_dec
        return out + self.b_dec if self._adds_b_dec() else out

    def decode(self, feature_acts: Tensor) -> Tensor:
        """``[..., d_sae]`` codes -> ``[..., d_in]``: the novel part of the reconstruction
        only (``forward`` adds the predicted part). Warns, as SAELens does, that the
        predicted part is missing."""
        out = super().decode(feature_acts)
        warnings.warn(
            "TemporalSAE.decode decodes the codes it is given (the novel codes) only; "
            "the part predicted from the context is missing. forward() reconstructs both.",
            UserWarning,
            stacklevel=2,
        )
        return out

    def _decode_code(self, code: SparseCode, stats: tuple[Tensor, ...] | None) -> Tensor:
        b_dec = self.b_dec if self._adds_b_dec() else None
        out = ops.sparse_decode(code, self.W_dec, b_dec)
        return self._finish_decode(out.to(self.dtype), stats)

    # ------------------------------------------------------------------ forward
    def _reconstruct(self, x: Tensor) -> Tensor:
        """(novel + predicted codes) decoded, de-normalised and reshaped; no
        ``hook_sae_recons`` (SAELens's temporal forward has none)."""
        z_novel, z_pred = self.encode_with_predictions(x)
        out = self._dense_decoder(z_novel + z_pred)
        out = self._normalize_out(out, self._norm_stats)
        return self.reshape_fn_out(out, self.d_head)

    # ------------------------------------------------------------------ folding
    def fold_and_get_W_dec_norm(self) -> Tensor:
        raise NotImplementedError("Folding W_dec norms is not supported for TemporalSAE")

    def fold_W_dec_norm(self) -> None:
        raise NotImplementedError("Folding W_dec norms is not supported for TemporalSAE")

    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        raise NotImplementedError(
            "Folding an activation norm scaling factor is not supported for TemporalSAE"
        )

    def fold_activation_whitening(
        self, mean: Tensor, whitening_matrix: Tensor, unwhitening_matrix: Tensor
    ) -> None:
        raise NotImplementedError("Folding activation whitening is not supported for TemporalSAE")


register("temporal", TemporalSAE, TemporalSAEConfig)
