"""A toy architecture defined the way a user (or a new built-in) adds one: one module
with its inference config and class, its training config and class, its latent-sharded
class, and one ``register`` call. The SAE is ``relu(h - shift)`` with an L1 penalty
scaled by decoder norms (``shift`` a config field, so saving and loading must carry it).

A user's module would end with the ``register`` call at module level; here it sits in
:func:`register_toy` so that the tests can register the toy for their own duration and
leave the registry of the other tests untouched (registering the same classes again is a
no-op, which spawned ranks rely on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

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
from fastsae.training.parallel.latent.dense import DenseShardedTrainingSAE

ARCHITECTURE = "toy_shifted_relu"


@dataclass
class ToySAEConfig(SAEConfig):
    shift: float = 0.0

    _architecture: ClassVar[str | None] = ARCHITECTURE


class ToySAE(SAE):
    config_class = ToySAEConfig
    cfg: ToySAEConfig

    def _init_parameters(self) -> None:
        super()._init_parameters()
        self.b_enc = self._param(self.cfg.d_sae)

    def _encode_dense(self, sae_in: Tensor) -> Tensor:
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        return self.hook_sae_acts_post((hidden_pre - self.cfg.shift).relu())


@dataclass
class ToyTrainingSAEConfig(TrainingSAEConfig, ToySAEConfig):
    l1_coefficient: float = 1.0

    _architecture: ClassVar[str | None] = ARCHITECTURE


class ToyTrainingSAE(TrainingSAE, ToySAE):
    config_class = ToyTrainingSAEConfig
    cfg: ToyTrainingSAEConfig

    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {"l1": self.cfg.l1_coefficient}

    def encode_with_hidden_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        sae_in = self.process_sae_in(x)
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        return self.hook_sae_acts_post((hidden_pre - self.cfg.shift).relu()), hidden_pre

    def calculate_aux_loss(
        self, step_input: TrainStepInput, feature_acts: Tensor, hidden_pre: Tensor, sae_out: Tensor
    ) -> dict[str, Tensor]:
        penalty = (feature_acts * self.W_dec.norm(dim=1)).sum(dim=-1)
        return {"l1_loss": (step_input.coefficients["l1"] * penalty).mean()}


class ShardedToyTrainingSAE(DenseShardedTrainingSAE):
    full_class = ToyTrainingSAE
    cfg: ToyTrainingSAEConfig

    @classmethod
    def step_payloads(
        cls, batch: int, d_in: int, *, k: float, n_dead: int, dtype_bytes: int, pre_act_loss: bool
    ) -> dict[str, int]:
        return {
            "reconstruction all_reduce": batch * d_in * dtype_bytes,
            "penalty all_reduce": batch * dtype_bytes,
        }

    def _activate(self, hidden_pre: Tensor) -> Tensor:
        return (hidden_pre - self.cfg.shift).relu()

    def _sparsity_losses(
        self, step_input: TrainStepInput, feature_acts: Tensor, hidden_pre: Tensor
    ) -> dict[str, Tensor]:
        partial = (feature_acts * self.W_dec.norm(dim=1)).sum(dim=-1)
        penalty = self._sum(partial, "L1 penalty all_reduce")
        return {"l1_loss": (step_input.coefficients["l1"] * penalty).mean()}


def register_toy() -> None:
    register(
        ARCHITECTURE,
        ToySAE,
        ToySAEConfig,
        training_cls=ToyTrainingSAE,
        training_cfg_cls=ToyTrainingSAEConfig,
        sharded=ShardedToyTrainingSAE,
    )
