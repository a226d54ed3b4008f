"""Stopping a training loop cleanly on Ctrl-C: the first SIGINT asks the loop to stop
at the next step boundary (so the checkpoint it writes is consistent), a second one
interrupts at once."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def deferred_sigint():
    """While active, the first SIGINT only sets a flag (read with the yielded callable),
    so the loop can stop at a step boundary; a second one interrupts at once. Outside
    the main thread signals cannot be caught, and this does nothing."""
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum, frame):
        if flag["set"]:
            raise KeyboardInterrupt
        flag["set"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: flag["set"]
    finally:
        signal.signal(signal.SIGINT, previous)


__all__ = ["deferred_sigint"]
