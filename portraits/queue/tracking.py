"""Queue position, progress and ETA, answered from Redis alone.

Each GPU job takes a ticket when it is enqueued and sits in a sorted set scored by that ticket, so its exact FIFO
position is one ZRANK (O(log n)) instead of RQ's LPOS scan. The ticket is taken by a Lua script queued in the same
MULTI/EXEC as RQ's push, so tickets and the queue list can never be ordered differently: jobs pushed to the back
draw rising tickets, jobs pushed to the front (retries, hand-backs) falling negative ones, exactly like RPUSH/LPUSH.

A subject (an avatar or a render) has a small hash the cheap poll reads: owner, state, job id, queue and progress.
Live GPU workers keep an entry scored by when their last heartbeat expires, so the ETA divides by the workers that
are alive now, not the ones that died without saying so.

The line is also kept in a shape whose parts rarely change, so each web process can answer polls from memory (see
portraits.queue.local_view): `lo`, the lowest back ticket still waiting; `holes`, back tickets above `lo` that left out of turn
(deleted avatars); `fronts`, the negative tickets waiting. Every back ticket from `lo` up to the last one issued is
waiting or a hole, so a back ticket t waits at len(fronts) + (t - lo) - (holes below t): only `lo` moves with each
job served, and the ticket is the waiting user's own. The sorted set stays the truth the tests compare against.
"""
from __future__ import annotations

import bisect
import functools
import math
import time

from redis.exceptions import RedisError

from portraits.queue.local_view import LocalView, as_hash, as_text
from portraits.queue.lanes import EXPRESS, LANE_QUEUES, QUEUE_KIND, QUEUE_LANE, STANDARD, LanePolicy

PREFIX = "portraits"
DEFAULT_DURATION_S = {"train": 600.0, "render": 60.0}
EWMA_WEIGHT = 0.2
# Within a lane GPU workers take renders before trainings, so renders waiting delay a training of that lane too.
SERVED_BEFORE = {train: (render,) for render, train in LANE_QUEUES.values()}
# Every GPU queue: the poll reads each one's waiting and running counts, since the lanes share the workers.
LANE_ORDER = tuple(name for lane in (EXPRESS, STANDARD) for name in LANE_QUEUES[lane])

# KEYS[1..4] of both scripts: waiting set, line hash, holes, fronts. leave() keeps lo/holes/fronts in step.
_LEAVE_FUNCTION = """
local function leave(job_id)
  local ticket = redis.call('ZSCORE', KEYS[1], job_id)
  if not ticket then return end
  redis.call('ZREM', KEYS[1], job_id)
  ticket = tonumber(ticket)
  if ticket < 0 then redis.call('ZREM', KEYS[4], string.format('%d', ticket)) return end
  local lo = tonumber(redis.call('HGET', KEYS[2], 'lo') or ticket)
  if ticket ~= lo then redis.call('ZADD', KEYS[3], ticket, string.format('%d', ticket)) return end
  lo = lo + 1
  while redis.call('ZSCORE', KEYS[3], string.format('%d', lo)) do
    redis.call('ZREM', KEYS[3], string.format('%d', lo))
    lo = lo + 1
  end
  redis.call('HSET', KEYS[2], 'lo', string.format('%d', lo))
end
"""

# KEYS[5], KEYS[6]: back and front ticket counters; KEYS[7], when given: the subject's hash.
_TICKET = _LEAVE_FUNCTION + """
leave(ARGV[1])
local ticket
if ARGV[2] == '1' then
  ticket = redis.call('DECR', KEYS[6])
  redis.call('ZADD', KEYS[4], ticket, string.format('%d', ticket))
else
  ticket = redis.call('INCR', KEYS[5])
  if not redis.call('HGET', KEYS[2], 'lo') then
    local first = redis.call('ZRANGEBYSCORE', KEYS[1], 0, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    redis.call('HSET', KEYS[2], 'lo', first[2] or ticket)
  end
end
redis.call('ZADD', KEYS[1], ticket, ARGV[1])
if KEYS[7] then redis.call('HSET', KEYS[7], 'job_id', ARGV[1], 'queue', ARGV[3], 'progress', 0, 'ticket', ticket) end
return ticket
"""

_LEAVE = _LEAVE_FUNCTION + """
for i = 1, #ARGV do leave(ARGV[i]) end
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
  numbers[#numbers + 1] = redis.call('HLEN', prefix .. ':running:' .. ARGV[i])
end
return {fields, numbers}
"""


def waiting_key(queue: str) -> str:
    return f"{PREFIX}:waiting:{queue}"


def line_keys(queue: str) -> list[str]:
    """The keys both line scripts take first: waiting set, line hash (lo), holes, fronts."""
    return [waiting_key(queue), f"{PREFIX}:line:{queue}", f"{PREFIX}:holes:{queue}", f"{PREFIX}:fronts:{queue}"]


def duration_key(queue: str) -> str:
    return f"{PREFIX}:duration:{queue}"


def running_key(queue: str) -> str:
    return f"{PREFIX}:running:{queue}"


def workers_key(queue: str) -> str:
    return f"{PREFIX}:workers:{queue}"


def subject_key(subject: str) -> str:
    return f"{PREFIX}:subject:{subject}"


class QueueTracker:
    def __init__(self, redis, policy: LanePolicy | None = None):
        self.redis = redis
        self.policy = policy or LanePolicy()

    # Registered on first use: the queue route builds a tracker per request and, answering from memory, runs none.
    @functools.cached_property
    def _ticket(self):
        return self.redis.register_script(_TICKET)

    @functools.cached_property
    def _poll(self):
        return self.redis.register_script(_POLL)

    @functools.cached_property
    def _leave(self):
        return self.redis.register_script(_LEAVE)

    # --- the waiting line -------------------------------------------------------------------------------------
    def waiting(self, queue: str, job_id: str, subject: str | None, *, front: bool = False, pipeline=None) -> None:
        """Take a ticket. Pass the pipeline RQ pushes the job on, so both happen in one transaction."""
        keys = line_keys(queue) + [f"{PREFIX}:tickets:{queue}", f"{PREFIX}:tickets-front:{queue}"]
        if subject:
            keys.append(subject_key(subject))
        self._ticket(keys=keys, args=[job_id, "1" if front else "0", queue], client=pipeline or self.redis)

    def left_line(self, queue: str, job_ids, pipeline) -> None:
        self._leave(keys=line_keys(queue), args=list(job_ids), client=pipeline)

    def started(self, queue: str, job_id: str) -> None:
        pipe = self.redis.pipeline()
        self.left_line(queue, [job_id], pipe)
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
        self.left_line(queue, [job_id], pipe)
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
        key = duration_key(queue)
        old = self.redis.get(key)
        value = seconds if old is None else (1 - EWMA_WEIGHT) * float(old) + EWMA_WEIGHT * seconds
        self.redis.set(key, value)

    def average_duration(self, queue: str) -> float:
        return self._duration(queue, self.redis.get(duration_key(queue)))

    @staticmethod
    def _duration(queue: str, raw) -> float:
        return float(raw) if raw not in (None, b"", "") else DEFAULT_DURATION_S.get(QUEUE_KIND.get(queue, queue), 60.0)

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
        return {as_text(k): float(v) for k, v in self.redis.hgetall(running_key(queue)).items()}

    # --- subjects ---------------------------------------------------------------------------------------------
    def set_subject(self, subject: str, **fields) -> None:
        self.redis.hset(subject_key(subject), mapping={k: ("" if v is None else v) for k, v in fields.items()})

    def subject(self, subject: str) -> dict:
        return as_hash(self.redis.hgetall(subject_key(subject)))

    def subject_job_ids(self, subjects: list[str]) -> list[str | None]:
        """The job id each subject is tracked with (None: not tracked), in one round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            for subject in subjects:
                pipe.hget(subject_key(subject), "job_id")
            return [as_text(raw) if raw is not None else None for raw in pipe.execute()]

    def forget_subject(self, subject: str) -> None:
        """The subject is deleted: its job leaves the line too, so nobody behind it waits for a ghost."""
        tracked = self.subject(subject)
        pipe = self.redis.pipeline()
        if tracked.get("queue") and tracked.get("job_id"):
            self.left_line(tracked["queue"], [tracked["job_id"]], pipe)
            pipe.hdel(running_key(tracked["queue"]), tracked["job_id"])
        pipe.delete(subject_key(subject))
        pipe.execute()

    # --- position and ETA -------------------------------------------------------------------------------------
    def poll(self, subject: str) -> tuple[dict, dict | None]:
        """(the subject's hash, its position); position is None when it has no job. From memory when nothing changed.

        Only the subject's hash is the user's own; everything else is shared by all who wait in that line, so a
        process reads it from Redis once per change, not once per poll (portraits.queue.local_view).
        """
        try:
            return self._poll_from_memory(LocalView.of(self.redis), subject)
        except RedisError:
            return self._run_poll(subject, "", "", None)  # Redis down or RESP2: this raises or answers the same

    def _poll_from_memory(self, view: LocalView, subject: str) -> tuple[dict, dict | None]:
        fields = view.read([("hash", subject_key(subject))])[0]
        queue, job_id, ticket = fields.get("queue"), fields.get("job_id"), fields.get("ticket")
        if not queue or not job_id:
            return fields, None
        if not ticket:
            return self._run_poll(subject, "", "", None)
        _, line, holes, fronts = line_keys(queue)
        line, holes, fronts, workers, *lines = view.read([
            ("hash", line), ("scores", holes), ("scores", fronts), ("scores", workers_key(queue)),
            *[spec for name in LANE_ORDER for spec in (("count", waiting_key(name)), ("text", duration_key(name)),
                                                       ("hash", running_key(name)))]])
        rank = line_rank(int(ticket), line, holes, fronts)
        running = lines[3 * LANE_ORDER.index(queue) + 2] if queue in LANE_ORDER else {}
        if rank < 0 and job_id not in running and fields.get("state") == "queued":
            return self._run_poll(subject, "", "", None)  # between two steps of a hand-back: ask the sorted set
        live = len(workers) - bisect.bisect_left(workers, time.time())
        counts = {name: LineCounts(lines[3 * i], self._duration(name, lines[3 * i + 1]), len(lines[3 * i + 2]))
                  for i, name in enumerate(LANE_ORDER)}
        return fields, self._estimate(queue, rank, live, job_id in running, float(fields.get("progress") or 0),
                                      counts)

    def position(self, queue: str, job_id: str, progress: float = 0.0) -> dict:
        """position 0 = next or running; ETA from the measured average and the workers serving the queue."""
        _, where = self._run_poll("", queue, job_id, progress)
        return where

    def _run_poll(self, subject: str, queue: str, job_id: str, progress: float | None):
        # Every GPU queue's counts come back, so the script needs no knowledge of which lane the subject is in.
        reply = self._poll(args=[PREFIX, time.time(), subject, queue, job_id, *LANE_ORDER])
        fields = as_hash(reply[0])
        if len(reply) < 2:
            return fields, None
        queue = queue or fields["queue"]
        if progress is None:
            progress = float(fields.get("progress") or 0)
        numbers = reply[1]
        rank, workers, running_count, running = int(numbers[0]), int(numbers[2]), int(numbers[3]), bool(int(numbers[4]))
        counts = {name: LineCounts(int(numbers[5 + 3 * i]), self._duration(name, numbers[6 + 3 * i]),
                                   int(numbers[7 + 3 * i])) for i, name in enumerate(LANE_ORDER)}
        counts.setdefault(queue, LineCounts(0, self._duration(queue, numbers[1]), running_count))
        return fields, self._estimate(queue, rank, workers, running, progress, counts)

    def new_job_estimate(self, queue: str) -> dict:
        """What a job enqueued now on `queue` would be told (the console's "ETA for a new job")."""
        counts = {name: LineCounts(self.waiting_count(name), self.average_duration(name), self.running_count(name))
                  for name in LANE_ORDER}
        counts.setdefault(queue, LineCounts(self.waiting_count(queue), self.average_duration(queue),
                                            self.running_count(queue)))
        return self._estimate(queue, counts[queue].waiting, self.live_workers(queue), False, 0.0, counts)

    def _estimate(self, queue: str, rank: int, live: int, running: bool, progress: float,
                  counts: dict[str, "LineCounts"]) -> dict:
        return lane_estimate(self.policy, queue, rank, live, running, progress, counts)


def line_rank(ticket: int, line: dict, holes: list[float], fronts: list[float]) -> int:
    """Place in the line from the line's compact shape (module docstring); -1 when the ticket is not waiting."""
    if ticket < 0:
        i = bisect.bisect_left(fronts, ticket)
        return i if i < len(fronts) and fronts[i] == ticket else -1
    lo = int(line.get("lo", ticket))
    i = bisect.bisect_left(holes, ticket)
    if ticket < lo or (i < len(holes) and holes[i] == ticket):
        return -1
    return len(fronts) + (ticket - lo) - i


def estimate(rank: int, average: float, workers: int, running_count: int, running: bool, progress: float,
             earlier: list[tuple[int, float]] = ()) -> dict:
    """Seconds until this job is done. `rank` -1: not waiting (running, or gone)."""
    if rank < 0:
        remaining = average * (1.0 - min(max(progress, 0.0), 1.0)) if running else 0.0
        return {"position": 0, "ahead": 0, "eta_seconds": int(math.ceil(remaining)), "running": running}
    workers = workers if workers > 0 else 1
    # Jobs ahead are served `workers` at a time; the ones running now are on average half done; work of queues
    # served first (renders ahead of trainings) is spread over the same workers. A lane may have half a worker
    # (lanes taking turns on one GPU, portraits.queue.lanes): then it is served every other job.
    busy = min(running_count, workers)
    eta = average * (math.floor(rank / workers) + 1) + (average / 2 if busy >= workers else 0.0)
    eta += sum(count * seconds for count, seconds in earlier) / workers
    return {"position": rank, "ahead": rank, "eta_seconds": int(math.ceil(eta)), "running": False}


class LineCounts(tuple):
    """One GPU queue's jobs waiting, measured average duration and jobs running."""

    def __new__(cls, waiting: int, average: float, running: int):
        return super().__new__(cls, (waiting, average, running))

    waiting = property(lambda self: self[0])
    average = property(lambda self: self[1])
    running = property(lambda self: self[2])


def lane_demand(counts: dict[str, LineCounts], lane: str) -> int:
    return sum(counts[name].waiting + counts[name].running for name in LANE_QUEUES[lane] if name in counts)


def lane_estimate(policy: LanePolicy, queue: str, rank: int, live: int, running: bool, progress: float,
                  counts: dict[str, LineCounts]) -> dict:
    """estimate() for a job of one lane: its position counts only its own lane's jobs (and its lane's renders,
    served first), on its lane's share of the live workers now (LanePolicy.lane_workers: express has its slots
    while standard work waits, standard every worker the express work there now leaves it)."""
    lane = QUEUE_LANE.get(queue, STANDARD)
    workers = policy.lane_workers(lane, live, lane_demand(counts, EXPRESS), lane_demand(counts, STANDARD))
    earlier = [(counts[name].waiting, counts[name].average) for name in SERVED_BEFORE.get(queue, ())]
    own = counts[queue]
    return {**estimate(rank, own.average, workers, own.running, running, progress, earlier), "lane": lane}
