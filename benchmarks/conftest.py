"""Shared setup for the pytest-benchmark suites (``pytest benchmarks/ --benchmark-json=...``).

Not collected by the normal test run: pyproject's ``testpaths = ["tests"]``.
"""

from __future__ import annotations

import os

import pytest
import torch

# torch's own choice of intra-op threads at start-up (physical cores, or OMP_NUM_THREADS).
# FASTSAE_BENCH_THREADS overrides it; every benchmark resets to this so nothing run
# earlier in the session can leave a different setting behind.
DEFAULT_THREADS = int(os.environ.get("FASTSAE_BENCH_THREADS", torch.get_num_threads()))


@pytest.fixture(autouse=True)
def bench_threads() -> int:
    """Intra-op thread count for the test (torch's start-up default unless overridden)."""
    torch.set_num_threads(DEFAULT_THREADS)
    return DEFAULT_THREADS


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what the numbers depend on in the JSON's ``machine_info``."""
    import sae_lens

    import fastsae

    machine_info["torch_version"] = torch.__version__
    machine_info["sae_lens_version"] = sae_lens.__version__
    machine_info["fastsae_version"] = fastsae.__version__
    machine_info["torch_num_threads"] = DEFAULT_THREADS
    machine_info["cpu_count"] = os.cpu_count()
    if torch.cuda.is_available():
        machine_info["cuda_device"] = torch.cuda.get_device_name()
