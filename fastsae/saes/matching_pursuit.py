"""The matching pursuit architecture (SAELens ``MatchingPursuitSAE``): a tied SAE whose
encoder is greedy. Per token, each iteration picks the decoder row with the largest
positive inner product with what is left of the (processed) input, adds that inner
product to the row's activation and subtracts its contribution from the residual; a
token stops when its residual norm falls below ``residual_threshold``, when an
iteration adds no new latent (``stop_on_duplicate_support``) or after
``max_iterations`` (``d_in`` when None).

There is no ``W_enc`` parameter: ``W_enc`` reads as ``W_dec.T``. The parameters are
``W_dec [d_sae, d_in]`` and ``b_dec [d_in]``, as in SAELens; ``b_dec`` is added back to
the reconstruction only when it was subtracted from the input
(``apply_b_dec_to_input``). The activation hooks (``hook_sae_acts_pre`` / ``_post``)
never fire, as in SAELens (there is no single pre-activation to show).

The training SAE's loss is the MSE alone; ``hidden_pre`` is zeros, and a logging step
adds ``max_l0``, ``min_l0``, ``residual_norm`` and
``residual_threshold_converged_portion`` to the step's metrics.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fastsae import ops
from fastsae.saes.base import SAE
from fastsae.saes.config import SAEConfig
from fastsae.saes.registry import register
from fastsae.saes.training_sae import (
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
    scale_decoder_rows_,
)
from fastsae.sparse_code import SparseCode

ARCHITECTURE = "matching_pursuit"


def matching_pursuit_encode(
    sae_in: Tensor,
    W_dec: Tensor,
    *,
    residual_threshold: float,
    max_iterations: int | None,
    stop_on_duplicate_support: bool,
) -> Tensor:
    """Matching pursuit codes of ``sae_in [..., d_in]`` over the rows of
    ``W_dec [d_sae, d_in]`` -> dense activations ``[..., d_sae]`` (dtype of ``sae_in``).

    All tokens advance together; a token that has stopped keeps its code while the others
    go on (its later picks are multiplied by 0). The loop ends when every token has
    stopped or after ``max_iterations`` (``d_in`` when None) iterations. A token stops
    when its residual norm is below ``residual_threshold`` (only when that is > 0) or,
    with ``stop_on_duplicate_support``, when an iteration adds no latent that was not
    active already. Differentiable in ``sae_in`` and ``W_dec`` through the picked
    coefficients and residuals; the choice of rows carries no gradient.
    """
    d_sae, d_in = W_dec.shape
    if sae_in.shape[-1] != d_in:
        raise ValueError(
            f"matching pursuit input must have last dimension d_in={d_in}, "
            f"got shape {tuple(sae_in.shape)}"
        )
    lead = sae_in.shape[:-1]
    residual = sae_in.reshape(-1, d_in)
    n_tokens = residual.shape[0]
    n_iterations = d_in if max_iterations is None else max_iterations
    use_threshold = residual_threshold > 0
    device = residual.device
    done = torch.zeros(n_tokens, dtype=torch.bool, device=device)
    # which latents each token has active so far (only needed for the duplicate stop)
    support = (
        torch.zeros(n_tokens, d_sae, dtype=torch.bool, device=device)
        if stop_on_duplicate_support
        else None
    )
    picked_ids: list[Tensor] = []
    picked_values: list[Tensor] = []
    for _ in range(n_iterations):
        with torch.no_grad():  # only the choice: no [tokens, d_sae] tensor kept for backward
            ids = (residual @ W_dec.T).relu().max(dim=-1, keepdim=True).indices
        rows = W_dec[ids.squeeze(-1)]  # [tokens, d_in]
        coeff = (residual * rows).sum(dim=-1, keepdim=True).relu()
        coeff = coeff * (~done).unsqueeze(-1).to(coeff.dtype)
        residual = residual - coeff * rows
        picked_ids.append(ids)
        picked_values.append(coeff)
        if support is None and not use_threshold:
            continue
        with torch.no_grad():
            if support is not None:
                was_active = support.gather(1, ids)
                now_active = was_active | (coeff != 0)
                done |= (now_active == was_active).squeeze(-1)
                support.scatter_(1, ids, now_active)
            if use_threshold:
                done |= residual.norm(dim=-1) < residual_threshold
            if bool(done.all()):
                break
    acts = torch.zeros(n_tokens, d_sae, dtype=residual.dtype, device=device)
    if picked_ids:
        values = torch.cat(picked_values, dim=1).to(acts.dtype)
        acts = acts.scatter_add(1, torch.cat(picked_ids, dim=1), values)
    return acts.reshape(*lead, d_sae)


def _check_matching_pursuit_fields(cfg: Any) -> None:
    threshold = cfg.residual_threshold
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or math.isnan(threshold)
        or threshold < 0
    ):
        raise ValueError(
            "residual_threshold must be a number >= 0 (0 turns the residual stop off), "
            f"got {threshold!r}"
        )
    max_iterations = cfg.max_iterations
    if max_iterations is not None and (
        isinstance(max_iterations, bool)
        or not isinstance(max_iterations, int)
        or max_iterations < 1
    ):
        raise ValueError(
            f"max_iterations must be a positive int or None (None: d_in), got {max_iterations!r}"
        )
    if not isinstance(cfg.stop_on_duplicate_support, bool):
        raise ValueError(
            f"stop_on_duplicate_support must be a bool, got {cfg.stop_on_duplicate_support!r}"
        )


# --------------------------------------------------------------------------- inference
@dataclass
class MatchingPursuitSAEConfig(SAEConfig):
    """Matching pursuit SAE (tied: ``W_enc`` is ``W_dec.T``).

    ``residual_threshold``: a token stops once its residual norm is below this (0
    turns the check off). ``max_iterations``: most latents picked per token (None:
    ``d_in``). ``stop_on_duplicate_support``: a token also stops when an iteration adds
    no new latent.
    """

    residual_threshold: float = 1e-2
    max_iterations: int | None = None
    stop_on_duplicate_support: bool = True

    _architecture: ClassVar[str | None] = ARCHITECTURE

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_matching_pursuit_fields(self)


class MatchingPursuitSAE(SAE[MatchingPursuitSAEConfig]):
    """Greedy matching pursuit encoder over the decoder rows (SAELens
    ``MatchingPursuitSAE``); ``decode`` is ``acts @ W_dec`` (``+ b_dec`` when
    ``apply_b_dec_to_input``)."""

    config_class = MatchingPursuitSAEConfig
    cfg: MatchingPursuitSAEConfig

    def _init_parameters(self) -> None:
        """SAELens's initialisation without an encoder: zero b_dec, kaiming-uniform W_dec."""
        self.b_dec = self._param(self.cfg.d_in)
        self.W_dec = self._param(self.cfg.d_sae, self.cfg.d_in, zeros=False)
        if self.device.type != "meta":
            nn.init.kaiming_uniform_(self.W_dec)

    @property
    def W_enc(self) -> Tensor:  # type: ignore[override]
        """The tied encoder ``W_dec.T [d_in, d_sae]`` (a view, not a parameter)."""
        return self.W_dec.T

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "W_enc":
            raise AttributeError(
                f"{type(self).__name__} has no W_enc parameter: its encoder is tied to the "
                "decoder (W_enc reads as W_dec.T); set W_dec instead"
            )
        super().__setattr__(name, value)

    def _mp_encode(self, sae_in: Tensor) -> Tensor:
        return matching_pursuit_encode(
            sae_in,
            self.W_dec,
            residual_threshold=self.cfg.residual_threshold,
            max_iterations=self.cfg.max_iterations,
            stop_on_duplicate_support=self.cfg.stop_on_duplicate_support,
        )

    def _encode_dense(self, sae_in: Tensor) -> Tensor:
        # no hook_sae_acts_pre / hook_sae_acts_post, as in SAELens
        return self._mp_encode(sae_in)

    def _dense_decoder(self, feature_acts: Tensor) -> Tensor:
        out = feature_acts @ self.W_dec
        if self.cfg.apply_b_dec_to_input:
            out = out + self.b_dec
        return out

    def _decode_code(self, code: SparseCode, stats: tuple[Tensor, ...] | None) -> Tensor:
        b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
        out = ops.sparse_decode(self._decoder_values(code), self.W_dec, b_dec)
        return self._finish_decode(out.to(self.dtype), stats)

    # ------------------------------------------------------------------ weight folding
    def fold_W_dec_norm(self) -> None:
        raise NotImplementedError(
            f"fold_W_dec_norm is not supported for {type(self).__name__}: the encoder is "
            "tied to W_dec, so rescaling decoder rows changes which latents are selected"
        )

    def fold_and_get_W_dec_norm(self) -> Tensor:
        raise NotImplementedError(
            f"fold_and_get_W_dec_norm is not supported for {type(self).__name__}: the "
            "encoder is tied to W_dec, so rescaling decoder rows changes which latents "
            "are selected"
        )

    def fold_activation_whitening(
        self, mean: Tensor, whitening_matrix: Tensor, unwhitening_matrix: Tensor
    ) -> None:
        raise NotImplementedError(
            f"fold_activation_whitening is not supported for {type(self).__name__}: the "
            "encoder is tied to the decoder, so a whitening cannot be folded into it"
        )

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """Fold a constant input scaling: with a tied encoder the decoder rows stay as they
        are, ``b_dec`` and ``residual_threshold`` move to the unscaled units (the
        reconstruction is in input units again; activations are divided by the factor)."""
        self.b_dec.data.div_(scaling_factor)
        self.cfg.residual_threshold /= scaling_factor
        self.cfg.normalize_activations = "none"


# --------------------------------------------------------------------------- training
@dataclass
class MatchingPursuitTrainingSAEConfig(TrainingSAEConfig, MatchingPursuitSAEConfig):
    """Training config of a matching pursuit SAE (SAELens fields).

    ``decoder_init_norm`` is always 1.0 (unit decoder rows): another value is replaced
    by 1.0 with a warning, as in SAELens. ``normalize_activations="covariance_whitening"``
    is refused: the whitening could not be folded into the tied encoder afterwards.
    """

    decoder_init_norm: float | None = 1.0

    _architecture: ClassVar[str | None] = ARCHITECTURE

    def __post_init__(self) -> None:
        if self.normalize_activations == "covariance_whitening":
            raise ValueError(
                "normalize_activations='covariance_whitening' is not supported for "
                "MatchingPursuitTrainingSAE: the whitening cannot be folded into its tied "
                "encoder after training"
            )
        if self.decoder_init_norm != 1.0:
            warnings.warn(
                f"decoder_init_norm must be 1.0 for MatchingPursuitTrainingSAE, got "
                f"{self.decoder_init_norm!r}; using 1.0",
                stacklevel=3,
            )
            self.decoder_init_norm = 1.0
        super().__post_init__()


class MatchingPursuitTrainingSAE(TrainingSAE[MatchingPursuitTrainingSAEConfig], MatchingPursuitSAE):
    """Matching pursuit SAE trained on the MSE alone (SAELens
    ``MatchingPursuitTrainingSAE``)."""

    config_class = MatchingPursuitTrainingSAEConfig
    cfg: MatchingPursuitTrainingSAEConfig

    def _init_parameters(self) -> None:
        # TrainingSAE's version would add a W_enc parameter; the tied SAE has none
        MatchingPursuitSAE._init_parameters(self)
        norm = self.cfg.decoder_init_norm
        if norm is not None and self.device.type != "meta":
            scale_decoder_rows_(self.W_dec.data, norm)

    def encode_with_hidden_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(feature_acts, zeros)``: matching pursuit has no single pre-activation, so
        ``hidden_pre`` is zeros, as in SAELens."""
        acts = self._mp_encode(self.process_sae_in(x))
        return acts, torch.zeros_like(acts)

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        output = super().training_forward_pass(step_input)
        if step_input.is_logging_step:
            with torch.no_grad():
                l0 = (output.feature_acts != 0).sum(dim=-1).float()
                residual_norm = (step_input.sae_in - output.sae_out).norm(dim=-1)
                converged = residual_norm < self.cfg.residual_threshold
                output.metrics["max_l0"] = l0.max()
                output.metrics["min_l0"] = l0.min()
                output.metrics["residual_norm"] = residual_norm.mean()
                output.metrics["residual_threshold_converged_portion"] = converged.float().mean()
        return output


register(
    ARCHITECTURE,
    MatchingPursuitSAE,
    MatchingPursuitSAEConfig,
    training_cls=MatchingPursuitTrainingSAE,
    training_cfg_cls=MatchingPursuitTrainingSAEConfig,
)
