"""TopK and AbsTopK SAEs: the architectures whose forward is sparse end to end."""

from __future__ import annotations

from torch import Tensor

from fastsae import ops, torch_ops
from fastsae.saes.base import SAE
from fastsae.saes.config import AbsTopKSAEConfig, TopKSAEConfig
from fastsae.sparse_code import SparseCode


class TopKSAE(SAE):
    """Keep the k largest pre-activations per token, ReLU applied (SAELens ``TopKSAE``).

    With ``rescale_acts_by_decoder_norm`` the selection is on ``h * ||W_dec||`` and the
    activations are divided by ``||W_dec||`` again before decoding.
    """

    config_class = TopKSAEConfig
    cfg: TopKSAEConfig
    _abs_select = False
    _fixed_k = True

    def _init_parameters(self) -> None:
        super()._init_parameters()
        self.b_enc = self._param(self.cfg.d_sae)

    def _dec_norm(self) -> Tensor | None:
        return self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None

    def _encode_dense(self, sae_in: Tensor) -> Tensor:
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        dec_norm = self._dec_norm()
        if dec_norm is not None:
            hidden_pre = hidden_pre * dec_norm
        code = torch_ops.topk_select(hidden_pre, self.cfg.k, abs_select=self._abs_select)
        return self.hook_sae_acts_post(code.to_dense(self.cfg.d_sae))

    def _encode_code(self, sae_in: Tensor) -> SparseCode:
        return ops.topk_encode(
            sae_in,
            self.W_enc,
            self.b_enc,
            self.cfg.k,
            dec_norm=self._dec_norm(),
            abs_select=self._abs_select,
        )

    def _decoder_values(self, code: SparseCode) -> SparseCode:
        if not self.cfg.rescale_acts_by_decoder_norm:
            return code
        inv_norm = 1 / self.W_dec.norm(dim=-1)
        return SparseCode(code.values * inv_norm[code.indices], code.indices)

    def _dense_decoder(self, feature_acts: Tensor) -> Tensor:
        if self.cfg.rescale_acts_by_decoder_norm:
            feature_acts = feature_acts * (1 / self.W_dec.norm(dim=-1))
        return feature_acts @ self.W_dec + self.b_dec

    def fold_W_dec_norm(self) -> None:
        if not self.cfg.rescale_acts_by_decoder_norm:
            raise NotImplementedError(
                "Folding W_dec norms is not safe for TopK SAEs with "
                "rescale_acts_by_decoder_norm=False: it would change which latents are selected"
            )
        super().fold_W_dec_norm()

    def fold_activation_whitening(
        self, mean: Tensor, whitening_matrix: Tensor, unwhitening_matrix: Tensor
    ) -> None:
        """As :meth:`SAE.fold_activation_whitening`; with ``rescale_acts_by_decoder_norm``
        the decoder norms are folded first (unwhitening changes them, which would
        change the selection) and the rescaling is switched off."""
        if self.cfg.rescale_acts_by_decoder_norm:
            self.fold_W_dec_norm()
            self.cfg.rescale_acts_by_decoder_norm = False
        super().fold_activation_whitening(mean, whitening_matrix, unwhitening_matrix)


class AbsTopKSAE(TopKSAE):
    """Keep the k largest-magnitude pre-activations per token with their sign (SAELens ``AbsTopKSAE``)."""

    config_class = AbsTopKSAEConfig
    cfg: AbsTopKSAEConfig
    _abs_select = True
