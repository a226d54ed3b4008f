"""Latent-sharded standard (ReLU + L1) and JumpReLU training SAEs: no selection step.

Each rank encodes its shard densely (``[batch, d_sae / W]``), decodes it with its rows
of ``W_dec``, and the partial reconstructions are summed over the ranks. The sparsity
penalties are sums over latents per token, so each rank computes its shard's per-token
partial sums, one ``[batch]`` all_reduce gives the full sums, and whatever non-linear
function the loss applies afterwards (``||.||_p``'s root, the quadratic L0 target) is
applied to the full sum on every rank. Same losses and gradients as the unsharded SAE
(:mod:`fastsae.saes.standard`, :mod:`fastsae.saes.jumprelu`).

Communication per step: the ``[batch, d_in]`` reconstruction and one or two ``[batch]``
penalty sums all-reduced, plus ``b_dec``'s ``[d_in]`` encoder gradient.
"""

from __future__ import annotations

from torch import Tensor

from fastsae.saes.training_sae import TrainStepInput, TrainStepOutput, mse_loss, total_loss
from fastsae.training.parallel.latent.base import ShardedTrainingSAE, sum_over_shards


class DenseShardedTrainingSAE(ShardedTrainingSAE):
    """The dense sharded step: encode the shard, decode, sum the reconstructions."""

    def _activate(self, hidden_pre: Tensor) -> Tensor:
        raise NotImplementedError

    def _sparsity_losses(
        self, step_input: TrainStepInput, feature_acts: Tensor, hidden_pre: Tensor
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """The architecture's step on the shards; every rank must call it with the same
        ``sae_in`` and dead mask. ``feature_acts``/``hidden_pre`` are this rank's
        ``[batch, d_sae_local]`` columns; ``fired()`` is ``[d_sae_local]``."""
        x = step_input.sae_in.to(self.W_enc.dtype)
        hidden_pre = self._encoder_input(x) @ self.W_enc + self.b_enc
        feature_acts = self._activate(hidden_pre)
        partial = feature_acts @ self.W_dec
        sae_out = sum_over_shards(partial, self.group, "reconstruction all_reduce") + self.b_dec
        losses = {"mse_loss": mse_loss(sae_out, x).sum(dim=-1).mean()}
        losses.update(self._sparsity_losses(step_input, feature_acts, hidden_pre))
        return TrainStepOutput(
            sae_in=x,
            sae_out=sae_out,
            loss=total_loss(losses),
            losses=losses,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            d_sae=self.d_sae_local,
        )

    def _sum(self, partial: Tensor, what: str) -> Tensor:
        return sum_over_shards(partial, self.group, what)
