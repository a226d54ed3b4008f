"""Standard (ReLU) SAE."""

from __future__ import annotations

from torch import Tensor

from fastsae.saes.base import SAE
from fastsae.saes.config import StandardSAEConfig


class StandardSAE(SAE):
    """``relu(x @ W_enc + b_enc) @ W_dec + b_dec`` (SAELens ``StandardSAE``)."""

    config_class = StandardSAEConfig
    cfg: StandardSAEConfig

    def _init_parameters(self) -> None:
        super()._init_parameters()
        self.b_enc = self._param(self.cfg.d_sae)

    def _encode_dense(self, sae_in: Tensor) -> Tensor:
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        return self.hook_sae_acts_post(hidden_pre.relu())
