"""Redis reads kept in this process's memory, dropped the moment Redis says the key changed.

Every waiting user polls; at 100,000 waiting that is tens of thousands of polls a second, nearly all asking about a
line that has not moved since the last one. Redis's server-assisted client-side caching (CLIENT TRACKING) makes
answering them from memory exact: a dedicated connection reads with tracking on, Redis remembers which keys it read,
and when one of them is written it pushes the key's name down that same connection (RESP3). Before serving anything
from memory we drain the connection (a non-blocking socket check), so a value is used only while no change to its
key has reached us. Redis queues the message while executing the write, so a poll that starts after a write has
returned finds the value gone, short of one window: Redis flushes the writer's reply and our message in the same
pass, writer first, so a reader woken by that reply can look a few microseconds too early. A poll repeated every few
seconds does not care; a caller that must read its own write turns on FENCE_READS, which makes every read one PING
on the tracking connection first (its reply comes after every message queued before it). The tests do. A broken
connection forgets everything; a value is also never older than MAX_AGE_S.

One view per process and connection pool; the web app and the GPU workers each build their own after forking.
"""
from __future__ import annotations

import os
import threading
import time
import weakref
from collections import OrderedDict

from redis.exceptions import RedisError

from portraits import metrics

FENCE_READS = False
MAX_AGE_S = 300.0
# About 1.3 KB a key (a waiting user's hash): at most ~65 MB a process; the least recently polled go first.
MAX_KEYS = 50_000


def as_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def as_hash(reply) -> dict:
    """HGETALL as a dict of str, whether the reply came as a RESP3 map or a RESP2 flat list."""
    if isinstance(reply, dict):
        return {as_text(k): as_text(v) for k, v in reply.items()}
    return {as_text(reply[i]): as_text(reply[i + 1]) for i in range(0, len(reply), 2)}


def _as_scores(reply) -> list[float]:
    """ZRANGE ... WITHSCORES as the sorted scores alone."""
    if reply and isinstance(reply[0], (list, tuple)):
        return [float(score) for _, score in reply]
    return [float(reply[i + 1]) for i in range(0, len(reply), 2)]


# kind -> (the read command, how its reply is kept)
KINDS = {
    "hash": (lambda key: ("HGETALL", key), as_hash),
    "text": (lambda key: ("GET", key), lambda reply: None if reply is None else as_text(reply)),
    "scores": (lambda key: ("ZRANGE", key, 0, -1, "WITHSCORES"), _as_scores),
    "count": (lambda key: ("ZCARD", key), int),
}


class LocalView:
    _views: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
    _views_lock = threading.Lock()

    @classmethod
    def of(cls, redis) -> "LocalView":
        pool = redis.connection_pool
        with cls._views_lock:
            view = cls._views.get(pool)
            if view is None:
                view = cls._views[pool] = cls(pool)
            return view

    @classmethod
    def forget(cls, redis) -> None:
        """Close the view of this client's pool, if there is one (the next read reconnects)."""
        with cls._views_lock:
            view = cls._views.get(redis.connection_pool)
        if view is not None:
            with view._lock:
                view._close()

    def __init__(self, pool):
        self._pool = pool
        self._lock = threading.Lock()
        self._values: OrderedDict[str, dict] = OrderedDict()  # key -> {kind: (value, read at)}
        self._reader = None
        self._pid = None
        self.hits = self.misses = self.invalidations = 0

    def read(self, specs: list[tuple[str, str]]) -> list:
        """Values for (kind, key) pairs, from memory where Redis has not said the key changed since."""
        with self._lock:
            try:
                return self._read(specs)
            except (RedisError, OSError):
                self._close()
                raise

    def _read(self, specs):
        if self._pid != os.getpid():
            self._connect()
        if FENCE_READS:
            self._reader.send_command("PING")
            self._reader.read_response()
        self._apply_invalidations()
        now = time.monotonic()
        missing = []
        for kind, key in specs:
            held = self._values.get(key, {}).get(kind)
            if held is None or now - held[1] > MAX_AGE_S:
                missing.append((kind, key))
        if missing:
            self.misses += 1
            metrics.POLL_CACHE_MISSES.inc()
            self._fetch(dict.fromkeys(missing), now)
        else:
            self.hits += 1
            metrics.POLL_CACHE_HITS.inc()
        for _, key in specs:
            self._values.move_to_end(key)
        while len(self._values) > MAX_KEYS:
            self._values.popitem(last=False)
        return [self._values[key][kind][0] for kind, key in specs]

    def _fetch(self, specs, now):
        # MULTI/EXEC so the values fetched together describe one moment, like the script they replace.
        commands = [("MULTI",), *(KINDS[kind][0](key) for kind, key in specs), ("EXEC",)]
        self._reader.send_packed_command(self._reader.pack_commands(commands))
        replies = [self._reader.read_response() for _ in commands][-1]
        for (kind, key), reply in zip(specs, replies):
            self._values.setdefault(key, {})[kind] = (KINDS[kind][1](reply), now)

    def _apply_invalidations(self):
        while self._reader.can_read(timeout=0):
            self._reader.read_response(push_request=True)

    def _invalidated(self, message):
        # RESP3 push: ["invalidate", [key, ...]], or ["invalidate", None] after FLUSHALL or a full tracking table.
        self.invalidations += 1
        keys = message[1] if len(message) > 1 else None
        if keys is None:
            self._values.clear()
            return
        for key in keys:
            self._values.pop(as_text(key), None)

    def _connect(self):
        self._close()
        reader = self._pool.make_connection()
        if str(reader.protocol) != "3":
            raise RedisError("client-side caching needs RESP3 (redis-py's default protocol)")
        # The parser calls this for every invalidation push, also one that arrives just ahead of a reply.
        reader._parser.set_invalidation_push_handler(self._invalidated)
        reader.send_command("CLIENT", "TRACKING", "on")
        reader.read_response()
        self._reader, self._pid = reader, os.getpid()

    def _close(self):
        # Without its connection nothing tells us what changed: forget everything, reconnect on the next read.
        if self._reader is not None and self._pid == os.getpid():
            try:
                self._reader.disconnect()
            except (RedisError, OSError):
                pass
        self._reader = self._pid = None
        self._values.clear()
