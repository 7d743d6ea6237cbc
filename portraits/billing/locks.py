"""The per-order Redis lock that serialises the money paths of one order (see portraits.billing)."""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager

from redis.exceptions import LockError

from portraits import keys

log = logging.getLogger(__name__)

ORDER_LOCK_TIMEOUT_S = 30
ORDER_LOCK_WAIT_S = 20


class OrderBusy(RuntimeError):
    """Another process holds this order's lock for longer than we wait: try again later (callbacks answer 503)."""


_held = threading.local()


@contextmanager
def order_lock(services, order_id: str):
    """Per-order Redis lock, re-entrant within a thread (apply_payment may request a refund)."""
    held = getattr(_held, "ids", None)
    if held is None:
        held = _held.ids = set()
    if order_id in held:
        yield
        return
    lock = services.redis.lock(keys.order_lock(order_id), timeout=ORDER_LOCK_TIMEOUT_S,
                               blocking_timeout=ORDER_LOCK_WAIT_S)
    if not lock.acquire():
        raise OrderBusy(order_id)
    held.add(order_id)
    try:
        yield
    finally:
        held.discard(order_id)
        try:
            lock.release()
        except LockError:  # expired meanwhile; the compare-and-set updates still kept us right
            log.warning("order lock for %s expired before release", order_id)
