"""Run a function on N spawned CPU processes joined in a gloo process group (what
torchrun gives a rank), collect each rank's return value, and fail loudly (with the
rank's traceback) when a rank raises or hangs. Shared by the distributed tests."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, port: int, tmp: str, init_group: bool, args) -> None:
    out = Path(tmp) / f"rank{rank}.pt"
    try:
        torch.set_num_threads(1)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        if init_group:
            torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        torch.save({"result": fn(rank, world, *args)}, out)
    except BaseException:  # noqa: BLE001 - report to the test
        torch.save({"exception": traceback.format_exc()}, out)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any],
    world: int,
    tmp: str | Path,
    *args: Any,
    init_group: bool = True,
    timeout: float = 240,
) -> list[Any]:
    """``[fn(rank, world, *args) for rank in range(world)]``, each in its own spawned
    process with torchrun's environment variables set (and the default gloo group
    initialised when ``init_group``). ``fn`` must be a module-level function."""
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world, port, str(tmp), init_group, args))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    if hung:
        pytest.fail(f"ranks {hung} of {world} hung")
    results = []
    for r in range(world):
        path = tmp / f"rank{r}.pt"
        if not path.is_file():
            pytest.fail(f"rank {r} of {world} died without a result")
        res = torch.load(path, weights_only=False)
        assert "exception" not in res, f"rank {r} of {world}:\n{res['exception']}"
        results.append(res["result"])
    return results
