"""Each rank's share of the training data (data parallelism)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import Tensor


class RankShardedProvider:
    """Each rank's disjoint share of a data provider.

    ``mode="split"`` (default): ``provider`` yields **global** batches; every rank draws
    each of them and keeps rows ``[rank * n / W, (rank + 1) * n / W)``. The global
    batches, and so the training, are the same for every world size; the cost is that
    every rank produces the whole batch (right for cached activations, synthetic data).

    ``mode="stride"``: ``provider`` yields per-rank batches; global step ``g`` gives rank
    ``r`` batch ``g * W + r``. The other ranks' batches are skipped with
    ``provider.skip(n)`` when the provider has it, else drawn and dropped.

    In both modes the wrapped provider's position is the same on every rank after each
    global step, so :meth:`state_dict` (rank 0's, in a checkpoint) restores any rank
    under any world size.
    """

    def __init__(self, provider: Iterator[Tensor], rank: int, world_size: int, mode: str = "split"):
        if mode not in ("split", "stride"):
            raise ValueError(f"mode must be 'split' or 'stride', got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.provider, self.rank, self.world_size, self.mode = provider, rank, world_size, mode
        self.n_global_batches = 0

    def __iter__(self) -> RankShardedProvider:
        return self

    def __next__(self) -> Tensor:
        if self.mode == "split":
            batch = next(self.provider)
            n = batch.shape[0]
            if n % self.world_size:
                raise ValueError(
                    f"global batch of {n} rows does not split over world_size={self.world_size}"
                )
            share = n // self.world_size
            out = batch[self.rank * share : (self.rank + 1) * share]
        else:
            self._skip(self.rank)
            out = next(self.provider)
            self._skip(self.world_size - self.rank - 1)
        self.n_global_batches += 1
        return out

    def _skip(self, n: int) -> None:
        if n <= 0:
            return
        skip = getattr(self.provider, "skip", None)
        if callable(skip):
            skip(n)
        else:
            for _ in range(n):
                next(self.provider)

    def state_dict(self) -> dict[str, Any]:
        inner = getattr(self.provider, "state_dict", None)
        return {
            "mode": self.mode,
            "world_size": self.world_size,
            "n_global_batches": self.n_global_batches,
            "provider": inner() if callable(inner) else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the wrapped provider; any world size (see the class docstring)."""
        if "provider" not in state:  # a single-process checkpoint of the bare provider
            state = {"provider": state, "n_global_batches": 0, "mode": self.mode}
        if state.get("mode", self.mode) != self.mode:
            raise ValueError(
                f"checkpoint data position is for mode {state['mode']!r}, this run uses {self.mode!r}"
            )
        self.n_global_batches = int(state.get("n_global_batches", 0))
        load = getattr(self.provider, "load_state_dict", None)
        if state["provider"] is not None:
            if not callable(load):
                raise TypeError("the wrapped provider has no load_state_dict")
            load(state["provider"])


# --------------------------------------------------------------------------- config check


def is_rank_sharded_state(state: Any) -> bool:
    """Whether ``state`` is a :meth:`RankShardedProvider.state_dict`."""
    return isinstance(state, dict) and {"mode", "provider", "n_global_batches"} <= set(state)


def bare_provider_state(state: dict[str, Any]) -> Any:
    """The wrapped provider's position in a ``"split"`` :class:`RankShardedProvider`
    state, for resuming the same data without data parallelism (the global batches are
    the provider's own batches then)."""
    if state.get("mode") != "split":
        raise ValueError(
            f"the checkpoint's data position is for a data-parallel run in mode "
            f"{state.get('mode')!r}; without data parallelism only 'split' positions resume"
        )
    return state["provider"]
