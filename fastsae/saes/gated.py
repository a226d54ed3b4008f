"""The gated architecture (Rajamanoharan et al. 2024): ``GatedSAE`` and its config, and
the training SAE with its gate-path auxiliary loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fastsae.saes.base import SAE
from fastsae.saes.config import SAEConfig
from fastsae.saes.registry import register
from fastsae.saes.training_sae import (
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
)


@dataclass
class GatedSAEConfig(SAEConfig):
    """Gated SAE (Rajamanoharan et al. 2024): gate path ``b_gate``, magnitude path ``r_mag``, ``b_mag``."""

    _architecture: ClassVar[str | None] = "gated"


class GatedSAE(SAE[GatedSAEConfig]):
    """Gate ``(x @ W_enc + b_gate) > 0`` times magnitude ``relu(x @ (W_enc * exp(r_mag)) + b_mag)``.

    Parameters as SAELens ``GatedSAE``: ``W_enc``, ``b_gate``, ``r_mag``, ``b_mag``,
    ``W_dec``, ``b_dec``; there is no ``b_enc``.
    """

    config_class = GatedSAEConfig
    cfg: GatedSAEConfig

    def _init_parameters(self) -> None:
        super()._init_parameters()
        self.b_gate = self._param(self.cfg.d_sae)
        self.r_mag = self._param(self.cfg.d_sae)
        self.b_mag = self._param(self.cfg.d_sae)
        self.b_enc = None  # as in SAELens: gated SAEs have no b_enc

    def _encode_dense(self, sae_in: Tensor) -> Tensor:
        active = (sae_in @ self.W_enc + self.b_gate > 0).to(self.dtype)
        magnitude_pre = self.hook_sae_acts_pre(
            sae_in @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        )
        return self.hook_sae_acts_post(active * magnitude_pre.relu())

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Fold decoder norms into W_enc, b_gate and b_mag (r_mag needs no change)."""
        norms = self.fold_and_get_W_dec_norm()
        self.b_gate.data.mul_(norms)
        self.b_mag.data.mul_(norms)

    @torch.no_grad()
    def fold_activation_whitening(
        self, mean: Tensor, whitening_matrix: Tensor, unwhitening_matrix: Tensor
    ) -> None:
        """As :meth:`SAE.fold_activation_whitening`, shifting ``b_gate`` and ``b_mag`` too."""
        super().fold_activation_whitening(mean, whitening_matrix, unwhitening_matrix)
        if not self.cfg.apply_b_dec_to_input:
            # the magnitude path uses W_enc * exp(r_mag), so its shift is scaled by exp(r_mag)
            shift = mean.to(self.W_enc) @ self.W_enc
            self.b_gate.data.sub_(shift)
            self.b_mag.data.sub_(shift * self.r_mag.exp())


@dataclass
class GatedTrainingSAEConfig(TrainingSAEConfig, GatedSAEConfig):
    """Training config of a gated SAE (``l1_coefficient``, ``l1_warm_up_steps``)."""

    l1_coefficient: float = 1.0
    l1_warm_up_steps: int = 0

    _architecture: ClassVar[str | None] = "gated"


class GatedTrainingSAE(TrainingSAE[GatedTrainingSAEConfig], GatedSAE):
    """Gated SAE with SAELens's losses: L1 of ``relu(gate) * ||W_dec||`` and the
    reconstruction from the gate path alone."""

    config_class = GatedTrainingSAEConfig
    cfg: GatedTrainingSAEConfig

    def __init__(self, cfg: GatedTrainingSAEConfig, use_error_term: bool = False):
        if use_error_term:
            raise ValueError("GatedTrainingSAE does not support use_error_term=True")
        super().__init__(cfg, use_error_term)

    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {"l1": TrainCoefficientConfig(self.cfg.l1_coefficient, self.cfg.l1_warm_up_steps)}

    def encode_with_hidden_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        sae_in = self.process_sae_in(x)
        active = (sae_in @ self.W_enc + self.b_gate > 0).to(self.dtype)
        magnitude_pre = self.hook_sae_acts_pre(
            sae_in @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        )
        return self.hook_sae_acts_post(active * magnitude_pre.relu()), magnitude_pre

    def calculate_aux_loss(
        self, step_input: TrainStepInput, feature_acts: Tensor, hidden_pre: Tensor, sae_out: Tensor
    ) -> dict[str, Tensor]:
        centered = step_input.sae_in - self.b_dec * self.cfg.apply_b_dec_to_input
        gate = torch.relu(centered @ self.W_enc + self.b_gate)
        l1 = step_input.coefficients["l1"] * (gate * self.W_dec.norm(dim=1)).sum(dim=-1).mean()
        via_gate = gate @ self.W_dec + self.b_dec
        aux = (via_gate - step_input.sae_in).pow(2).sum(dim=-1).mean()
        return {"l1_loss": l1, "auxiliary_reconstruction_loss": aux}


register(
    "gated",
    GatedSAE,
    GatedSAEConfig,
    training_cls=GatedTrainingSAE,
    training_cfg_cls=GatedTrainingSAEConfig,
)
