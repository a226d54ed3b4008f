"""The JumpReLU architecture (Gemma Scope and BatchTopK-trained SAEs load as this):
``JumpReLUSAE`` and its config, the training SAE (step / tanh / quadratic L0 penalties
with straight-through estimators, pre-activation loss) and its latent-sharded step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fastsae import ops, torch_ops
from fastsae.saes.base import SAE
from fastsae.saes.config import SAEConfig
from fastsae.saes.registry import register
from fastsae.saes.training_sae import (
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from fastsae.sparse_code import SparseCode
from fastsae.training.losses import JumpReLUFunction, StepFunction, pre_act_loss
from fastsae.training.parallel.latent.dense import DenseShardedTrainingSAE


@dataclass
class JumpReLUSAEConfig(SAEConfig):
    """JumpReLU SAE: ``relu(h) * (h > threshold)``."""

    _architecture: ClassVar[str | None] = "jumprelu"


class JumpReLUSAE(SAE[JumpReLUSAEConfig]):
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


_SPARSITY_MODES = ("step", "tanh", "quadratic")


@dataclass
class JumpReLUTrainingSAEConfig(TrainingSAEConfig, JumpReLUSAEConfig):
    """Training config of a JumpReLU SAE (SAELens 6.x fields).

    ``jumprelu_init_threshold``: starting threshold. ``jumprelu_bandwidth``: width of the
    rectangle kernel of the straight-through estimator. ``jumprelu_sparsity_loss_mode``:
    ``"step"`` (DeepMind L0), ``"tanh"`` (Anthropic) or ``"quadratic"`` (around
    ``target_l0``). ``l0_coefficient`` / ``l0_warm_up_steps``: the penalty's weight and
    warm-up. ``pre_act_loss_coefficient``: Anthropic's pre-activation loss on dead
    latents (None = off). ``jumprelu_tanh_scale``: tanh mode's scale.
    ``jumprelu_ste_to_input``: the estimator's gradient also reaches the encoder.
    """

    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.05
    jumprelu_sparsity_loss_mode: str = "step"
    l0_coefficient: float = 1.0
    l0_warm_up_steps: int = 0
    pre_act_loss_coefficient: float | None = None
    jumprelu_tanh_scale: float = 4.0
    jumprelu_ste_to_input: bool = False
    target_l0: float | None = None

    _architecture: ClassVar[str | None] = "jumprelu"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.jumprelu_sparsity_loss_mode not in _SPARSITY_MODES:
            raise ValueError(
                f"jumprelu_sparsity_loss_mode must be one of {_SPARSITY_MODES}, "
                f"got {self.jumprelu_sparsity_loss_mode!r}"
            )
        if not self.jumprelu_bandwidth > 0:
            raise ValueError(f"jumprelu_bandwidth must be > 0, got {self.jumprelu_bandwidth!r}")
        if self.jumprelu_sparsity_loss_mode == "quadratic":
            if self.target_l0 is None:
                raise ValueError(
                    "target_l0 must be set for jumprelu_sparsity_loss_mode='quadratic'"
                )
            if not 0 < self.target_l0 <= self.d_sae:
                raise ValueError(
                    f"target_l0 must be in (0, d_sae={self.d_sae}], got {self.target_l0}"
                )


class JumpReLUTrainingSAE(TrainingSAE[JumpReLUTrainingSAEConfig], JumpReLUSAE):
    """JumpReLU SAE trained as SAELens 6.x does: the threshold is a raw fp32 parameter
    (projected to >= 0 before each step), its gradient from the rectangle estimator."""

    config_class = JumpReLUTrainingSAEConfig
    cfg: JumpReLUTrainingSAEConfig

    def __init__(self, cfg: JumpReLUTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.bandwidth = cfg.jumprelu_bandwidth
        # fp32 whatever the SAE dtype: Adam's lr-sized steps on an O(1) threshold round
        # away in bf16
        self.threshold = nn.Parameter(
            torch.full(
                (cfg.d_sae,), cfg.jumprelu_init_threshold, dtype=torch.float32, device=self.device
            )
        )

    def _apply(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        out = super()._apply(*args, **kwargs)
        threshold = self._parameters.get("threshold")
        if threshold is not None and threshold.dtype != torch.float32:
            threshold.data = threshold.data.float()
        return out

    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {"l0": TrainCoefficientConfig(self.cfg.l0_coefficient, self.cfg.l0_warm_up_steps)}

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        with torch.no_grad():
            self.threshold.data.clamp_(min=0.0)
        return super().training_forward_pass(step_input)

    def encode_with_hidden_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        sae_in = self.process_sae_in(x)
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        acts = JumpReLUFunction.apply(
            hidden_pre,
            self.threshold.to(hidden_pre.dtype),
            self.bandwidth,
            self.cfg.jumprelu_ste_to_input,
        )
        return self.hook_sae_acts_post(acts), hidden_pre

    def _encode_dense(self, sae_in: Tensor) -> Tensor:
        # the training activation h * (h > threshold), as encode() and SAELens's training
        # forward (no ReLU: it differs from the inference SAE's where a threshold < 0)
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        acts = hidden_pre * (hidden_pre > self.threshold.to(hidden_pre.dtype))
        return self.hook_sae_acts_post(acts)

    def _fused_code(self, sae_in: Tensor) -> bool:
        # the fused kernel computes relu(h) * (h > threshold): the same only while no
        # threshold is negative (the trainer clamps them before each step)
        return super()._fused_code(sae_in) and not bool((self.threshold < 0).any())

    def calculate_aux_loss(
        self, step_input: TrainStepInput, feature_acts: Tensor, hidden_pre: Tensor, sae_out: Tensor
    ) -> dict[str, Tensor]:
        threshold = self.threshold.to(hidden_pre.dtype)
        W_dec_norm = self.W_dec.norm(dim=1)
        mode = self.cfg.jumprelu_sparsity_loss_mode
        if mode == "tanh":
            per_item = torch.tanh(self.cfg.jumprelu_tanh_scale * feature_acts * W_dec_norm).sum(-1)
        else:
            l0 = StepFunction.apply(
                hidden_pre, threshold, self.bandwidth, self.cfg.jumprelu_ste_to_input
            ).sum(dim=-1)
            if mode == "quadratic":
                target = self.cfg.target_l0
                assert target is not None
                per_item = 2 / target * (l0 - target) ** 2
            else:
                per_item = l0
        losses = {"l0_loss": (step_input.coefficients["l0"] * per_item).mean()}
        if self.cfg.pre_act_loss_coefficient is not None:
            losses["pre_act_loss"] = pre_act_loss(
                self.cfg.pre_act_loss_coefficient,
                threshold,
                hidden_pre,
                step_input.dead_neuron_mask,
                W_dec_norm,
            )
        return losses

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """Older checkpoints store ``log_threshold``: convert to the raw threshold."""
        if "log_threshold" in state_dict:
            state_dict["threshold"] = torch.exp(state_dict.pop("log_threshold")).contiguous()


class ShardedJumpReLUTrainingSAE(DenseShardedTrainingSAE):
    """This rank's shard of a :class:`JumpReLUTrainingSAE` (``threshold`` sharded like
    ``b_enc``, fp32): step / tanh / quadratic L0 penalties, the pre-activation loss."""

    full_class = JumpReLUTrainingSAE

    @classmethod
    def step_payloads(
        cls, batch: int, d_in: int, *, k: float, n_dead: int, dtype_bytes: int, pre_act_loss: bool
    ) -> dict[str, int]:
        """The reconstruction and the per-token penalty sums all-reduced, and the
        pre-activation loss's sums when it is on (a dead mask given)."""
        out = {
            "reconstruction all_reduce": batch * d_in * dtype_bytes,
            "penalty all_reduce": batch * dtype_bytes,
        }
        if pre_act_loss:
            out["pre-activation loss all_reduce"] = batch * dtype_bytes
        return out

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


register(
    "jumprelu",
    JumpReLUSAE,
    JumpReLUSAEConfig,
    training_cls=JumpReLUTrainingSAE,
    training_cfg_cls=JumpReLUTrainingSAEConfig,
    sharded=ShardedJumpReLUTrainingSAE,
)
