"""Gated training SAE: L1 on the gate path plus its auxiliary reconstruction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fastsae.saes.config import GatedSAEConfig
from fastsae.saes.gated import GatedSAE
from fastsae.training.saes.base import (
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
)


@dataclass
class GatedTrainingSAEConfig(TrainingSAEConfig, GatedSAEConfig):
    """Training config of a gated SAE (``l1_coefficient``, ``l1_warm_up_steps``)."""

    l1_coefficient: float = 1.0
    l1_warm_up_steps: int = 0

    _architecture: ClassVar[str | None] = "gated"


class GatedTrainingSAE(TrainingSAE, GatedSAE):
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
