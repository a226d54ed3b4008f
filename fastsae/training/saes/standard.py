"""Standard (ReLU) training SAE: L1 scaled by decoder norm, optional ghost grads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from fastsae.saes.config import StandardSAEConfig
from fastsae.saes.standard import StandardSAE
from fastsae.training.losses import ghost_grad_loss
from fastsae.training.saes.base import (
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
)


@dataclass
class StandardTrainingSAEConfig(TrainingSAEConfig, StandardSAEConfig):
    """Training config of a standard SAE (SAELens fields plus ``use_ghost_grads``).

    ``l1_coefficient``: weight of the sparsity penalty ``||acts * ||W_dec|| ||_p``.
    ``lp_norm``: p of that norm (1 = L1). ``l1_warm_up_steps``: linear warm-up of the
    coefficient from 0. ``use_ghost_grads``: add the ghost-grads loss for dead latents
    (SAELens < 6 behaviour; 6.x dropped it).
    """

    l1_coefficient: float = 1.0
    lp_norm: float = 1.0
    l1_warm_up_steps: int = 0
    use_ghost_grads: bool = False

    _architecture: ClassVar[str | None] = "standard"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lp_norm > 0:
            raise ValueError(f"lp_norm must be > 0, got {self.lp_norm!r}")


class StandardTrainingSAE(TrainingSAE, StandardSAE):
    """ReLU SAE with SAELens's training losses."""

    config_class = StandardTrainingSAEConfig
    cfg: StandardTrainingSAEConfig

    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {"l1": TrainCoefficientConfig(self.cfg.l1_coefficient, self.cfg.l1_warm_up_steps)}

    def encode_with_hidden_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        sae_in = self.process_sae_in(x)
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        return self.hook_sae_acts_post(hidden_pre.relu()), hidden_pre

    def calculate_aux_loss(
        self, step_input: TrainStepInput, feature_acts: Tensor, hidden_pre: Tensor, sae_out: Tensor
    ) -> dict[str, Tensor]:
        weighted = feature_acts * self.W_dec.norm(dim=1)
        sparsity = weighted.norm(p=self.cfg.lp_norm, dim=-1)
        losses = {"l1_loss": (step_input.coefficients["l1"] * sparsity).mean()}
        mask = step_input.dead_neuron_mask
        if self.cfg.use_ghost_grads and self.training and mask is not None and bool(mask.any()):
            losses["ghost_grad_loss"] = ghost_grad_loss(
                step_input.sae_in,
                sae_out,
                self.mse_loss_fn(sae_out, step_input.sae_in),
                hidden_pre,
                self.W_dec,
                mask,
            )
        return losses
