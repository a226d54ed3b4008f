"""Learning-rate schedules and loss-coefficient warm-up (SAELens 6.x semantics).

The schedule is torch's own schedulers chained with ``SequentialLR``: optional
linear warm-up from ``lr / warm_up_steps``, the main schedule (constant, cosine
annealing to ``lr_end``, or cosine with warm restarts), optional linear decay to 0
over the last ``decay_steps``. Same numbers as SAELens for the same settings. And
:func:`fused_adam_kwargs`: torch's fused Adam where it applies.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim import lr_scheduler as sched


def get_lr_scheduler(
    scheduler_name: str,
    optimizer: Optimizer,
    training_steps: int,
    lr: float,
    warm_up_steps: int,
    decay_steps: int,
    lr_end: float,
    num_cycles: int,
) -> sched.LRScheduler:
    """The run's LR schedule over ``training_steps`` steps (see the module docstring)."""
    name = scheduler_name.lower()
    main_steps = training_steps - warm_up_steps - decay_steps
    if name == "constant":
        main: sched.LRScheduler = sched.LambdaLR(optimizer, lr_lambda=lambda _: 1.0)
        lr_end = lr  # a constant schedule decays from lr itself
    elif name == "cosineannealing":
        main = sched.CosineAnnealingLR(optimizer, T_max=main_steps, eta_min=lr_end)
    elif name == "cosineannealingwarmrestarts":
        main = sched.CosineAnnealingWarmRestarts(
            optimizer, T_0=max(main_steps // num_cycles, 1), eta_min=lr_end
        )
    else:
        raise ValueError(f"unknown lr_scheduler_name {scheduler_name!r}")
    schedulers: list[sched.LRScheduler] = []
    milestones: list[int] = []
    if warm_up_steps > 0:
        schedulers.append(
            sched.LinearLR(
                optimizer,
                start_factor=1 / warm_up_steps,
                end_factor=1.0,
                total_iters=warm_up_steps - 1,
            )
        )
        milestones.append(warm_up_steps)
    schedulers.append(main)
    if decay_steps > 0:
        if lr_end == 0:
            raise ValueError("decay_steps > 0 needs lr_end > 0")
        schedulers.append(
            sched.LinearLR(
                optimizer, start_factor=lr_end / lr, end_factor=0.0, total_iters=decay_steps
            )
        )
        milestones.append(training_steps - decay_steps)
    return sched.SequentialLR(optimizer, schedulers=schedulers, milestones=milestones)


class CoefficientScheduler:
    """A loss coefficient warmed up linearly from 0 to ``final_value`` over ``warm_up_steps``."""

    def __init__(self, warm_up_steps: int, final_value: float):
        if not isinstance(final_value, (int, float)):
            raise TypeError(f"final_value must be a number, got {type(final_value).__name__}")
        self.warm_up_steps = warm_up_steps
        self.final_value = final_value
        self.current_step = 0
        self.current_value = 0.0 if warm_up_steps > 0 else float(final_value)

    @property
    def value(self) -> float:
        return self.current_value

    def _value_at(self, step: int) -> float:
        if step < self.warm_up_steps:
            return self.final_value * step / self.warm_up_steps
        return float(self.final_value)

    def step(self) -> float:
        self.current_step += 1
        self.current_value = self._value_at(self.current_step)
        return self.current_value

    def state_dict(self) -> dict[str, Any]:
        return {"current_step": self.current_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current_step = int(state["current_step"])
        self.current_value = self._value_at(self.current_step)

    def __repr__(self) -> str:
        return f"CoefficientScheduler(final_value={self.final_value}, warm_up_steps={self.warm_up_steps})"


_FUSED_ADAM_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64}


def fused_adam_kwargs(parameters: Iterable[Tensor]) -> dict[str, Any]:
    """Fused Adam where torch has it for these parameters (one pass over all params and
    states instead of the for-loop Adam's ops per parameter)."""
    params = list(parameters)
    devices = {p.device.type for p in params}
    dtypes = {p.dtype for p in params}
    if len(devices) == 1 and devices <= {"cpu", "cuda"} and dtypes <= _FUSED_ADAM_DTYPES:
        return {"fused": True}
    return {}
