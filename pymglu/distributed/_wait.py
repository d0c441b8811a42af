"""Waiting on a request with a deadline: the one place the backends turn a hang into an exception."""
from __future__ import annotations

import time
from typing import Callable

from pymglu.distributed.comm import DistributedTimeoutError

__all__ = ["wait_until"]


def wait_until(done: Callable[[], bool], timeout: float | None, what: str) -> None:
    """Poll ``done()`` until it returns True; raise :class:`DistributedTimeoutError` naming ``what`` after
    ``timeout`` seconds (``None``: no limit). Sleeps grow from 0 to 1 ms between polls, so a collective
    that completes at once costs no sleep and a long one costs at most 1 ms of extra latency."""
    if done():
        return
    start = time.monotonic()
    pause = 0.0
    while not done():
        elapsed = time.monotonic() - start
        if timeout is not None and elapsed > timeout:
            raise DistributedTimeoutError(
                f"{what}: no answer from the other ranks after {timeout:g} s (a rank died, hangs, or left "
                "the training loop early); stopping instead of waiting forever")
        if pause:
            time.sleep(pause)
        pause = min(1e-3, pause + 5e-5)
