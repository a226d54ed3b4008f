"""Latent-sharded standard (ReLU + L1) and JumpReLU training SAEs: no selection step.

Each rank encodes its shard densely (``[batch, d_sae / W]``), decodes it with its rows
of ``W_dec``, and the partial reconstructions are summed over the ranks. The sparsity
penalties are sums over latents per token, so each rank computes its shard's per-token
partial sums, one ``[batch]`` all_reduce gives the full sums, and whatever non-linear
function the loss applies afterwards (``||.||_p``'s root, the quadratic L0 target) is
applied to the full sum on every rank. Same losses and gradients as the unsharded SAE
(:mod:`fastsae.training.saes.standard`, :mod:`fastsae.training.saes.jumprelu`).

Communication per step: the ``[batch, d_in]`` reconstruction and one or two ``[batch]``
penalty sums all-reduced, plus ``b_dec``'s ``[d_in]`` encoder gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastsae.training.latent_sharding.base import ShardedTrainingSAE, sum_over_shards
from fastsae.training.losses import JumpReLUFunction, StepFunction
from fastsae.training.saes.base import TrainStepInput, TrainStepOutput, mse_loss, total_loss
from fastsae.training.saes.jumprelu import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from fastsae.training.saes.standard import StandardTrainingSAE, StandardTrainingSAEConfig


class _DenseShardedTrainingSAE(ShardedTrainingSAE):
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


class ShardedStandardTrainingSAE(_DenseShardedTrainingSAE):
    """This rank's shard of a :class:`StandardTrainingSAE` (ReLU, L1 scaled by the
    decoder norm, any ``lp_norm``). Ghost grads are not supported."""

    full_class = StandardTrainingSAE
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


class ShardedJumpReLUTrainingSAE(_DenseShardedTrainingSAE):
    """This rank's shard of a :class:`JumpReLUTrainingSAE` (``threshold`` sharded like
    ``b_enc``, fp32): step / tanh / quadratic L0 penalties, the pre-activation loss."""

    full_class = JumpReLUTrainingSAE
    cfg: JumpReLUTrainingSAEConfig

    def __init__(
        self, cfg: JumpReLUTrainingSAEConfig, rank: int, world_size: int, group=None
    ) -> None:
        super().__init__(cfg, rank, world_size, group)
        self.threshold = nn.Parameter(
            torch.full((self.d_sae_local,), cfg.jumprelu_init_threshold, dtype=torch.float32)
        )

    def _apply(self, *args, **kwargs):  # type: ignore[override]
        out = super()._apply(*args, **kwargs)
        threshold = self._parameters.get("threshold")
        if threshold is not None and threshold.dtype != torch.float32:
            threshold.data = threshold.data.float()  # fp32 whatever the SAE dtype (as unsharded)
        return out

    def _forward(self, step_input: TrainStepInput) -> TrainStepOutput:
        return super().training_forward_pass(step_input)

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        with torch.no_grad():
            self.threshold.data.clamp_(min=0.0)
        return self._forward(step_input)

    def _activate(self, hidden_pre: Tensor) -> Tensor:
        return JumpReLUFunction.apply(
            hidden_pre,
            self.threshold.to(hidden_pre.dtype),
            self.cfg.jumprelu_bandwidth,
            self.cfg.jumprelu_ste_to_input,
        )

    def _sparsity_losses(
        self, step_input: TrainStepInput, feature_acts: Tensor, hidden_pre: Tensor
    ) -> dict[str, Tensor]:
        cfg = self.cfg
        threshold = self.threshold.to(hidden_pre.dtype)
        W_dec_norm = self.W_dec.norm(dim=1)
        if cfg.jumprelu_sparsity_loss_mode == "tanh":
            partial = torch.tanh(cfg.jumprelu_tanh_scale * feature_acts * W_dec_norm).sum(-1)
            per_item = self._sum(partial, "tanh L0 penalty all_reduce")
        else:
            partial = StepFunction.apply(
                hidden_pre, threshold, cfg.jumprelu_bandwidth, cfg.jumprelu_ste_to_input
            ).sum(dim=-1)
            per_item = self._sum(partial, "L0 all_reduce")
            if cfg.jumprelu_sparsity_loss_mode == "quadratic":
                target = cfg.target_l0
                assert target is not None
                per_item = 2 / target * (per_item - target) ** 2
        losses = {"l0_loss": (step_input.coefficients["l0"] * per_item).mean()}
        if cfg.pre_act_loss_coefficient is not None:
            # the unsharded loss is 0 when no latent is dead anywhere; here the masked
            # partial sums are 0 then, so every rank takes part in the same collective
            dead = self._local_dead(step_input.dead_neuron_mask)
            if dead is None:
                losses["pre_act_loss"] = hidden_pre.new_tensor(0.0)
            else:
                partial = ((threshold - hidden_pre).relu() * dead * W_dec_norm).sum(dim=-1)
                per_item = self._sum(partial, "pre-activation loss all_reduce")
                losses["pre_act_loss"] = cfg.pre_act_loss_coefficient * per_item.mean()
        return losses
