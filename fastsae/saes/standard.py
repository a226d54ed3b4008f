"""The standard (ReLU) architecture: ``StandardSAE`` and its config, the training SAE
(L1 / Lp penalty scaled by decoder norms, optional ghost grads) and its latent-sharded
step."""

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
from fastsae.training.losses import ghost_grad_loss
from fastsae.training.parallel.latent.dense import DenseShardedTrainingSAE


@dataclass
class StandardSAEConfig(SAEConfig):
    """ReLU SAE: ``relu(x @ W_enc + b_enc)``."""

    _architecture: ClassVar[str | None] = "standard"


class StandardSAE(SAE[StandardSAEConfig]):
    """``relu(x @ W_enc + b_enc) @ W_dec + b_dec`` (SAELens ``StandardSAE``)."""

    config_class = StandardSAEConfig
    cfg: StandardSAEConfig

    def _init_parameters(self) -> None:
        super()._init_parameters()
        self.b_enc = self._param(self.cfg.d_sae)

    def _encode_dense(self, sae_in: Tensor) -> Tensor:
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        return self.hook_sae_acts_post(hidden_pre.relu())


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


class StandardTrainingSAE(TrainingSAE[StandardTrainingSAEConfig], StandardSAE):
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


class ShardedStandardTrainingSAE(DenseShardedTrainingSAE):
    """This rank's shard of a :class:`StandardTrainingSAE` (ReLU, L1 scaled by the
    decoder norm, any ``lp_norm``). Ghost grads are not supported."""

    full_class = StandardTrainingSAE

    @classmethod
    def step_payloads(
        cls, batch: int, d_in: int, *, k: float, n_dead: int, dtype_bytes: int, pre_act_loss: bool
    ) -> dict[str, int]:
        """The reconstruction and the per-token penalty sums all-reduced."""
        out = {
            "reconstruction all_reduce": batch * d_in * dtype_bytes,
            "penalty all_reduce": batch * dtype_bytes,
        }
        return out

    cfg: StandardTrainingSAEConfig

    def __init__(
        self, cfg: StandardTrainingSAEConfig, rank: int, world_size: int, group=None
    ) -> None:
        if cfg.use_ghost_grads:
            raise NotImplementedError(
                "latent sharding does not support use_ghost_grads (set use_ghost_grads=False)"
            )
        super().__init__(cfg, rank, world_size, group)

    def _activate(self, hidden_pre: Tensor) -> Tensor:
        return hidden_pre.relu()

    def _sparsity_losses(
        self, step_input: TrainStepInput, feature_acts: Tensor, hidden_pre: Tensor
    ) -> dict[str, Tensor]:
        weighted = (feature_acts * self.W_dec.norm(dim=1)).abs()
        p = self.cfg.lp_norm
        if p == 1:
            sparsity = self._sum(weighted.sum(dim=-1), "L1 penalty all_reduce")
        else:
            total = self._sum(weighted.pow(p).sum(dim=-1), "Lp penalty all_reduce")
            # ||.||_p = total^(1/p); rows of zeros get the zero subgradient torch.norm gives
            nonzero = total > 0
            sparsity = torch.where(nonzero, total, torch.ones_like(total)).pow(1 / p) * nonzero
        return {"l1_loss": (step_input.coefficients["l1"] * sparsity).mean()}


register(
    "standard",
    StandardSAE,
    StandardSAEConfig,
    training_cls=StandardTrainingSAE,
    training_cfg_cls=StandardTrainingSAEConfig,
    sharded=ShardedStandardTrainingSAE,
)
