"""Waiting in the tests for what another thread or process makes happen (a DDS delivery, a
worker's result, a subprocess's exit): poll a condition until it holds or a limit passes. The
limit bounds a wait for an event; nothing asserts how long the event took."""
from __future__ import annotations

import time
from typing import Callable

__all__ = ["wait_for"]


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, period: float = 0.02) -> bool:
    """True once ``predicate()`` is true, polling every ``period`` s; its last value after ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(period)
    return bool(predicate())
