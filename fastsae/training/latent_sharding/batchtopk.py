"""Latent-sharded BatchTopK: the ``k * batch`` largest ReLU'd pre-activations of the whole
batch, chosen exactly across the shards.

Each rank takes the top ``k * batch`` entries of its own ``[batch, d_sae / W]`` block
(a globally chosen entry has fewer than ``k * batch`` larger entries anywhere, so it is
among its own block's top ``k * batch``); the candidates are all-gathered and every rank
keeps the same global top ``k * batch``. The rest is the sharded TopK step (padded
per-token code of this rank's picks, partial reconstructions summed, AuxK chosen
globally). The threshold EMA (the smallest selected activation, as SAELens) takes the
minimum over the shards, so the replicated ``topk_threshold`` buffer stays equal on
every rank. Communication: ``2 * k * batch`` values + ids per rank instead of TopK's
``k * batch`` per row.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from fastsae.torch_ops import encoder_preacts, padded_layout
from fastsae.training.latent_sharding.base import all_reduce
from fastsae.training.latent_sharding.topk import ShardedTopKTrainingSAE, merge_candidates
from fastsae.training.saes.base import TrainStepInput, TrainStepOutput
from fastsae.training.saes.batchtopk import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig


class ShardedBatchTopKTrainingSAE(ShardedTopKTrainingSAE):
    """This rank's shard of a :class:`BatchTopKTrainingSAE` (``topk_threshold``
    replicated)."""

    full_class = BatchTopKTrainingSAE  # type: ignore[assignment]
    cfg: BatchTopKTrainingSAEConfig  # type: ignore[assignment]

    def __init__(
        self, cfg: BatchTopKTrainingSAEConfig, rank: int, world_size: int, group=None
    ) -> None:
        super().__init__(cfg, rank, world_size, group)
        self.register_buffer("topk_threshold", torch.tensor(0.0, dtype=torch.double))

    def _select(self, sae_in: Tensor, dn: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        h = encoder_preacts(sae_in, self.W_enc.detach(), self.b_enc.detach())
        if dn is not None:
            h = h * dn
        n_tokens, n_local = h.shape
        n_sel = int(self.cfg.k * n_tokens)
        self.last_global_indices = None
        if n_sel == 0:
            pos = torch.zeros(n_tokens, 1, dtype=torch.long, device=h.device)
            return pos, h.new_zeros(n_tokens, 1), torch.zeros_like(pos, dtype=torch.bool)
        flat = h.reshape(-1)
        vals, flat_pos = torch.topk(flat.relu(), min(n_sel, flat.numel()), sorted=False)
        chosen, _ = merge_candidates(
            vals[None], flat_pos[None], n_sel, 0, self.group, "batch topk candidates",
            d_sae=flat.numel(),
        )  # fmt: skip
        picked = flat_pos[chosen[0]].sort().values
        rows, slot, width = padded_layout(picked, n_tokens, n_local)
        pos = torch.zeros(n_tokens, width, dtype=torch.long, device=h.device)
        raw = h.new_zeros(n_tokens, width)
        selected = torch.zeros(n_tokens, width, dtype=torch.bool, device=h.device)
        pos[rows, slot] = picked % n_local
        raw[rows, slot] = flat.index_select(0, picked)
        selected[rows, slot] = True
        return pos, raw, selected

    def _forward(self, step_input: TrainStepInput) -> TrainStepOutput:
        return super().training_forward_pass(step_input)

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """BatchTopK's step on the shards, then the threshold EMA (minimum over shards)."""
        output = self._forward(step_input)
        output.metrics["topk_threshold"] = self._update_topk_threshold(output)
        return output

    @torch.no_grad()
    def _update_topk_threshold(self, output: TrainStepOutput) -> Tensor:
        assert output.code is not None
        values = output.code.values.detach()
        positive = values[values > 0]
        local_min = positive.min().to(torch.double) if positive.numel() else None
        buf = torch.tensor(
            [float("inf") if local_min is None else float(local_min)],
            dtype=torch.double,
            device=values.device,
        )
        all_reduce(buf, self.group, "batch topk threshold all_reduce(min)", dist.ReduceOp.MIN)
        if torch.isfinite(buf).all():
            lr = self.cfg.topk_threshold_lr
            self.topk_threshold = (1 - lr) * self.topk_threshold + lr * buf[0]
        return self.topk_threshold
