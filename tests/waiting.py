"""Waiting in tests for something another thread or process does, without a fixed sleep."""
from __future__ import annotations

import time


def wait_for(predicate, timeout_s: float, what: str, step_s: float = 0.1):
    """The first truthy value of predicate(); AssertionError naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    raise AssertionError(f"gave up waiting for {what} after {timeout_s}s")
