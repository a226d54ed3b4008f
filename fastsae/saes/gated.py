"""Gated SAE (Rajamanoharan et al. 2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastsae.saes.base import SAE
from fastsae.saes.config import GatedSAEConfig


class GatedSAE(SAE):
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
