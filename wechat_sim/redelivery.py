"""WeChat Pay's own redelivery of callbacks the merchant has not acknowledged.

WeChat Pay POSTs a notification again and again until the merchant's notify_url answers 2xx, at the documented
intervals below (about 24 h 4 min in all), each time the same notification (same id and body) freshly signed. Here
one background thread keeps a heap of due retries; intervals are multiplied by a scale so tests can compress the
day into milliseconds. Deliveries themselves go through WeChatSimulator.deliver, which records every attempt; the
thread sends them one at a time, so a receiver that times out (callback_timeout_s) delays other retries due
meanwhile by that much, and each retry's interval counts from the end of the attempt before it.
"""
from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wechat_sim.simulator import WeChatSimulator

# 15s/15s/30s/3m/10m/20m/30m/30m/30m/60m/3h/3h/3h/6h/6h: the waits before retries 1..15 after the first delivery.
REDELIVERY_INTERVALS_S: tuple[float, ...] = (15, 15, 30, 180, 600, 1200, 1800, 1800, 1800, 3600,
                                             10800, 10800, 10800, 21600, 21600)


class RedeliveryScheduler:
    """One thread, one heap of (due, seq, notification_id, retry). The thread starts with the first retry it is
    given and ends with stop(). Pending retries are checked against the notification's record when they fall due,
    so a reset, an acknowledgement in between (a manual redelivery answered 2xx) or a duplicate entry skips them."""

    def __init__(self, sim: WeChatSimulator, scale: float, intervals: tuple[float, ...] = REDELIVERY_INTERVALS_S):
        if scale < 0:
            raise ValueError("redelivery_scale must be >= 0 (or None for no automatic redelivery)")
        self.sim = sim
        self.scale = float(scale)
        self.intervals = tuple(intervals)
        self._heap: list[tuple[float, int, str, int]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def delay_s(self, retry: int) -> float:
        """How long after the previous attempt retry `retry` (0-based) goes out."""
        return self.intervals[retry] * self.scale

    def schedule(self, notification_id: str, retry: int) -> float | None:
        """Queue retry `retry` of a notification; its due time (epoch seconds), or None once stopped."""
        delay = self.delay_s(retry)
        with self._cond:
            if self._stopped:
                return None
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), notification_id, retry))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="wechat-sim-redelivery", daemon=True)
                self._thread.start()
            self._cond.notify()
        return time.time() + delay

    def clear(self) -> None:
        with self._cond:
            self._heap.clear()
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._heap)

    def stop(self, timeout_s: float | None = None) -> None:
        """No retry goes out after this returns, except one already being sent (waited for up to timeout_s)."""
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.sim.callback_timeout_s + 5 if timeout_s is None else timeout_s)

    def _next_due(self) -> tuple[str, int] | None:
        """Block until an entry is due (its notification_id, retry) or the scheduler stops (None)."""
        with self._cond:
            while not self._stopped:
                if not self._heap:
                    self._cond.wait()
                    continue
                wait_s = self._heap[0][0] - time.monotonic()
                if wait_s > 0:
                    self._cond.wait(wait_s)
                    continue
                _, _, notification_id, retry = heapq.heappop(self._heap)
                return notification_id, retry
        return None

    def _run(self) -> None:
        while (due := self._next_due()) is not None:
            notification_id, retry = due
            try:
                self.sim.redeliver_due(notification_id, retry)
            except Exception:  # noqa: BLE001 - a broken record must not end WeChat's retries for the others
                pass
