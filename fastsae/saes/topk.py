"""The TopK and AbsTopK architectures, whose forward is sparse end to end: ``TopKSAE``,
``AbsTopKSAE`` and their configs, the TopK and AbsTopK training SAEs (a sparse step with
AuxK) and TopK's latent-sharded step (an exact top-k across the ranks)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fastsae import ops, torch_ops
from fastsae.saes.base import SAE
from fastsae.saes.config import SAEConfig
from fastsae.saes.registry import register
from fastsae.saes.step_weights import StepWeights, step_weights
from fastsae.saes.training_sae import (
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from fastsae.sparse_autograd import TRITON_BACKEND, TopKEncodeFunction
from fastsae.sparse_code import SparseCode
from fastsae.torch_ops import TORCH_BACKEND, encoder_preacts
from fastsae.training.losses import auxk_loss, topk_rows, total_loss
from fastsae.training.parallel.latent.base import (
    ShardedTrainingSAE,
    all_reduce,
    sum_over_shards,
)
from fastsae.training.parallel.latent.selection import global_topk, merge_candidates


@dataclass
class TopKSAEConfig(SAEConfig):
    """TopK SAE: keep the k largest pre-activations per token (ReLU applied).

    ``rescale_acts_by_decoder_norm``: select on ``h * ||W_dec||`` and divide the
    activations by ``||W_dec||`` before decoding (SAEs trained that way).
    """

    k: int = 100
    rescale_acts_by_decoder_norm: bool = False

    _architecture: ClassVar[str | None] = "topk"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_k()

    def _check_k(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be an int in [1, d_sae={self.d_sae}], got {self.k!r}")


@dataclass
class AbsTopKSAEConfig(TopKSAEConfig):
    """AbsTopK SAE: keep the k largest-magnitude pre-activations per token, sign kept."""

    _architecture: ClassVar[str | None] = "abstopk"


def abs_topk_rows(h: Tensor, k: int) -> Tensor:
    """``h`` with each row's k largest-magnitude entries kept, sign and all, the rest 0:
    AbsTopK's AuxK selection (SAELens ``calculate_abstopk_aux_acts``)."""
    indices = h.abs().topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(h).scatter(-1, indices, h.gather(-1, indices))


class TopK(nn.Module):
    """SAELens's TopK activation (``activation_fn`` of the TopK SAEs): each row's k
    largest entries with ReLU applied, the rest zero; a ``torch.sparse`` COO tensor of
    the input's shape with ``use_sparse_activations``. The SAEs' own forward does not
    call it (it takes the fused sparse path); it is there for code that does."""

    def __init__(self, k: int, use_sparse_activations: bool = False):
        super().__init__()
        self.k = k
        self.use_sparse_activations = use_sparse_activations

    def forward(self, x: Tensor) -> Tensor:
        values, indices = torch.topk(x, k=self.k, dim=-1, sorted=False)
        values = values.relu()
        if not self.use_sparse_activations:
            return torch.zeros_like(x).scatter(-1, indices, values)
        rows = torch.arange(x.shape[:-1].numel(), device=x.device).repeat_interleave(self.k)
        row_coords = torch.unravel_index(rows, x.shape[:-1]) if x.dim() > 1 else ()
        coords = torch.stack([*row_coords, indices.flatten()])
        return torch.sparse_coo_tensor(coords, values.flatten(), x.shape)


class AbsTopK(nn.Module):
    """SAELens's AbsTopK activation: each row's k largest-magnitude entries, sign kept,
    the rest zero."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        return abs_topk_rows(x, self.k)


class TopKSAE(SAE[TopKSAEConfig]):
    """Keep the k largest pre-activations per token, ReLU applied (SAELens ``TopKSAE``).

    With ``rescale_acts_by_decoder_norm`` the selection is on ``h * ||W_dec||`` and the
    activations are divided by ``||W_dec||`` again before decoding.
    """

    config_class = TopKSAEConfig
    cfg: TopKSAEConfig
    _abs_select = False
    _fixed_k = True

    def get_activation_fn(self) -> Callable[[Tensor], Tensor]:
        return TopK(self.cfg.k)

    def _init_parameters(self) -> None:
        super()._init_parameters()
        self.b_enc = self._param(self.cfg.d_sae)

    def _dec_norm(self) -> Tensor | None:
        return self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None

    def _encode_dense(self, sae_in: Tensor) -> Tensor:
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        dec_norm = self._dec_norm()
        if dec_norm is not None:
            hidden_pre = hidden_pre * dec_norm
        code = torch_ops.topk_select(hidden_pre, self.cfg.k, abs_select=self._abs_select)
        return self.hook_sae_acts_post(code.to_dense(self.cfg.d_sae))

    def _encode_code(self, sae_in: Tensor) -> SparseCode:
        return ops.topk_encode(
            sae_in,
            self.W_enc,
            self.b_enc,
            self.cfg.k,
            dec_norm=self._dec_norm(),
            abs_select=self._abs_select,
        )

    def _decoder_values(self, code: SparseCode) -> SparseCode:
        if not self.cfg.rescale_acts_by_decoder_norm:
            return code
        inv_norm = 1 / self.W_dec.norm(dim=-1)
        return SparseCode(code.values * inv_norm[code.indices], code.indices)

    def _dense_decoder(self, feature_acts: Tensor) -> Tensor:
        if self.cfg.rescale_acts_by_decoder_norm:
            feature_acts = feature_acts * (1 / self.W_dec.norm(dim=-1))
        return feature_acts @ self.W_dec + self.b_dec

    def fold_W_dec_norm(self) -> None:
        if not self.cfg.rescale_acts_by_decoder_norm:
            raise NotImplementedError(
                "Folding W_dec norms is not safe for TopK SAEs with "
                "rescale_acts_by_decoder_norm=False: it would change which latents are selected"
            )
        super().fold_W_dec_norm()

    def fold_activation_whitening(
        self, mean: Tensor, whitening_matrix: Tensor, unwhitening_matrix: Tensor
    ) -> None:
        """As :meth:`SAE.fold_activation_whitening`; with ``rescale_acts_by_decoder_norm``
        the decoder norms are folded first (unwhitening changes them, which would
        change the selection) and the rescaling is switched off."""
        if self.cfg.rescale_acts_by_decoder_norm:
            self.fold_W_dec_norm()
            self.cfg.rescale_acts_by_decoder_norm = False
        super().fold_activation_whitening(mean, whitening_matrix, unwhitening_matrix)


class AbsTopKSAE(TopKSAE):
    """Keep the k largest-magnitude pre-activations per token with their sign (SAELens ``AbsTopKSAE``)."""

    config_class = AbsTopKSAEConfig
    cfg: AbsTopKSAEConfig
    _abs_select = True

    def get_activation_fn(self) -> Callable[[Tensor], Tensor]:
        return AbsTopK(self.cfg.k)


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
    # keyword-only: SAELens's training config has it after aux_loss_coefficient, while
    # the inference fields put it after k (a redeclared field keeps its place)
    rescale_acts_by_decoder_norm: bool = field(default=True, kw_only=True)

    _architecture: ClassVar[str | None] = "topk"


class TopKTrainingSAE(TrainingSAE[TopKTrainingSAEConfig], TopKSAE):
    """TopK SAE with SAELens's losses (MSE + AuxK) on a sparse step."""

    config_class = TopKTrainingSAEConfig
    cfg: TopKTrainingSAEConfig

    def get_activation_fn(self) -> Callable[[Tensor], Tensor]:
        return TopK(self.cfg.k, use_sparse_activations=self.cfg.use_sparse_activations)

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
            sae_in,
            weights.W_enc,
            self.b_enc,
            self.cfg.k,
            dec_norm=weights.dec_norm,
            abs_select=self._abs_select,
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
            # gradient (that would be a full dense matmul for BatchTopK's dense encoder)
            with torch.no_grad():
                sae_in, stats = self._process_sae_in(x)
            code = self._train_code(sae_in, weights)
            values = _InputBiasGrad.apply(
                code.values, code.indices, self.b_dec, self.W_enc, dec_norm, self._abs_select
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
        return auxk_loss(
            x, sae_out, h_dead, W_dec_dead, num_dead, self.cfg.aux_loss_coefficient,
            dec_norm=dec_norm,
            select=abs_topk_rows if self._abs_select else topk_rows,
        )  # fmt: skip

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
    and decoder-norm scaling give it; ``abs_select`` (AbsTopK, no ReLU): ``d values *
    dec_norm[n]``)."""

    @staticmethod
    def forward(ctx, values, indices, b_dec, W_enc, dec_norm, abs_select=False):  # type: ignore[override]
        ctx.save_for_backward(values, indices, W_enc, dec_norm)
        ctx.abs_select = abs_select
        return values.clone()

    @staticmethod
    def backward(ctx, d_values):  # type: ignore[override]
        values, indices, W_enc, dec_norm = ctx.saved_tensors
        d_pre = d_values if ctx.abs_select else d_values * (values > 0)
        if dec_norm is not None:
            d_pre = d_pre * dec_norm[indices]
        dtype = torch.promote_types(d_pre.dtype, torch.float32)
        g = torch.zeros(W_enc.shape[1], dtype=dtype, device=W_enc.device)
        g.index_add_(0, indices.reshape(-1).long(), d_pre.reshape(-1).to(dtype))
        d_b_dec = -matvec_upcast(W_enc, g)
        return d_values, None, d_b_dec.to(W_enc.dtype), None, None, None


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


# --------------------------------------------------------------------------- AbsTopK training
@dataclass
class AbsTopKTrainingSAEConfig(TopKTrainingSAEConfig):
    """Training config of an AbsTopK SAE (SAELens 6.x ``AbsTopKTrainingSAEConfig``): the
    TopK training fields and defaults (``k`` 100, ``aux_loss_coefficient`` 1.0,
    ``rescale_acts_by_decoder_norm`` True, ``decoder_init_norm`` 0.1); the k latents of
    largest pre-activation magnitude are kept with their sign, and AuxK picks its dead
    latents by magnitude too. ``use_sparse_activations``: accepted, changes nothing (as
    in SAELens, whose AbsTopK ignores it). Saved as ``abstopk`` (``AbsTopKSAE``).
    """

    _architecture: ClassVar[str | None] = "abstopk"


class AbsTopKTrainingSAE(TopKTrainingSAE):
    """AbsTopK SAE with SAELens's losses on TopK's sparse step (SAELens
    ``AbsTopKTrainingSAE``): the k largest-magnitude pre-activations (times the decoder
    norms with ``rescale_acts_by_decoder_norm``) are kept with their sign, no ReLU, so a
    latent fires in either direction; MSE + AuxK, whose ``min(d_in // 2, n_dead)`` dead
    latents are the largest in ``|hidden_pre|`` and reconstruct with their signed values.
    """

    config_class = AbsTopKTrainingSAEConfig
    cfg: AbsTopKTrainingSAEConfig
    _abs_select = True

    def get_activation_fn(self) -> Callable[[Tensor], Tensor]:
        return AbsTopK(self.cfg.k)

    def _activation(self, hidden_pre: Tensor) -> Tensor:
        indices = torch.topk(hidden_pre.abs(), self.cfg.k, dim=-1, sorted=False).indices
        return torch.zeros_like(hidden_pre).scatter(-1, indices, hidden_pre.gather(-1, indices))


# --------------------------------------------------------------------------- the module
class ShardedTopKTrainingSAE(ShardedTrainingSAE):
    """This rank's shard of a :class:`TopKTrainingSAE` (see
    :class:`~fastsae.training.parallel.latent.base.ShardedTrainingSAE`);
    ``apply_b_dec_to_input`` and ``rescale_acts_by_decoder_norm`` either way.

    Latent-sharded TopK training on ``torch.distributed``: ``W_enc``, ``b_enc``, ``W_dec``
    (and so their Adam state) split over ranks along ``d_sae``; ``b_dec`` replicated.

    Rank ``r`` of ``W`` ranks holds latents ``[r * d_sae / W, (r + 1) * d_sae / W)``. One step:

    1. every rank encodes its shard: ``h_r = ((x - b_dec) @ W_enc_r + b_enc_r) * |W_dec_r|``
       (the decoder-norm factor when ``rescale_acts_by_decoder_norm``, as TopK);
    2. local top-k candidates (raw pre-activations and **global** latent ids) are
       all-gathered, ``[W, batch, k]``, and every rank takes the same global top-k of the
       ``W * k`` candidates. A latent in the global top-k has fewer than k larger values
       anywhere, so it is in its own shard's local top-k: the set equals the single-device
       ``torch.topk`` set. Ties: when the k-th and (k+1)-th largest pre-activations of a
       row are exactly equal, which of them is chosen is unspecified (as it is for
       ``torch.topk`` on one device); with distinct values the sets are identical;
    3. each rank keeps the selected entries of its shard (a padded ``[batch, k]`` code,
       ``value 0`` padding), decodes them with ``W_dec_r`` (sparse), and the partial
       reconstructions are summed with ``all_reduce``; ``+ b_dec``; MSE as TopK's;
    4. AuxK: the dead mask is sharded the same way; the top ``min(d_in // 2, n_dead)`` dead
       latents are chosen globally by the same candidate gather and their partial
       reconstructions all-reduced. ``n_dead`` is the global count.

    Backward and optimizer: see :mod:`fastsae.training.parallel.latent.base` (identity
    backward of the reconstruction sum; ``b_dec``'s encoder gradient summed over ranks;
    one global clipping factor).

    Communication per step (fp32): candidates ``2 * W * batch * k`` values+ids gathered,
    the ``[batch, d_in]`` reconstruction all-reduced (twice with AuxK) and ``d_in`` for
    ``b_dec``'s encoder gradient; nothing of size ``d_sae``.

    Saving: :meth:`ShardedTopKTrainingSAE.gather_full` gathers the shards into an
    ordinary :class:`TopKTrainingSAE` (on every rank, or one rank's host memory), whose ``save_model`` /
    ``save_inference_model`` write the normal single-file SAELens directory; a saved
    directory loads into a sharded run with ``from_full(TopKTrainingSAE.load_from_disk(p),
    rank, world)``.
    """

    full_class = TopKTrainingSAE

    @classmethod
    def step_payloads(
        cls, batch: int, d_in: int, *, k: float, n_dead: int, dtype_bytes: int, pre_act_loss: bool
    ) -> dict[str, int]:
        """k candidates per token gathered (values and int32 ids), the reconstruction
        all-reduced, and with dead latents the AuxK candidates and reconstruction."""
        n_candidates = cls.n_candidates(batch, k)
        out = {
            "topk candidates (values)": n_candidates * dtype_bytes,
            "topk candidates (ids)": n_candidates * 4,
            "reconstruction all_reduce": batch * d_in * dtype_bytes,
            "dead latent count all_reduce": 8,
        }
        k_aux = min(d_in // 2, n_dead)
        if n_dead > 0:
            out["AuxK candidates (values)"] = batch * k_aux * dtype_bytes
            out["AuxK candidates (ids)"] = batch * k_aux * 4
            out["AuxK reconstruction all_reduce"] = batch * d_in * dtype_bytes
        return out

    @staticmethod
    def n_candidates(batch: int, k: float) -> float:
        """Candidates one rank sends per step: k per token."""
        return batch * k

    cfg: TopKTrainingSAEConfig

    def __init__(self, cfg: TopKTrainingSAEConfig, rank: int, world_size: int, group=None) -> None:
        super().__init__(cfg, rank, world_size, group)
        self.last_global_indices: Tensor | None = None

    # ------------------------------------------------------------------ the step
    def _select(self, sae_in: Tensor, dn: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's candidates and which the global selection keeps (no grad):
        ``(pos [B, K'] local columns, raw [B, K'] pre-activations (times the decoder
        norm), selected [B, K'] bool)``; sets ``last_global_indices``."""
        k, g = self.cfg.k, self.group
        k_local = min(k, self.d_sae_local)
        w_enc, b_enc = self.W_enc.detach(), self.b_enc.detach()
        if ops.topk_encode_is_fused(sae_in, w_enc, b_enc, k_local):
            # the fused kernel: local candidates without a [batch, d_sae_local] tensor.
            # Its values are ReLU'd: a row with fewer than k positive pre-activations
            # may pick other zero-valued latents than torch.topk would, which changes
            # neither the output, the gradients nor the firing counts (all value 0)
            local = ops.topk_encode(sae_in, w_enc, b_enc, k_local, dec_norm=dn)
            pos, raw = local.indices.long(), local.values
            selected, global_ids = merge_candidates(
                raw, pos, k, self.lo, g, "topk candidates", self.cfg.d_sae
            )
        else:
            h = encoder_preacts(sae_in, w_enc, b_enc)
            if dn is not None:
                h = h * dn
            pos, selected, global_ids = global_topk(
                h, k, self.lo, g, "topk candidates", self.cfg.d_sae
            )
            raw = h.gather(-1, pos)
        self.last_global_indices = global_ids
        return pos, raw, selected

    def _selected_code(
        self,
        sae_in: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        k: int,
        dn: Tensor | None,
        abs_select: bool,
    ) -> SparseCode:
        """``TopKEncodeFunction``'s selection (no grad; every rank must call it): this
        rank's candidates (``_select``), value 0 where the global top-k does not keep
        them. ``W_enc``, ``b_enc`` and ``k`` are this module's, which ``_select`` reads
        itself; TopK has no ``abs_select``."""
        pos, raw, selected = self._select(sae_in, dn)
        return SparseCode(torch.where(selected, raw.relu(), torch.zeros_like(raw)), pos)

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """TopK's step (MSE + AuxK) on the shards; every rank must call it with the same
        ``sae_in`` and dead mask. ``output.code`` holds this rank's latents (shard-local
        ids, value-0 padding) and ``output.fired()`` is ``[d_sae_local]``; the global
        selection is ``self.last_global_indices [batch, k]``."""
        x = step_input.sae_in.to(self.W_enc.dtype)
        g = self.group
        sae_in = self._encoder_input(x)
        dead_local = self._local_dead(step_input.dead_neuron_mask)
        # one gradient buffer per weight shard (step_weights.py), AuxK's dead slices too
        weights = step_weights(
            self.W_enc,
            self.W_dec,
            dead_local.nonzero().squeeze(1) if dead_local is not None else None,
            self.cfg.rescale_acts_by_decoder_norm,
        )
        dec_norm = weights.dec_norm
        # TopK's encode Function with the global selection; its sparse backward runs
        # the Triton kernels where impl="auto" would (CUDA), else torch's primitives
        backend = TRITON_BACKEND if ops.auto_uses_triton(sae_in, self.W_enc) else TORCH_BACKEND
        values, pos = TopKEncodeFunction.apply(
            sae_in, weights.W_enc, self.b_enc, dec_norm, self.cfg.k, False,
            self._selected_code, backend,
        )  # fmt: skip
        code = SparseCode(values, pos)
        dec_values = (
            values
            if dec_norm is None
            else values * (1 / dec_norm).index_select(0, pos.reshape(-1)).view(pos.shape)
        )
        partial = ops.sparse_decode(SparseCode(dec_values, pos), weights.W_dec)
        sae_out = sum_over_shards(partial, g, "reconstruction all_reduce") + self.b_dec
        losses = {"mse_loss": (sae_out - x).pow(2).sum(dim=-1).mean()}
        losses["auxiliary_reconstruction_loss"] = self._auxk_loss(x, sae_in, sae_out, weights)
        return TrainStepOutput(
            sae_in=x,
            sae_out=sae_out,
            loss=total_loss(losses),
            losses=losses,
            code=code,
            d_sae=self.d_sae_local,
        )

    def _auxk_loss(
        self, x: Tensor, sae_in: Tensor, sae_out: Tensor, weights: StepWeights
    ) -> Tensor:
        """TopK's AuxK with the dead latents chosen globally (collectives on every rank).
        ``weights``: the step's weights with this shard's dead columns/rows (``dead`` is
        None when the step has no dead mask, empty when this shard has no dead latent)."""
        if weights.dead is None:
            return sae_out.new_tensor(0.0)
        g = self.group
        dead = weights.dead
        counts = torch.tensor([dead.numel()], dtype=torch.int64, device=x.device)
        num_dead = int(all_reduce(counts, g, "dead latent count all_reduce").item())
        if num_dead == 0:
            return sae_out.new_tensor(0.0)
        W_enc_dead, W_dec_dead = weights.W_enc_dead, weights.W_dec_dead
        dec_norm = W_dec_dead.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None
        h_dead = sae_in @ W_enc_dead + self.b_enc.index_select(0, dead)
        if dec_norm is not None:
            h_dead = h_dead * dec_norm

        def select_globally(h: Tensor, k_aux: int) -> Tensor:
            # each rank keeps its own candidates that are in the global top k_aux (the
            # returned global ids, ``lo + column of the dead subset``, are unused here)
            with torch.no_grad():
                pos, selected, _ = global_topk(
                    h.detach(), k_aux, self.lo, g, "AuxK candidates", self.cfg.d_sae
                )
            return torch.zeros_like(h).scatter(-1, pos, h.gather(-1, pos) * selected)

        return auxk_loss(
            x, sae_out, h_dead, W_dec_dead, num_dead, self.cfg.aux_loss_coefficient,
            dec_norm=dec_norm,
            select=select_globally,
            sum_partial=lambda r: sum_over_shards(r, g, "AuxK reconstruction all_reduce"),
        )  # fmt: skip


register(
    "topk",
    TopKSAE,
    TopKSAEConfig,
    training_cls=TopKTrainingSAE,
    training_cfg_cls=TopKTrainingSAEConfig,
    sharded=ShardedTopKTrainingSAE,
)
register(
    "abstopk",
    AbsTopKSAE,
    AbsTopKSAEConfig,
    training_cls=AbsTopKTrainingSAE,
    training_cfg_cls=AbsTopKTrainingSAEConfig,
)
