"""Queue position, progress and ETA, answered from Redis alone.

Each GPU job takes a ticket from a per-queue counter when it is enqueued and sits in a sorted set scored by that
ticket, so its exact FIFO position is one ZRANK (O(log n)) instead of RQ's LPOS scan. A subject (an avatar or a
render) has a small hash the cheap poll reads: owner, state, job id and progress.
"""
from __future__ import annotations

import math
import time

from rq import Queue, Worker

PREFIX = "portraits"
DEFAULT_DURATION_S = {"train": 600.0, "render": 60.0}
EWMA_WEIGHT = 0.2


def _waiting(queue: str) -> str:
    return f"{PREFIX}:waiting:{queue}"


def _running(queue: str) -> str:
    return f"{PREFIX}:running:{queue}"


def subject_key(subject: str) -> str:
    return f"{PREFIX}:subject:{subject}"


class QueueTracker:
    def __init__(self, redis):
        self.redis = redis

    def waiting(self, queue: str, job_id: str, subject: str | None) -> None:
        ticket = self.redis.incr(f"{PREFIX}:tickets:{queue}")
        pipe = self.redis.pipeline()
        pipe.zadd(_waiting(queue), {job_id: ticket}, nx=True)
        if subject:
            pipe.hset(subject_key(subject), mapping={"job_id": job_id, "queue": queue, "progress": 0})
        pipe.execute()

    def started(self, queue: str, job_id: str) -> None:
        pipe = self.redis.pipeline()
        pipe.zrem(_waiting(queue), job_id)
        pipe.hset(_running(queue), job_id, time.time())
        pipe.execute()

    def finished(self, queue: str, job_id: str, *, measure: bool) -> None:
        started = self.redis.hget(_running(queue), job_id)
        pipe = self.redis.pipeline()
        pipe.zrem(_waiting(queue), job_id)
        pipe.hdel(_running(queue), job_id)
        pipe.execute()
        if measure and started is not None:
            self.record_duration(queue, time.time() - float(started))

    def record_duration(self, queue: str, seconds: float) -> None:
        key = f"{PREFIX}:duration:{queue}"
        old = self.redis.get(key)
        value = seconds if old is None else (1 - EWMA_WEIGHT) * float(old) + EWMA_WEIGHT * seconds
        self.redis.set(key, value)

    def average_duration(self, queue: str) -> float:
        value = self.redis.get(f"{PREFIX}:duration:{queue}")
        return float(value) if value is not None else DEFAULT_DURATION_S.get(queue, 60.0)

    def live_workers(self, queue: str) -> int:
        return Worker.count(connection=self.redis, queue=Queue(queue, connection=self.redis))

    def waiting_count(self, queue: str) -> int:
        return self.redis.zcard(_waiting(queue))

    def running_count(self, queue: str) -> int:
        return self.redis.hlen(_running(queue))

    def set_subject(self, subject: str, **fields) -> None:
        self.redis.hset(subject_key(subject), mapping={k: ("" if v is None else v) for k, v in fields.items()})

    def subject(self, subject: str) -> dict:
        raw = self.redis.hgetall(subject_key(subject))
        return {k.decode(): v.decode() for k, v in raw.items()}

    def forget_subject(self, subject: str) -> None:
        self.redis.delete(subject_key(subject))

    def position(self, queue: str, job_id: str, progress: float = 0.0) -> dict:
        """position 0 = next or running; ETA from the measured average and the workers serving the queue."""
        rank = self.redis.zrank(_waiting(queue), job_id)
        average = self.average_duration(queue)
        workers = max(self.live_workers(queue), 1)
        if rank is None:
            running = self.redis.hexists(_running(queue), job_id)
            remaining = average * (1.0 - min(max(progress, 0.0), 1.0)) if running else 0.0
            return {"position": 0, "ahead": 0, "eta_seconds": int(math.ceil(remaining)), "running": running}
        # Jobs ahead are served `workers` at a time; the ones running now are on average half done.
        busy = min(self.running_count(queue), workers)
        eta = average * (rank // workers + 1) + (average / 2 if busy >= workers else 0.0)
        return {"position": rank, "ahead": rank, "eta_seconds": int(math.ceil(eta)), "running": False}
