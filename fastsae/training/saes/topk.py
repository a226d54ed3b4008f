"""TopK training SAE: a sparse step end to end (no ``[batch, d_sae]`` tensor).

The step is: fused encode + top-k (``ops.topk_encode``, sparse backward) ->
sparse decode (``ops.sparse_decode``, sparse backward) -> MSE, plus AuxK over the
dead latents, computed with a dense matmul restricted to the dead columns (AuxK's
k_aux = d_in/2 is too wide for a gather to pay off, DESIGN.md kernel notes).
Same losses and gradients as SAELens's ``TopKTrainingSAE`` (tested to fp32 tolerance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from fastsae import ops
from fastsae.saes.config import TopKSAEConfig
from fastsae.saes.topk import TopKSAE
from fastsae.sparse_code import SparseCode
from fastsae.training.losses import topk_aux_scale
from fastsae.training.saes.base import (
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
    total_loss,
)
from fastsae.training.saes.step_weights import StepWeights, step_weights


@dataclass
class TopKTrainingSAEConfig(TrainingSAEConfig, TopKSAEConfig):
    """Training config of a TopK SAE (SAELens 6.x fields).

    ``k``: active latents per token. ``aux_loss_coefficient``: weight of AuxK (dead
    latents reconstruct the residual). ``rescale_acts_by_decoder_norm``: select and
    decode as if decoder rows had unit norm (default True, as SAELens).
    ``use_sparse_activations``: accepted for SAELens configs; fastsae's step is always
    sparse, so it changes nothing.
    """

    use_sparse_activations: bool = False
    aux_loss_coefficient: float = 1.0
    rescale_acts_by_decoder_norm: bool = True

    _architecture: ClassVar[str | None] = "topk"


class TopKTrainingSAE(TrainingSAE, TopKSAE):
    """TopK SAE with SAELens's losses (MSE + AuxK) on a sparse step."""

    config_class = TopKTrainingSAEConfig
    cfg: TopKTrainingSAEConfig

    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {}

    # ------------------------------------------------------------------ dense forms (SAELens API)
    def _activation(self, hidden_pre: Tensor) -> Tensor:
        values, indices = torch.topk(hidden_pre, self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(hidden_pre).scatter(-1, indices, values.relu())

    def _hidden_pre(self, sae_in: Tensor, dec_norm: Tensor | None) -> Tensor:
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        return hidden_pre * dec_norm if dec_norm is not None else hidden_pre

    def encode_with_hidden_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Dense ``(feature_acts, hidden_pre)`` ``[batch, d_sae]``, as SAELens returns them."""
        sae_in = self.process_sae_in(x)
        hidden_pre = self._hidden_pre(sae_in, self._dec_norm())
        return self.hook_sae_acts_post(self._activation(hidden_pre)), hidden_pre

    def calculate_aux_loss(
        self, step_input: TrainStepInput, feature_acts: Tensor, hidden_pre: Tensor, sae_out: Tensor
    ) -> dict[str, Tensor]:
        return {
            "auxiliary_reconstruction_loss": self._auxk_loss(
                step_input.sae_in, sae_out, step_input.dead_neuron_mask, hidden_pre=hidden_pre
            )
        }

    # ------------------------------------------------------------------ the sparse step
    def _train_code(self, sae_in: Tensor, weights: StepWeights) -> SparseCode:
        """Processed input ``[batch, d_in]`` -> the step's code ``[batch, K]`` (differentiable values)."""
        return ops.topk_encode(
            sae_in, weights.W_enc, self.b_enc, self.cfg.k, dec_norm=weights.dec_norm
        )

    def _step_weights(self, dead_neuron_mask: Tensor | None) -> StepWeights:
        """The step's views of W_enc/W_dec (one gradient buffer each, step_weights.py),
        with AuxK's dead latents when any are dead."""
        dead = None
        if dead_neuron_mask is not None:
            ids = dead_neuron_mask.nonzero().squeeze(1)
            dead = ids if ids.numel() else None
        return step_weights(self.W_enc, self.W_dec, dead, self.cfg.rescale_acts_by_decoder_norm)

    def _train_decode(self, code: SparseCode, weights: StepWeights) -> Tensor:
        """The step's decoder: a code (decoder-norm scaling applied) -> ``[batch, d_in]``,
        before ``_finish_decode`` (Matryoshka decodes its levels here)."""
        return ops.sparse_decode(code, weights.W_dec, self.b_dec)

    def _after_step(self, output: TrainStepOutput) -> None:
        """Hook run after the step's losses (BatchTopK updates its threshold here)."""

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        if self._acts_hooked():
            # a hook wants the dense activations: SAELens's dense step, same numbers
            output = super().training_forward_pass(step_input)
            self._after_step(output)
            return output
        x = step_input.sae_in
        weights = self._step_weights(step_input.dead_neuron_mask)
        dec_norm = weights.dec_norm
        if self._input_bias_shortcut():
            # sae_in = x - b_dec feeds only the encoder, so b_dec's gradient through it is
            # -W_enc @ (the encoder bias gradient): no per-token [batch, d_in] input
            # gradient (46 ms at B=2048, 768 x 24576 on 2 CPU cores; a full dense matmul
            # for BatchTopK's dense encoder)
            with torch.no_grad():
                sae_in, stats = self._process_sae_in(x)
            code = self._train_code(sae_in, weights)
            values = _InputBiasGrad.apply(
                code.values, code.indices, self.b_dec, self.W_enc, dec_norm
            )
            code = SparseCode(values, code.indices)
            sae_in = x - self.b_dec  # differentiable twin, for AuxK's dead-subset matmul
        else:
            sae_in, stats = self._process_sae_in(x)
            code = self._train_code(sae_in, weights)
        self._norm_stats = stats
        decoder_code = code
        if dec_norm is not None:
            decoder_code = SparseCode(
                code.values * take_deterministic(1 / dec_norm, code.indices), code.indices
            )
        sae_out = self._finish_decode(
            self._train_decode(decoder_code, weights).to(self.dtype), stats
        )
        losses = {"mse_loss": self.mse_loss_fn(sae_out, x).sum(dim=-1).mean()}
        losses.update(self._extra_losses(step_input, sae_in, sae_out, code, weights))
        sae_in_detached = sae_in.detach()
        dec_norm_detached = dec_norm.detach() if dec_norm is not None else None
        output = TrainStepOutput(
            sae_in=x,
            sae_out=sae_out,
            loss=total_loss(losses),
            losses=losses,
            code=code,
            d_sae=self.cfg.d_sae,
            hidden_pre_fn=lambda: self._hidden_pre(sae_in_detached, dec_norm_detached),
            hidden_pre_weights=(self.W_enc, self.b_enc, self.W_dec),
        )
        self._after_step(output)
        return output

    def _input_bias_shortcut(self) -> bool:
        return (
            self.cfg.apply_b_dec_to_input
            and self.cfg.normalize_activations in ("none", "expected_average_only_in")
            and self.b_dec.requires_grad
            and torch.is_grad_enabled()
        )

    def _extra_losses(
        self,
        step_input: TrainStepInput,
        sae_in: Tensor,
        sae_out: Tensor,
        code: SparseCode,
        weights: StepWeights,
    ) -> dict[str, Tensor]:
        return {
            "auxiliary_reconstruction_loss": self._auxk_loss(
                step_input.sae_in, sae_out, step_input.dead_neuron_mask, sae_in=sae_in,
                weights=weights,
            )
        }  # fmt: skip

    def _auxk_loss(
        self,
        x: Tensor,
        sae_out: Tensor,
        dead_neuron_mask: Tensor | None,
        *,
        hidden_pre: Tensor | None = None,
        sae_in: Tensor | None = None,
        columns: slice | None = None,
        weights: StepWeights | None = None,
    ) -> Tensor:
        """AuxK: the top ``d_in/2`` dead latents reconstruct the detached residual ``x - sae_out``.

        Pre-activations of the dead latents come from ``hidden_pre`` when given (dense
        path) or from ``sae_in`` with a matmul over the dead columns only (``weights``:
        the step's copies of them; else gathered here). ``columns`` restricts
        everything to a slice of latents (Matryoshka levels).
        """
        if dead_neuron_mask is None:
            return sae_out.new_tensor(0.0)
        lo, hi = (0, self.cfg.d_sae) if columns is None else (columns.start, columns.stop)
        if weights is not None and weights.dead is not None:
            # the step's dead ids are sorted: this level's are one contiguous run of them
            bounds = torch.tensor([lo, hi], device=weights.dead.device)
            first, last = torch.searchsorted(weights.dead, bounds).tolist()
            dead = weights.dead[first:last]
            W_enc_dead = weights.W_enc_dead[:, first:last]
            W_dec_dead = weights.W_dec_dead[first:last]
        else:
            dead = dead_neuron_mask[lo:hi].nonzero().squeeze(1) + lo
            W_enc_dead = W_dec_dead = None
        num_dead = dead.numel()
        if num_dead == 0:
            return sae_out.new_tensor(0.0)
        if self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            raise ValueError(
                "the TopK auxiliary loss does not support normalize_activations="
                f"{self.cfg.normalize_activations!r}: its reconstruction would be in "
                "normalised space while the residual is not"
            )
        residual = (x - sae_out).detach()
        k_aux, scale = topk_aux_scale(num_dead, x.shape[-1])
        if W_dec_dead is None:
            W_dec_dead = self.W_dec.index_select(0, dead)
        dec_norm = W_dec_dead.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None
        if hidden_pre is not None:
            h_dead = hidden_pre.index_select(-1, dead)
        else:
            assert sae_in is not None
            if W_enc_dead is None:
                W_enc_dead = self.W_enc.index_select(1, dead)
            h_dead = sae_in @ W_enc_dead + self.b_enc.index_select(0, dead)
            if dec_norm is not None:
                h_dead = h_dead * dec_norm
        values, indices = h_dead.topk(k_aux, dim=-1, sorted=False)
        acts = torch.zeros_like(h_dead).scatter(-1, indices, values)
        if dec_norm is not None:
            acts = acts * (1 / dec_norm)
        recons = acts @ W_dec_dead
        loss = (recons - residual).pow(2).sum(dim=-1).mean()
        return self.cfg.aux_loss_coefficient * scale * loss

    # ------------------------------------------------------------------ saving
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        """Fold decoder norms into the encoder (unit-norm decoder), as SAELens saves TopK."""
        super().process_state_dict_for_saving_inference(state_dict)
        if self.cfg.rescale_acts_by_decoder_norm:
            norm = self.get_W_dec_norm()
            state_dict["b_enc"] = state_dict["b_enc"] * norm
            state_dict["W_dec"] = state_dict["W_dec"] / norm.unsqueeze(1)
            state_dict["W_enc"] = state_dict["W_enc"] * norm.unsqueeze(0)


def take_deterministic(values: Tensor, indices: Tensor) -> Tensor:
    """``values[indices]`` whose backward is a deterministic ``index_add`` (advanced
    indexing's backward accumulates with parallel atomics on CPU: bitwise run-to-run
    differences, which would break exact resumes)."""
    return values.index_select(0, indices.reshape(-1)).view(indices.shape)


class _InputBiasGrad(torch.autograd.Function):
    """Identity on a code's values whose backward adds ``b_dec``'s gradient through the
    encoder input ``x - b_dec``: ``-W_enc @ g``, ``g[n]`` = the summed gradient of latent
    n's pre-activation (``d values * [value > 0] * dec_norm[n]``, as the top-k's ReLU
    and decoder-norm scaling give it)."""

    @staticmethod
    def forward(ctx, values, indices, b_dec, W_enc, dec_norm):  # type: ignore[override]
        ctx.save_for_backward(values, indices, W_enc, dec_norm)
        return values.clone()

    @staticmethod
    def backward(ctx, d_values):  # type: ignore[override]
        values, indices, W_enc, dec_norm = ctx.saved_tensors
        d_pre = d_values * (values > 0)
        if dec_norm is not None:
            d_pre = d_pre * dec_norm[indices]
        dtype = torch.promote_types(d_pre.dtype, torch.float32)
        g = torch.zeros(W_enc.shape[1], dtype=dtype, device=W_enc.device)
        g.index_add_(0, indices.reshape(-1).long(), d_pre.reshape(-1).to(dtype))
        d_b_dec = -matvec_upcast(W_enc, g)
        return d_values, None, d_b_dec.to(W_enc.dtype), None, None


MATVEC_BLOCK_BYTES = 1 << 26


def matvec_upcast(W: Tensor, g: Tensor, block_bytes: int = MATVEC_BLOCK_BYTES) -> Tensor:
    """``W @ g`` in ``g``'s (wider) dtype. A lower-precision ``W`` (bf16 weights) is
    upcast a block of columns at a time, never whole: a weight-sized fp32 copy of
    ``W_enc`` would be 2x the bf16 matrix."""
    if W.dtype == g.dtype:
        return W @ g
    cols = max(1, block_bytes // max(1, W.shape[0] * g.element_size()))
    out = torch.zeros(W.shape[0], dtype=g.dtype, device=W.device)
    for start in range(0, W.shape[1], cols):
        out += W[:, start : start + cols].to(g.dtype) @ g[start : start + cols]
    return out
