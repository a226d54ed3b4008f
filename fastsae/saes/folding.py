"""Weight folding for :class:`~fastsae.saes.base.SAE`: decoder norms, a constant input
scaling or an activation whitening folded into the parameters in place, so the SAE
gives the same outputs from simpler weights or raw inputs. Architectures with extra
parameters (gated biases, thresholds) extend these methods and call ``super()``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastsae.saes.config import SAEConfig


class FoldingMixin:
    """``fold_W_dec_norm``, ``fold_activation_norm_scaling_factor``, ``fold_activation_whitening``."""

    cfg: SAEConfig
    W_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter

    @torch.no_grad()
    def get_W_dec_norm(self) -> Tensor:
        return self.W_dec.norm(dim=-1).clamp(min=1e-8)

    @torch.no_grad()
    def fold_and_get_W_dec_norm(self) -> Tensor:
        """Scale decoder rows to unit norm and fold the norms into the encoder (in place)."""
        norms = self.get_W_dec_norm()
        self.W_dec.data.div_(norms.unsqueeze(1))
        self.W_enc.data.mul_(norms.unsqueeze(0))
        b_enc = getattr(self, "b_enc", None)
        if isinstance(b_enc, nn.Parameter):
            b_enc.data.mul_(norms)
        return norms

    def fold_W_dec_norm(self) -> None:
        """Fold decoder norms into the encoder: same outputs, unit-norm decoder rows."""
        self.fold_and_get_W_dec_norm()

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """Fold a constant input scaling into the weights; sets normalize_activations='none'."""
        self.W_enc.data.mul_(scaling_factor)
        self.W_dec.data.div_(scaling_factor)
        self.b_dec.data.div_(scaling_factor)
        self.cfg.normalize_activations = "none"

    @torch.no_grad()
    def fold_activation_whitening(
        self, mean: Tensor, whitening_matrix: Tensor, unwhitening_matrix: Tensor
    ) -> None:
        """Fold ``z = (x - mean) @ M`` (and ``x = z @ M^-1 + mean``) into the weights.

        ``mean [d_in]``, ``whitening_matrix M [d_in, d_in]``, ``unwhitening_matrix [d_in, d_in]``.
        Afterwards raw activations give the same features and outputs as whitened
        ones did before; ``normalize_activations`` becomes ``"none"``. Computed in at
        least the precision of the statistics.
        """
        dtype = torch.promote_types(self.W_enc.dtype, whitening_matrix.dtype)
        mean = mean.to(self.W_enc.device, dtype)
        M = whitening_matrix.to(self.W_enc.device, dtype)
        M_inv = unwhitening_matrix.to(self.W_enc.device, dtype)
        self.W_enc.data.copy_(M @ self.W_enc.data.to(dtype))
        b_enc = getattr(self, "b_enc", None)
        if not self.cfg.apply_b_dec_to_input and isinstance(b_enc, nn.Parameter):
            b_enc.data.sub_(mean @ self.W_enc.data.to(dtype))
        self.W_dec.data.copy_(self.W_dec.data.to(dtype) @ M_inv)
        self.b_dec.data.copy_(self.b_dec.data.to(dtype) @ M_inv + mean)
        self.cfg.normalize_activations = "none"
