"""The metadata of a ``fastsae bench`` run: the device's name and file-name slug, the
package versions, the command and the settings recorded in the JSON."""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

import fastsae
from fastsae.bench.cases import CHECK_ROWS, DTYPE_NAMES, RTOL
from fastsae.bench.plan import Plan


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name or platform.machine()} ({os.cpu_count()} cores)"


def device_slug(device: str) -> str:
    if device == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    name = device_name(device).split(" (")[0]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"cpu-{slug}-{os.cpu_count()}core"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def metadata(plan: Plan, command: str) -> dict[str, Any]:
    meta = {
        "device": device_name(plan.device),
        "device_kind": plan.device,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "versions": {
            "fastsae": fastsae.__version__,
            "torch": torch.__version__,
            "triton": _version("triton"),
            "sae_lens": _version("sae-lens"),
            "python": platform.python_version(),
        },
        "torch_num_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "notes": plan.notes,
        "work_model": "see the fastsae.bench package docstring (fastsae/bench/__init__.py)",
        "check_rows": CHECK_ROWS.get(plan.device),
        "tolerances": {DTYPE_NAMES[d]: t for d, t in RTOL.items()},
    }
    if plan.device == "cuda":
        meta["cuda"] = torch.version.cuda
    return meta
