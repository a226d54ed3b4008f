"""BatchTopK and Matryoshka BatchTopK training SAEs (both save as JumpReLU).

BatchTopK keeps the ``k * batch`` largest ReLU'd pre-activations of the whole batch.
The selection needs every pre-activation, so the encoder here is dense; the
selected entries become a padded SparseCode and the decoder, its backward and
the Matryoshka inner reconstructions run on the sparse kernels. BatchTopK also has a
latent-sharded step (the batch-wide selection made exactly across the ranks).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastsae import ops
from fastsae.saes.registry import register
from fastsae.saes.step_weights import StepWeights
from fastsae.saes.topk import (
    ShardedTopKTrainingSAE,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
    take_deterministic,
)
from fastsae.saes.training_sae import TrainStepInput, TrainStepOutput
from fastsae.sparse_code import SparseCode
from fastsae.torch_ops import encoder_preacts, padded_layout
from fastsae.training.parallel.latent.base import all_reduce
from fastsae.training.parallel.latent.selection import merge_candidates


class BatchTopK(nn.Module):
    """SAELens's BatchTopK activation (``activation_fn`` of the BatchTopK SAEs): the
    ``int(k * tokens)`` largest ReLU'd entries of the whole ``[..., d_sae]`` batch kept,
    the rest zeroed."""

    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        acts = x.relu()
        flat = acts.flatten()
        top = torch.topk(flat, int(self.k * acts.shape[:-1].numel()), dim=-1)
        return torch.zeros_like(flat).scatter(-1, top.indices, top.values).reshape(acts.shape)


@dataclass
class BatchTopKTrainingSAEConfig(TopKTrainingSAEConfig):
    """Training config of a BatchTopK SAE (SAELens fields).

    ``k`` (float): mean active latents per token over the batch. ``topk_threshold_lr``:
    EMA rate of the global threshold (the smallest selected activation), which becomes
    the JumpReLU threshold of the saved SAE.
    """

    k: float = 100  # type: ignore[assignment]
    # keyword-only like TopK's rescale_acts_by_decoder_norm, which SAELens puts before it
    topk_threshold_lr: float = field(default=0.01, kw_only=True)

    _architecture: ClassVar[str | None] = "batchtopk"
    _inference_architecture: ClassVar[str | None] = "jumprelu"

    def _check_k(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, (int, float)):
            raise ValueError(f"k must be a number, got {self.k!r}")
        if not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be in (0, d_sae={self.d_sae}], got {self.k!r}")
        if not 0 <= self.topk_threshold_lr <= 1:
            raise ValueError(f"topk_threshold_lr must be in [0, 1], got {self.topk_threshold_lr!r}")


class BatchTopKTrainingSAE(TopKTrainingSAE):
    """BatchTopK SAE: ``k`` active latents per token on average over the batch."""

    config_class = BatchTopKTrainingSAEConfig
    cfg: BatchTopKTrainingSAEConfig

    def __init__(self, cfg: BatchTopKTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        # double precision, as SAELens: an EMA of small numbers drifts in fp32
        self.register_buffer(
            "topk_threshold", torch.tensor(0.0, dtype=torch.double, device=self.W_dec.device)
        )

    def get_activation_fn(self) -> Callable[[Tensor], Tensor]:
        return BatchTopK(self.cfg.k)

    def _n_selected(self, n_tokens: int) -> int:
        return int(self.cfg.k * n_tokens)

    def _activation(self, hidden_pre: Tensor) -> Tensor:
        acts = hidden_pre.relu()
        flat = acts.flatten()
        top = torch.topk(flat, self._n_selected(acts.shape[:-1].numel()), dim=-1)
        return torch.zeros_like(flat).scatter(-1, top.indices, top.values).reshape(acts.shape)

    def _train_code(self, sae_in: Tensor, weights: StepWeights) -> SparseCode:
        """Batch top-k as a padded code ``[batch, K]``, K = most latents any token got
        (on CUDA without a ``[batch, d_sae]`` tensor: ``ops.batch_topk_encode``)."""
        return ops.batch_topk_encode(
            sae_in,
            weights.W_enc,
            self.b_enc,
            self._n_selected(sae_in.shape[0]),
            dec_norm=weights.dec_norm,
        )

    def _encode_code(self, sae_in: Tensor) -> SparseCode:
        # the batch is every token of ``[..., d_in]`` (as SAELens's BatchTopK flattens)
        lead = sae_in.shape[:-1]
        weights = StepWeights(self.W_enc, self.W_dec, self._dec_norm())
        code = self._train_code(sae_in.reshape(-1, sae_in.shape[-1]), weights)
        return SparseCode(code.values.reshape(*lead, -1), code.indices.reshape(*lead, -1))

    def _encode_dense(self, sae_in: Tensor) -> Tensor:
        hidden_pre = self._hidden_pre(sae_in, self._dec_norm())
        return self.hook_sae_acts_post(self._activation(hidden_pre))

    def _after_step(self, output: TrainStepOutput) -> None:
        output.metrics["topk_threshold"] = self._update_topk_threshold(output)

    @torch.no_grad()
    def _update_topk_threshold(self, output: TrainStepOutput) -> Tensor:
        values = output.code.values if output.code is not None else output.feature_acts
        positive = values[values > 0]
        if positive.numel():
            lr = self.cfg.topk_threshold_lr
            with torch.autocast(self.topk_threshold.device.type, enabled=False):
                new = (1 - lr) * self.topk_threshold + lr * positive.min().to(torch.double)
            self.topk_threshold = new
        return self.topk_threshold

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)
        if self.cfg.rescale_acts_by_decoder_norm:
            # the threshold is in units of hidden_pre * ||W_dec||, and W_dec just shrank
            self.topk_threshold /= scaling_factor

    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        """TopK's norm fold, then the global threshold becomes a per-latent JumpReLU threshold."""
        super().process_state_dict_for_saving_inference(state_dict)
        threshold = state_dict.pop("topk_threshold").item()
        state_dict["threshold"] = torch.ones_like(state_dict["b_enc"]) * threshold


@dataclass
class MatryoshkaBatchTopKTrainingSAEConfig(BatchTopKTrainingSAEConfig):
    """Training config of a Matryoshka BatchTopK SAE (SAELens fields).

    ``matryoshka_widths``: strictly increasing prefix widths; each prefix of the
    dictionary must reconstruct the input on its own (an inner MSE per level). A last
    level of ``d_sae`` is appended when missing. ``use_matryoshka_aux_loss``: dead
    latents reconstruct their own level's residual instead of the whole SAE's.
    """

    # keyword-only, as the BatchTopK fields SAELens puts before them
    matryoshka_widths: list[int] = field(default_factory=list, kw_only=True)
    use_matryoshka_aux_loss: bool = field(default=False, kw_only=True)

    _architecture: ClassVar[str | None] = "matryoshka_batchtopk"
    _inference_architecture: ClassVar[str | None] = "jumprelu"

    def __post_init__(self) -> None:
        super().__post_init__()
        widths = self.matryoshka_widths = [int(w) for w in self.matryoshka_widths]
        if not widths:
            raise ValueError("matryoshka_widths must not be empty")
        if any(w <= 0 for w in widths):
            raise ValueError(f"matryoshka_widths must be positive, got {widths}")
        if widths[-1] != self.d_sae:
            warnings.warn(
                f"the last matryoshka width {widths[-1]} is not d_sae={self.d_sae}; "
                f"a final level of width {self.d_sae} is added",
                stacklevel=2,
            )
            widths.append(self.d_sae)
        if any(a >= b for a, b in zip(widths[:-1], widths[1:], strict=False)):
            raise ValueError(f"matryoshka_widths must be strictly increasing, got {widths}")


class MatryoshkaBatchTopKTrainingSAE(BatchTopKTrainingSAE):
    """BatchTopK SAE whose every prefix ``[:w]`` of latents is trained to reconstruct alone."""

    config_class = MatryoshkaBatchTopKTrainingSAEConfig
    cfg: MatryoshkaBatchTopKTrainingSAEConfig
    # ``[levels, batch, d_in]`` prefix reconstructions of the current sparse step
    _level_decodes: Tensor | None = None

    def _partial_reconstructions(self, code: SparseCode, stats: Any, include_outer: bool):
        """Yield ``(width, reconstruction [batch, d_in])`` of each prefix level, sparsely."""
        if self.cfg.rescale_acts_by_decoder_norm:
            code = SparseCode(
                code.values * take_deterministic(1 / self.W_dec.norm(dim=-1), code.indices),
                code.indices,
            )
        widths = self.cfg.matryoshka_widths if include_outer else self.cfg.matryoshka_widths[:-1]
        for width in widths:
            values = code.values * (code.indices < width)
            decoded = ops.sparse_decode(SparseCode(values, code.indices), self.W_dec, self.b_dec)
            yield width, self._normalize_out(decoded.to(self.dtype), stats)

    def _train_decode(self, code: SparseCode, weights: StepWeights) -> Tensor:
        """Every level from one sparse decode, so W_dec gets one gradient, not one per
        level: the code's pairs split into the bands between consecutive widths, stacked
        as ``[levels * batch, K]`` rows, decoded once, summed cumulatively (level i = bands
        0..i). Keeps the levels for the inner losses; returns the whole SAE's."""
        widths = self.cfg.matryoshka_widths
        bands = [
            code.values * ((code.indices >= lo) & (code.indices < hi))
            for lo, hi in zip([0, *widths[:-1]], widths, strict=True)
        ]
        stacked = SparseCode(torch.cat(bands), code.indices.repeat(len(widths), 1))
        decoded = ops.sparse_decode(stacked, weights.W_dec)
        levels = decoded.view(len(widths), *code.values.shape[:-1], -1).cumsum(0) + self.b_dec
        self._level_decodes = levels
        return levels[-1]

    def _inner_reconstructions(self, code: SparseCode, include_outer: bool):
        """``(width, reconstruction)`` per level: the sparse step's levels from
        ``_train_decode`` when it ran, else decoded from ``code`` (the dense path)."""
        if self._level_decodes is None:
            yield from self._partial_reconstructions(code, self._norm_stats, include_outer)
            return
        widths = self.cfg.matryoshka_widths if include_outer else self.cfg.matryoshka_widths[:-1]
        for width, level in zip(widths, self._level_decodes, strict=False):
            yield width, self._normalize_out(level.to(self.dtype), self._norm_stats)

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        self._level_decodes = None
        output = super().training_forward_pass(step_input)
        code = output.code
        if code is None:  # the dense path (a hook on the activations)
            code = self._compact(output.feature_acts)
            assert code is not None
        for width, recons in self._inner_reconstructions(code, False):
            inner = self.mse_loss_fn(recons, step_input.sae_in).sum(dim=-1).mean()
            output.losses[f"inner_mse_loss_{width}"] = inner
            output.loss = output.loss + inner
        self._level_decodes = None  # the autograd graph keeps what backward needs
        return output

    def _extra_losses(
        self,
        step_input: TrainStepInput,
        sae_in: Tensor,
        sae_out: Tensor,
        code: SparseCode,
        weights: StepWeights,
    ) -> dict[str, Tensor]:
        if not self.cfg.use_matryoshka_aux_loss:
            return super()._extra_losses(step_input, sae_in, sae_out, code, weights)
        mask = step_input.dead_neuron_mask
        total = sae_out.new_tensor(0.0)
        if mask is None or not bool(mask.any()):
            return {"auxiliary_reconstruction_loss": total}
        prev = 0
        for width, partial in self._inner_reconstructions(code, True):
            total = total + self._auxk_loss(
                step_input.sae_in, partial, mask, sae_in=sae_in, columns=slice(prev, width),
                weights=weights,
            )  # fmt: skip
            prev = width
        return {"auxiliary_reconstruction_loss": total}


class ShardedBatchTopKTrainingSAE(ShardedTopKTrainingSAE):
    """This rank's shard of a :class:`BatchTopKTrainingSAE` (``topk_threshold``
    replicated) for latent sharding.

    Latent-sharded BatchTopK: the ``k * batch`` largest ReLU'd pre-activations of the whole
    batch, chosen exactly across the shards.

    Each rank takes the top ``k * batch`` entries of its own ``[batch, d_sae / W]`` block
    (a globally chosen entry has fewer than ``k * batch`` larger entries anywhere, so it is
    among its own block's top ``k * batch``); the candidates are all-gathered and every rank
    keeps the same global top ``k * batch``. The rest is the sharded TopK step (padded
    per-token code of this rank's picks, partial reconstructions summed, AuxK chosen
    globally). The threshold EMA (the smallest selected activation, as SAELens) takes the
    minimum over the shards, so the replicated ``topk_threshold`` buffer stays equal on
    every rank. Communication: ``2 * k * batch`` values + ids per rank instead of TopK's
    ``k * batch`` per row.
    """

    full_class = BatchTopKTrainingSAE  # type: ignore[assignment]

    @classmethod
    def step_payloads(
        cls, batch: int, d_in: int, *, k: float, n_dead: int, dtype_bytes: int, pre_act_loss: bool
    ) -> dict[str, int]:
        """TopK's, with ``int(k * batch)`` candidates for the whole batch, plus the
        threshold's ``all_reduce(min)`` of one float64."""
        out = super().step_payloads(
            batch, d_in, k=k, n_dead=n_dead, dtype_bytes=dtype_bytes, pre_act_loss=pre_act_loss
        )
        out["batch topk threshold all_reduce(min)"] = 8
        return out

    @staticmethod
    def n_candidates(batch: int, k: float) -> float:
        """Candidates one rank sends per step: ``int(k * batch)`` for the whole batch."""
        return int(k * batch)

    cfg: BatchTopKTrainingSAEConfig  # type: ignore[assignment]

    def __init__(
        self, cfg: BatchTopKTrainingSAEConfig, rank: int, world_size: int, group=None
    ) -> None:
        super().__init__(cfg, rank, world_size, group)
        self.register_buffer("topk_threshold", torch.tensor(0.0, dtype=torch.double))

    def _select(self, sae_in: Tensor, dn: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        h = encoder_preacts(sae_in, self.W_enc.detach(), self.b_enc.detach())
        if dn is not None:
            h = h * dn
        n_tokens, n_local = h.shape
        n_sel = int(self.cfg.k * n_tokens)
        self.last_global_indices = None
        if n_sel == 0:
            pos = torch.zeros(n_tokens, 1, dtype=torch.long, device=h.device)
            return pos, h.new_zeros(n_tokens, 1), torch.zeros_like(pos, dtype=torch.bool)
        flat = h.reshape(-1)
        vals, flat_pos = torch.topk(flat.relu(), min(n_sel, flat.numel()), sorted=False)
        chosen, _ = merge_candidates(
            vals[None], flat_pos[None], n_sel, 0, self.group, "batch topk candidates",
            d_sae=flat.numel(),
        )  # fmt: skip
        picked = flat_pos[chosen[0]].sort().values
        rows, slot, width = padded_layout(picked, n_tokens, n_local)
        pos = torch.zeros(n_tokens, width, dtype=torch.long, device=h.device)
        raw = h.new_zeros(n_tokens, width)
        selected = torch.zeros(n_tokens, width, dtype=torch.bool, device=h.device)
        pos[rows, slot] = picked % n_local
        raw[rows, slot] = flat.index_select(0, picked)
        selected[rows, slot] = True
        return pos, raw, selected

    def _forward(self, step_input: TrainStepInput) -> TrainStepOutput:
        return super().training_forward_pass(step_input)

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """BatchTopK's step on the shards, then the threshold EMA (minimum over shards)."""
        output = self._forward(step_input)
        output.metrics["topk_threshold"] = self._update_topk_threshold(output)
        return output

    @torch.no_grad()
    def _update_topk_threshold(self, output: TrainStepOutput) -> Tensor:
        assert output.code is not None
        values = output.code.values.detach()
        positive = values[values > 0]
        local_min = positive.min().to(torch.double) if positive.numel() else None
        buf = torch.tensor(
            [float("inf") if local_min is None else float(local_min)],
            dtype=torch.double,
            device=values.device,
        )
        all_reduce(buf, self.group, "batch topk threshold all_reduce(min)", dist.ReduceOp.MIN)
        if torch.isfinite(buf).all():
            lr = self.cfg.topk_threshold_lr
            self.topk_threshold = (1 - lr) * self.topk_threshold + lr * buf[0]
        return self.topk_threshold


# saved as JumpReLU SAEs (their training configs' _inference_architecture)
register(
    "batchtopk",
    training_cls=BatchTopKTrainingSAE,
    training_cfg_cls=BatchTopKTrainingSAEConfig,
    sharded=ShardedBatchTopKTrainingSAE,
)
register(
    "matryoshka_batchtopk",
    training_cls=MatryoshkaBatchTopKTrainingSAE,
    training_cfg_cls=MatryoshkaBatchTopKTrainingSAEConfig,
)
