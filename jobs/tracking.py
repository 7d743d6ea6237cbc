"""Queue position, progress and ETA, answered from Redis alone.

Each GPU job takes a ticket when it is enqueued and sits in a sorted set scored by that ticket, so its exact FIFO
position is one ZRANK (O(log n)) instead of RQ's LPOS scan. The ticket is taken by a Lua script queued in the same
MULTI/EXEC as RQ's push, so tickets and the queue list can never be ordered differently: jobs pushed to the back
draw rising tickets, jobs pushed to the front (retries, hand-backs) falling negative ones, exactly like RPUSH/LPUSH.

A subject (an avatar or a render) has a small hash the cheap poll reads: owner, state, job id, queue and progress.
Live GPU workers keep an entry scored by when their last heartbeat expires, so the ETA divides by the workers that
are alive now, not the ones that died without saying so.
"""
from __future__ import annotations

import math
import time

PREFIX = "portraits"
DEFAULT_DURATION_S = {"train": 600.0, "render": 60.0}
EWMA_WEIGHT = 0.2
# GPU workers take renders before trainings, so renders waiting delay a training too.
SERVED_BEFORE = {"train": ("render",)}

_TICKET = """
local ticket
if ARGV[2] == '1' then ticket = redis.call('DECR', KEYS[3]) else ticket = redis.call('INCR', KEYS[2]) end
redis.call('ZADD', KEYS[1], ticket, ARGV[1])
if KEYS[4] then redis.call('HSET', KEYS[4], 'job_id', ARGV[1], 'queue', ARGV[3], 'progress', 0) end
return ticket
"""

# One round trip for the hot poll: the subject's hash and everything its ETA needs.
_POLL = """
local prefix, now = ARGV[1], ARGV[2]
local fields, queue, job_id = {}, ARGV[4], ARGV[5]
if ARGV[3] ~= '' then
  fields = redis.call('HGETALL', prefix .. ':subject:' .. ARGV[3])
  for i = 1, #fields, 2 do
    if fields[i] == 'queue' then queue = fields[i + 1] elseif fields[i] == 'job_id' then job_id = fields[i + 1] end
  end
end
if queue == '' or job_id == '' then return {fields} end
local running = prefix .. ':running:' .. queue
local rank = redis.call('ZRANK', prefix .. ':waiting:' .. queue, job_id)
local numbers = {rank or -1, redis.call('GET', prefix .. ':duration:' .. queue) or '',
                 redis.call('ZCOUNT', prefix .. ':workers:' .. queue, now, '+inf'), redis.call('HLEN', running),
                 redis.call('HEXISTS', running, job_id)}
for i = 6, #ARGV do
  numbers[#numbers + 1] = redis.call('ZCARD', prefix .. ':waiting:' .. ARGV[i])
  numbers[#numbers + 1] = redis.call('GET', prefix .. ':duration:' .. ARGV[i]) or ''
end
return {fields, numbers}
"""


def waiting_key(queue: str) -> str:
    return f"{PREFIX}:waiting:{queue}"


def running_key(queue: str) -> str:
    return f"{PREFIX}:running:{queue}"


def workers_key(queue: str) -> str:
    return f"{PREFIX}:workers:{queue}"


def subject_key(subject: str) -> str:
    return f"{PREFIX}:subject:{subject}"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class QueueTracker:
    def __init__(self, redis):
        self.redis = redis
        self._ticket = redis.register_script(_TICKET)
        self._poll = redis.register_script(_POLL)

    # --- the waiting line -------------------------------------------------------------------------------------
    def waiting(self, queue: str, job_id: str, subject: str | None, *, front: bool = False, pipeline=None) -> None:
        """Take a ticket. Pass the pipeline RQ pushes the job on, so both happen in one transaction."""
        keys = [waiting_key(queue), f"{PREFIX}:tickets:{queue}", f"{PREFIX}:tickets-front:{queue}"]
        if subject:
            keys.append(subject_key(subject))
        self._ticket(keys=keys, args=[job_id, "1" if front else "0", queue], client=pipeline or self.redis)

    def started(self, queue: str, job_id: str) -> None:
        pipe = self.redis.pipeline()
        pipe.zrem(waiting_key(queue), job_id)
        pipe.hset(running_key(queue), job_id, time.time())
        pipe.execute()

    def finished(self, queue: str, job_id: str, *, measure: bool) -> None:
        started = self.redis.hget(running_key(queue), job_id)
        self.drop(queue, job_id)
        if measure and started is not None:
            self.record_duration(queue, time.time() - float(started))

    def drop(self, queue: str, job_id: str) -> None:
        """The job is neither waiting nor running any more (finished, lost, deleted)."""
        pipe = self.redis.pipeline()
        pipe.zrem(waiting_key(queue), job_id)
        pipe.hdel(running_key(queue), job_id)
        pipe.execute()

    def handed_back(self, queue: str, job_id: str, subject: str | None, pipeline=None) -> None:
        """A running job went back to the front of the line (worker asked to stop)."""
        pipe = pipeline or self.redis.pipeline()
        pipe.hdel(running_key(queue), job_id)
        self.waiting(queue, job_id, subject, front=True, pipeline=pipe)
        if pipeline is None:
            pipe.execute()

    # --- measured durations and workers -----------------------------------------------------------------------
    def record_duration(self, queue: str, seconds: float) -> None:
        key = f"{PREFIX}:duration:{queue}"
        old = self.redis.get(key)
        value = seconds if old is None else (1 - EWMA_WEIGHT) * float(old) + EWMA_WEIGHT * seconds
        self.redis.set(key, value)

    def average_duration(self, queue: str) -> float:
        return self._duration(queue, self.redis.get(f"{PREFIX}:duration:{queue}"))

    @staticmethod
    def _duration(queue: str, raw) -> float:
        return float(raw) if raw not in (None, b"", "") else DEFAULT_DURATION_S.get(queue, 60.0)

    def worker_alive(self, queues, worker_name: str, ttl_s: float, pipeline=None) -> None:
        connection = pipeline or self.redis.pipeline()
        now = time.time()
        for queue in queues:
            connection.zadd(workers_key(queue), {worker_name: now + ttl_s})
            connection.zremrangebyscore(workers_key(queue), "-inf", now - 3600)
        if pipeline is None:
            connection.execute()

    def worker_gone(self, queues, worker_name: str) -> None:
        pipe = self.redis.pipeline()
        for queue in queues:
            pipe.zrem(workers_key(queue), worker_name)
        pipe.execute()

    def live_workers(self, queue: str) -> int:
        return int(self.redis.zcount(workers_key(queue), time.time(), "+inf"))

    def waiting_count(self, queue: str) -> int:
        return self.redis.zcard(waiting_key(queue))

    def running_count(self, queue: str) -> int:
        return self.redis.hlen(running_key(queue))

    def running_jobs(self, queue: str) -> dict[str, float]:
        return {_text(k): float(v) for k, v in self.redis.hgetall(running_key(queue)).items()}

    # --- subjects ---------------------------------------------------------------------------------------------
    def set_subject(self, subject: str, **fields) -> None:
        self.redis.hset(subject_key(subject), mapping={k: ("" if v is None else v) for k, v in fields.items()})

    def subject(self, subject: str) -> dict:
        raw = self.redis.hgetall(subject_key(subject))
        return {_text(k): _text(v) for k, v in raw.items()}

    def forget_subject(self, subject: str) -> None:
        """The subject is deleted: its job leaves the line too, so nobody behind it waits for a ghost."""
        tracked = self.subject(subject)
        pipe = self.redis.pipeline()
        if tracked.get("queue") and tracked.get("job_id"):
            pipe.zrem(waiting_key(tracked["queue"]), tracked["job_id"])
            pipe.hdel(running_key(tracked["queue"]), tracked["job_id"])
        pipe.delete(subject_key(subject))
        pipe.execute()

    # --- position and ETA -------------------------------------------------------------------------------------
    def poll(self, subject: str) -> tuple[dict, dict | None]:
        """(the subject's hash, its position) in one round trip; position is None when it has no job."""
        return self._run_poll(subject, "", "", None)

    def position(self, queue: str, job_id: str, progress: float = 0.0) -> dict:
        """position 0 = next or running; ETA from the measured average and the workers serving the queue."""
        _, where = self._run_poll("", queue, job_id, progress)
        return where

    def _run_poll(self, subject: str, queue: str, job_id: str, progress: float | None):
        # The queues served first are named up front; a subject's queue is only known inside the script.
        before = SERVED_BEFORE.get(queue, ()) if queue else SERVED_BEFORE["train"]
        reply = self._poll(args=[PREFIX, time.time(), subject, queue, job_id, *before])
        raw = reply[0]
        fields = {_text(raw[i]): _text(raw[i + 1]) for i in range(0, len(raw), 2)}
        if len(reply) < 2:
            return fields, None
        queue = queue or fields["queue"]
        if progress is None:
            progress = float(fields.get("progress") or 0)
        numbers = reply[1]
        rank, average, workers, running_count, running = (int(numbers[0]), self._duration(queue, numbers[1]),
                                                          int(numbers[2]), int(numbers[3]), bool(int(numbers[4])))
        earlier = []
        if queue in SERVED_BEFORE:
            earlier = [(int(numbers[5 + 2 * i]), self._duration(name, numbers[6 + 2 * i]))
                       for i, name in enumerate(before)]
        return fields, estimate(rank, average, workers, running_count, running, progress, earlier)


def estimate(rank: int, average: float, workers: int, running_count: int, running: bool, progress: float,
             earlier: list[tuple[int, float]] = ()) -> dict:
    """Seconds until this job is done. `rank` -1: not waiting (running, or gone)."""
    if rank < 0:
        remaining = average * (1.0 - min(max(progress, 0.0), 1.0)) if running else 0.0
        return {"position": 0, "ahead": 0, "eta_seconds": int(math.ceil(remaining)), "running": running}
    workers = max(workers, 1)
    # Jobs ahead are served `workers` at a time; the ones running now are on average half done; work of queues
    # served first (renders ahead of trainings) is spread over the same workers.
    busy = min(running_count, workers)
    eta = average * (rank // workers + 1) + (average / 2 if busy >= workers else 0.0)
    eta += sum(count * seconds for count, seconds in earlier) / workers
    return {"position": rank, "ahead": rank, "eta_seconds": int(math.ceil(eta)), "running": False}
