"""Exact resume of an :class:`~fastsae.training.activations_store.ActivationsStore`:
its ``state_dict`` (buffer, shuffling generator, token-stream position, data-parallel
row share), saving/loading it, and :func:`furthest_position` for continuing a
data-parallel run under another number of ranks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from fastsae.training.checkpoints import read_tensors

ACTIVATIONS_STORE_STATE_FILENAME = "activations_store_state.safetensors"  # as SAELens


class StoreStateMixin:
    """``state_dict`` / ``load_state_dict`` / ``save`` / ``load`` of the store (which
    provides the buffers, the generator, the row source and the row share)."""

    d_in: int
    context_size: int
    device: Any
    dtype: torch.dtype
    row_shard: tuple[int, int]
    _storage: Tensor
    _ready: Tensor
    _generator: torch.Generator
    _rows: Any
    _n_rows_seen: int

    def state_dict(self) -> dict[str, Tensor]:
        """Everything needed to continue exactly: buffer contents, the shuffling
        generator's state and the dataset position. All values are tensors, so the dict
        can be saved with safetensors (``save``)."""
        return {
            "storage": self._storage.contiguous().clone(),
            "ready": self._ready.contiguous().clone(),
            "generator_state": self._generator.get_state(),
            "d_in": torch.tensor(self.d_in),
            "context_size": torch.tensor(self.context_size),
            "n_rows_seen": torch.tensor(self._n_rows_seen),
            "row_shard": torch.tensor(self.row_shard),
            **self._rows.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Continue from ``state_dict()``: no model forward and no tokenization of the
        documents before the saved position."""
        required = (
            "storage", "ready", "generator_state", "d_in", "context_size", "epoch",
            "doc_index", "doc_offset", "n_dataset_processed",
        )  # fmt: skip
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"activations store state is missing {missing}")
        for key, mine in (("d_in", self.d_in), ("context_size", self.context_size)):
            if int(state[key]) != mine:
                raise ValueError(f"state has {key}={int(state[key])}, this store has {mine}")
        self._storage = state["storage"].to(device=self.device, dtype=self.dtype)
        self._ready = state["ready"].to(device=self.device, dtype=self.dtype)
        saved_shard = tuple(int(v) for v in state.get("row_shard", torch.tensor([0, 1])))
        if saved_shard != self.row_shard:
            raise ValueError(
                f"state is data-parallel rank {saved_shard[0]} of {saved_shard[1]}'s data, "
                f"this store is rank {self.row_shard[0]} of {self.row_shard[1]} (see "
                "furthest_position to continue under another world size)"
            )
        self._generator.set_state(state["generator_state"].cpu())
        self._rows.load_state_dict(state)
        self._n_rows_seen = int(state.get("n_rows_seen", 0))

    def save(self, file_path: str | os.PathLike) -> None:
        """Write ``state_dict()`` to a safetensors file."""
        save_file(self.state_dict(), os.fspath(file_path))

    def load(self, file_path: str | os.PathLike) -> None:
        """Read a file written by ``save`` and ``load_state_dict`` it (a missing,
        truncated or corrupt file, or a state that does not fit, raises naming it)."""
        path = Path(file_path)
        try:
            self.load_state_dict(read_tensors(path, "activations store state"))
        except ValueError as e:
            if str(path) in str(e):
                raise
            raise ValueError(f"{path}: {e}") from e

    def save_to_checkpoint(self, checkpoint_path: str | os.PathLike) -> None:
        self.save(Path(checkpoint_path) / ACTIVATIONS_STORE_STATE_FILENAME)

    def load_from_checkpoint(self, checkpoint_path: str | os.PathLike) -> None:
        self.load(Path(checkpoint_path) / ACTIVATIONS_STORE_STATE_FILENAME)

    def reset_input_dataset(self) -> None:
        """Restart the token stream at the dataset's first document (same epoch count)."""
        self._rows.load_state_dict({**self._rows.state_dict(), "doc_index": 0, "doc_offset": 0})


def furthest_position(
    states: list[dict[str, Tensor]], row_shard: tuple[int, int]
) -> tuple[dict[str, Tensor], int]:
    """Continue a data-parallel run under another number of ranks: the store state of
    data-parallel rank ``row_shard = (rank, world_size)`` that starts at the furthest
    token-stream position any saved rank reached, with empty buffers.

    Returns ``(state, n_dropped)``: ``n_dropped`` activations were in the saved ranks'
    shuffling buffers and are not trained on (rows are not replayed, so no token is
    seen twice). ``states`` are the saved ranks' ``state_dict()`` s.
    """
    if not states:
        raise ValueError("furthest_position needs at least one saved store state")

    def position(st: dict[str, Tensor]) -> tuple[int, int, int]:
        return int(st["epoch"]), int(st["doc_index"]), int(st["doc_offset"])

    furthest = max(states, key=position)
    d_in = int(furthest["d_in"])
    dtype = furthest["storage"].dtype
    dropped = sum(int(st["storage"].shape[0]) + int(st["ready"].shape[0]) for st in states)
    state = {
        **furthest,
        "storage": torch.empty(0, d_in, dtype=dtype),
        "ready": torch.empty(0, d_in, dtype=dtype),
        "n_rows_seen": torch.tensor(0),
        "row_shard": torch.tensor(row_shard),
    }
    return state, dropped
