"""The collectives the distributed trainers share, on ``torch.distributed``: each one
through :func:`collective` (a failure names the operation and the rank), over a
process group (``None``: the default one), with buffers on :func:`comm_device`."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fastsae.loading.atomic_dir import commit_dir, temp_dir_for


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective(what: str, fn, *args, **kwargs):
    """Run a collective; on failure (timeout, dead peer) re-raise naming it and the rank."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - add context whatever the backend raised
        rank, world = rank_and_world()
        raise RuntimeError(
            f"rank {rank}/{world}: collective {what!r} failed ({type(e).__name__}: {e}); "
            "another rank may have died or be stuck (the process group's timeout bounds this)"
        ) from e


def average_gradients(params, group, world_size: int, comm_device: torch.device) -> None:
    """Average the gradients of ``params`` over ``group`` (``world_size`` ranks): one flat
    all_reduce per dtype through ``comm_device`` (a missing gradient counts as zero)."""
    if world_size == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.requires_grad:
            by_dtype.setdefault(p.dtype, []).append(p)
    for dtype, ps in by_dtype.items():
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps]
        ).to(comm_device)
        collective(
            f"all_reduce(gradients, {dtype})", dist.all_reduce, flat, op=dist.ReduceOp.SUM,
            group=group,
        )  # fmt: skip
        flat /= world_size
        offset = 0
        for p in ps:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.device)
            offset += n


def comm_device(device: str | torch.device) -> torch.device:
    """Where collectives' buffers live: the CPU under gloo, else the training device."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        return torch.device("cpu")
    return torch.device(device)


def main_rank_outputs(kwargs: dict[str, Any], rank: int) -> dict[str, Any]:
    """A trainer's keyword arguments with the metrics folder, W&B run and progress bar
    kept on rank 0 only."""
    if rank != 0:
        kwargs.update(run_dir=None, wandb_run=None, show_progress=False)
    return kwargs


def all_reduce_sum_(tensor: Tensor, device: torch.device, what: str, group=None) -> Tensor:
    """Sum ``tensor`` over ``group`` in place, through a buffer on ``device``."""
    buf = tensor if tensor.device == device else tensor.to(device)
    collective(what, dist.all_reduce, buf, op=dist.ReduceOp.SUM, group=group)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def sum_fired_counts(
    fired: Tensor, n_tokens: int, device: torch.device, group=None
) -> tuple[Tensor, int]:
    """Per-latent firing counts and the token count summed over ``group`` (one
    all_reduce), so every replica has the same dead mask and counts the global batch."""
    buf = torch.cat([fired.float(), fired.new_tensor([float(n_tokens)], dtype=torch.float32)])
    all_reduce_sum_(buf, device, "all_reduce(fired counts)", group)
    return buf[:-1].to(fired.device), int(buf[-1].item())


@torch.no_grad()
def average_buffers_(module: torch.nn.Module, size: int, device: torch.device, group=None) -> None:
    """Float buffers (e.g. BatchTopK's threshold EMA) replaced by their mean over the
    ``size`` ranks of ``group``, so replicas stay equal."""
    for name, b in module.named_buffers():
        if b.is_floating_point() and b.numel() > 0:
            all_reduce_sum_(b, device, f"all_reduce(buffer {name})", group)
            b /= size


@torch.no_grad()
def broadcast_from_rank0(module: torch.nn.Module, device: torch.device):
    """Rank 0's parameters and buffers on every rank; a no-op on one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        buf = t.detach().to(device).clone()
        collective(f"broadcast({name})", dist.broadcast, buf, src=0)
        t.copy_(buf)


@torch.no_grad()
def check_same_tensors(
    module: torch.nn.Module,
    device: torch.device,
    what: str,
    group=None,
    names: Callable[[str], bool] | None = None,
) -> None:
    """Raise unless every rank's parameters and buffers (those whose name ``names``
    accepts; default all) equal those of the group's first rank (a no-op on one process).
    ``group``: the ranks compared (default: all). Compared by fingerprint: integer sums
    (plain and position-weighted, exact in any order) of the bit patterns of up to 2^20
    evenly spaced elements of each tensor, so the check costs the same at any width and
    sends two numbers per tensor."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    size = dist.get_world_size(group)
    tensors = [
        (name, t)
        for name, t in [*module.named_parameters(), *module.named_buffers()]
        if names is None or names(name)
    ]
    if size == 1 or not tensors:
        return
    prints = []
    for _, t in tensors:
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 2**20)]
        if sample.is_floating_point():
            sample = sample.view(
                {2: torch.int16, 4: torch.int32, 8: torch.int64}[sample.element_size()]
            )
        bits = sample.long()
        position = torch.arange(1, bits.numel() + 1, device=bits.device)
        prints.append(torch.stack([bits.sum(), (bits * position).sum()]))
    mine = torch.stack(prints).to(device)
    every = [torch.empty_like(mine) for _ in range(size)]
    collective(f"all_gather({what} fingerprints)", dist.all_gather, every, mine, group=group)
    for rank, theirs in enumerate(every[1:], start=1):
        differ = (theirs != every[0]).any(dim=1)
        if differ.any():
            name = tensors[int(differ.nonzero()[0])][0]
            first = 0 if group is None else dist.get_global_rank(group, 0)
            other = rank if group is None else dist.get_global_rank(group, rank)
            raise ValueError(
                f"rank {other}'s {what} differs from rank {first}'s ({name!r}): every rank "
                "must start from the same SAE (the same seed, and a from_pretrained_path "
                "that holds the same file on every node)"
            )


def save_checkpoint_together(
    base: Path,
    name: str,
    prepare: Callable[[Path], None],
    write_parts: Callable[[Path], None],
    commit: Callable[[Path], None],
) -> Path:
    """``base/name``, a checkpoint folder written by several ranks that appears at once.

    Every rank calls it: ``prepare(tmp)`` on every rank (rank 0 must create ``tmp``),
    a barrier, ``write_parts(tmp)`` on every rank (per-rank files), a barrier, then rank
    0 runs ``commit(tmp)`` and swaps ``tmp`` in as a whole (``commit_dir``; removed on
    failure), and a last barrier. A rank that fails raises; the others then fail at the next
    collective (after the process group's timeout) naming it.
    """
    rank, world = rank_and_world()
    tmp_name = [temp_dir_for(base / name).name]  # rank 0's name is the one used
    if world > 1:
        collective("broadcast(checkpoint name)", dist.broadcast_object_list, tmp_name, src=0)
    tmp, final = base / tmp_name[0], base / name

    def barrier(what: str) -> None:
        if world > 1:
            collective(f"barrier(save_checkpoint: {what})", dist.barrier)

    prepare(tmp)
    barrier("folder")
    write_parts(tmp)
    barrier("per-rank files")
    if rank == 0:
        try:
            commit(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        commit_dir(tmp, final)  # swapped in as a whole; removes tmp if it fails
    barrier("commit")
    return final
