"""JumpReLU SAE (Gemma Scope and BatchTopK-trained SAEs load as this)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastsae import ops, torch_ops
from fastsae.saes.base import SAE
from fastsae.saes.config import JumpReLUSAEConfig
from fastsae.sparse_code import SparseCode


class JumpReLUSAE(SAE):
    """``relu(h) * (h > threshold)`` with ``h = x @ W_enc + b_enc`` (SAELens ``JumpReLUSAE``).

    ``threshold [d_sae]`` is stored raw (not as a log), as SAELens does.
    """

    config_class = JumpReLUSAEConfig
    cfg: JumpReLUSAEConfig

    def _init_parameters(self) -> None:
        super()._init_parameters()
        self.threshold = self._param(self.cfg.d_sae)
        self.b_enc = self._param(self.cfg.d_sae)

    def _encode_dense(self, sae_in: Tensor) -> Tensor:
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        return self.hook_sae_acts_post(torch_ops.jumprelu(hidden_pre, self.threshold))

    def _encode_code(self, sae_in: Tensor) -> SparseCode:
        return ops.jumprelu_encode(sae_in, self.W_enc, self.b_enc, self.threshold, sparse=True)

    def _fused_code(self, sae_in: Tensor) -> bool:
        # on CUDA the fused kernel compacts without writing [B, d_sae]
        return ops.auto_uses_triton(sae_in, self.W_enc)

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Fold decoder norms into the encoder and scale the threshold to match."""
        norms = self.fold_and_get_W_dec_norm()
        self.threshold.data.mul_(norms)
