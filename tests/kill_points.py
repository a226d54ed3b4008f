"""Killing a writer at a pause point of a folder swap (``FASTSAE_TEST_PAUSE_AT``), for the
kill-safety tests of SAE folders, checkpoints and activation caches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastsae.loading.atomic_dir import PAUSE_ENV, PAUSE_MARKER_ENV


def start_paused(
    script: str, args: list[str], point: str, marker: Path, timeout_s: float = 600
) -> subprocess.Popen:
    """Start ``python -c script *args`` with the pause hook at ``point``; return once it
    waits there (its marker file exists). Fails the test if it exits or never pauses."""
    env = {**os.environ, PAUSE_ENV: point, PAUSE_MARKER_ENV: str(marker)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the writer exited ({proc.returncode}) before pausing at {point}: {err}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.communicate()
            pytest.fail(f"the writer never paused at {point}")
        time.sleep(0.02)
    return proc


def kill_9(proc: subprocess.Popen) -> None:
    """``kill -9`` the paused writer and check it died of it."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
