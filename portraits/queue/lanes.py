"""Lanes: the express tier's GPU work waits in queues of its own, served by a share of the GPU workers.

Every GPU worker listens to all four queues (renders before trainings within a lane). Before each job it asks which
lane comes first for it:

- **express first** while fewer workers are busy with express than the express slots, `ceil(EXPRESS_GPU_SHARE * N)`
  of the N live GPU workers, never more than `floor(EXPRESS_GPU_CAP * N)`: so express users wait only behind express
  users (and for a running job to end), and at least N - floor(cap * N) workers always take standard work first;
- **standard first** otherwise; a worker still takes express work when no standard work waits (no GPU idles while
  anything waits, and no standard user is starved by it).

When the cap leaves express no whole worker (floor(cap * N) < 1: one GPU with the default cap of 0.5) the lanes take
turns while both have work: express first unless the last job started was express and standard work waits.

The slots are a Redis sorted set of the workers busy with express, scored by when their claim lapses (a worker that
died frees its slot within WORKER_DEAD_AFTER_S); taking one is a Lua script, so two workers never both take the
last slot. `lane_workers` is the same rule seen from a waiting job: how many workers its lane has, which is what
the queue poll's ETA divides by (portraits.queue.tracking).
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

STANDARD = "standard"
EXPRESS = "express"
LANES = (STANDARD, EXPRESS)
# (render queue, train queue) of each lane; the standard lane keeps the queue names it always had.
LANE_QUEUES = {STANDARD: ("render", "train"), EXPRESS: ("render_express", "train_express")}
QUEUE_LANE = {name: lane for lane, names in LANE_QUEUES.items() for name in names}
# What a queue holds: "render" or "train" (their measured durations are kept per queue, so per lane).
QUEUE_KIND = {name: ("render", "train")[i] for names in LANE_QUEUES.values() for i, name in enumerate(names)}

BUSY_KEY = "portraits:lanes:express-busy"
LAST_LANE_KEY = "portraits:lanes:last-started"

# KEYS[1] busy set, KEYS[2] last lane started, KEYS[3..] the standard lane's RQ queue lists (what a worker can pop).
# ARGV: worker, slots (whole), alternate (1/0), now, claim expiry. Nothing standard waiting: express first, no claim.
_TAKE_SLOT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[4])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
local standard_waiting = 0
for i = 3, #KEYS do standard_waiting = standard_waiting + redis.call('LLEN', KEYS[i]) end
if standard_waiting == 0 then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
if ARGV[3] == '1' and redis.call('GET', KEYS[2]) == 'express' then return 0 end
redis.call('ZADD', KEYS[1], ARGV[5], ARGV[1])
return 1
"""


def queue_for(kind: str, lane: str) -> str:
    """The queue a render or training of this lane waits in."""
    return LANE_QUEUES[lane if lane in LANE_QUEUES else STANDARD][("render", "train").index(kind)]


def lane_of(doc: dict | None) -> str:
    """An order's, avatar's or render's lane (documents from before lanes are standard)."""
    lane = (doc or {}).get("lane")
    return lane if lane in LANES else STANDARD


@dataclass(frozen=True)
class LanePolicy:
    share: float = 0.25
    cap: float = 0.5

    @classmethod
    def of(cls, settings) -> "LanePolicy":
        return cls(share=settings.express_gpu_share, cap=settings.express_gpu_cap)

    def express_slots(self, live: int) -> int:
        """Workers that take express first when both lanes have work (at least one)."""
        live = max(live, 1)
        return max(1, min(math.ceil(self.share * live), math.floor(self.cap * live)))

    def alternates(self, live: int) -> bool:
        """True when the cap leaves express no whole worker: the lanes then take turns."""
        return math.floor(self.cap * max(live, 1)) < 1

    def express_share_of_slots(self, live: int) -> float:
        """Workers' worth express gets while standard work waits (half a worker when the lanes take turns)."""
        return 0.5 if self.alternates(live) else float(self.express_slots(live))

    def lane_workers(self, lane: str, live: int, express_demand: int, standard_demand: int) -> float:
        """How many workers serve a lane now, given each lane's jobs waiting or running (see the module docstring)."""
        live = max(live, 1)
        express = self.express_share_of_slots(live)
        if lane == EXPRESS:
            return express if standard_demand > 0 else float(live)
        return live - min(express, float(express_demand))

    def may_take_express_first(self, busy: int, holds_slot: bool, standard_waiting: int, last_lane: str | None,
                               live: int) -> bool:
        """The slot rule the Lua script applies atomically (kept here, in Python, for the bench and the tests)."""
        if holds_slot or standard_waiting == 0:
            return True
        if busy >= self.express_slots(live):
            return False
        return not (self.alternates(live) and last_lane == EXPRESS)


class ExpressSlots:
    """The workers busy with express work, in Redis."""

    def __init__(self, redis):
        self.redis = redis

    @functools.cached_property
    def _take(self):
        return self.redis.register_script(_TAKE_SLOT)

    def take(self, policy: LanePolicy, worker: str, live: int, claim_s: float, standard_lists: list[str]) -> bool:
        """Claim an express slot for this worker's next job; False: it takes standard work first. standard_lists:
        the Redis lists the standard lane's jobs wait in (RQ's queue keys)."""
        now = time.time()
        args = [worker, policy.express_slots(live), "1" if policy.alternates(live) else "0", now, now + claim_s]
        return bool(self._take(keys=[BUSY_KEY, LAST_LANE_KEY, *standard_lists], args=args))

    def hold(self, worker: str, claim_s: float, lane: str) -> None:
        """The worker started a job of `lane`: an express job keeps (or takes) a slot, a standard one frees it."""
        with self.redis.pipeline() as pipe:
            if lane == EXPRESS:
                pipe.zadd(BUSY_KEY, {worker: time.time() + claim_s})
            else:
                pipe.zrem(BUSY_KEY, worker)
            pipe.set(LAST_LANE_KEY, lane)
            pipe.execute()

    def release(self, worker: str) -> None:
        self.redis.zrem(BUSY_KEY, worker)

    def busy(self) -> int:
        return int(self.redis.zcount(BUSY_KEY, time.time(), "+inf"))

    def last_lane(self) -> str | None:
        raw = self.redis.get(LAST_LANE_KEY)
        return raw.decode() if isinstance(raw, bytes) else raw
