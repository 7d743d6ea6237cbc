"""ETA error per lane over a simulated day of arrivals, against the lane scheduler.

    python bench/bench_express_eta.py [--workers 4] [--per-day 450] [--express 0.12] [--seed 7] [--share 0.25]
                                      [--cap 0.5] [--noise 0.3]

A discrete-event simulation of one day: avatars are paid for (a Poisson process whose rate follows the day: quiet at
night, busiest in the evening), `--express` of them on the express sku. Each one's training, then one render set,
runs on `--workers` GPU workers that choose their next job by the rule the real workers apply
(portraits.queue.lanes.LanePolicy.may_take_express_first: express first while an express slot is free, standard
first otherwise, never idle while anything waits). Durations are drawn around a real SD1.5 LoRA's (training 600 s,
render 60 s) with log-normal noise (`--noise`, the sigma), and the tracker's measured average is the same EWMA
QueueTracker.record_duration keeps, per queue (so per lane).

At payment each avatar is told the ETA the queue poll would tell it (portraits.queue.tracking.lane_estimate: its
lane's position, its lane's share of the workers, its lane's renders served first); the naive baseline, in the same
run, is what the poll said before lanes: one line for everyone (every training waiting, both lanes), all workers,
one pooled average. Actual: payment to the end of its training.

Prints, per lane: avatars, median and p90 of |ETA - actual| (ours and naive, and ours / naive), median and p90 of
the wait (payment to training start), and how many express promises (PROMISED_WAIT_S + margin) were broken.

Measured (defaults: 481 avatars, 4 workers, about 88% of the GPUs' day busy, seed 7):

    lane          n  |err| p50      p90  naive p50      p90  ours/naive p50    p90  wait p50      p90  broken
    express      56       203s     639s      1300s   15386s            0.16   0.04       77s    1216s       2
    standard    425       528s    4090s      1034s    5266s            0.51   0.78     8206s   19454s       -

With 8 workers and 900 a day: express 134 s / 386 s (0.03 of naive), standard 443 s / 2418 s (0.46 / 0.59 of naive).
On one GPU (`--workers 1 --per-day 110 --express 0.1`) the standard lane's ETA is worse than the naive one (1.39 /
1.68): it counts half a worker while express work is present, but over a wait of hours express takes far less of
the one GPU than half. Both ETAs leave out the renders and the express work that arrive after the ETA is given.
"""
from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from portraits.queue.lanes import EXPRESS, LANE_QUEUES, QUEUE_KIND, QUEUE_LANE, STANDARD, LanePolicy  # noqa: E402
from portraits.queue.tracking import (DEFAULT_DURATION_S, EWMA_WEIGHT, LANE_ORDER, LineCounts, estimate,  # noqa: E402
                                      lane_estimate)

DAY_S = 24 * 3600
MEAN_S = {"train": 600.0, "render": 60.0}
PROMISED_WAIT_S, MARGIN_S = 1800, 300


def arrivals(rng: random.Random, per_day: float) -> list[float]:
    """Payment times over a day: rate ∝ 1 + 0.8·sin, lowest at 04:00, highest at 16:00 (thinning)."""
    peak = per_day / DAY_S * 1.8
    times, t = [], 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= DAY_S:
            return times
        rate = per_day / DAY_S * (1 + 0.8 * math.sin(2 * math.pi * (t / DAY_S - 10 / 24)))
        if rng.random() < rate / peak:
            times.append(t)


class Simulation:
    def __init__(self, args):
        self.rng = random.Random(args.seed)
        self.policy = LanePolicy(share=args.share, cap=args.cap)
        self.workers = args.workers
        self.noise = args.noise
        self.lines = {name: [] for name in LANE_ORDER}  # FIFO of job dicts
        self.running = {name: 0 for name in LANE_ORDER}
        self.average = {name: DEFAULT_DURATION_S[QUEUE_KIND[name]] for name in LANE_ORDER}
        self.pooled = dict(DEFAULT_DURATION_S)
        self.express_busy = 0
        self.last_lane = None
        self.idle = args.workers
        self.events: list = []
        self.seq = 0
        self.avatars: list[dict] = []
        express_share = args.express
        for at in arrivals(self.rng, args.per_day):
            lane = EXPRESS if self.rng.random() < express_share else STANDARD
            self.push(at, "arrive", {"lane": lane})

    def push(self, at: float, kind: str, data: dict) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, data))

    def counts(self) -> dict:
        return {name: LineCounts(len(self.lines[name]), self.average[name], self.running[name])
                for name in LANE_ORDER}

    def told(self, queue: str) -> tuple[int, int]:
        """(our ETA, the naive one) for a job joining `queue` now."""
        counts = self.counts()
        ours = lane_estimate(self.policy, queue, len(self.lines[queue]), self.workers, False, 0.0, counts)
        trains = [name for name in LANE_ORDER if QUEUE_KIND[name] == "train"]
        renders = [name for name in LANE_ORDER if QUEUE_KIND[name] == "render"]
        naive = estimate(sum(len(self.lines[n]) for n in trains), self.pooled["train"], self.workers,
                         sum(self.running.values()), False, 0.0,
                         [(sum(len(self.lines[n]) for n in renders), self.pooled["render"])])
        return ours["eta_seconds"], naive["eta_seconds"]

    def draw(self, kind: str) -> float:
        return MEAN_S[kind] * math.exp(self.rng.gauss(-self.noise ** 2 / 2, self.noise))

    def next_job(self):
        standard_waiting = sum(len(self.lines[n]) for n in LANE_QUEUES[STANDARD])
        express_first = self.policy.may_take_express_first(self.express_busy, False, standard_waiting,
                                                           self.last_lane, self.workers)
        first, second = (EXPRESS, STANDARD) if express_first else (STANDARD, EXPRESS)
        for name in (*LANE_QUEUES[first], *LANE_QUEUES[second]):
            if self.lines[name]:
                return name, self.lines[name].pop(0)
        return None, None

    def dispatch(self, now: float) -> None:
        while self.idle:
            queue, job = self.next_job()
            if job is None:
                return
            self.idle -= 1
            lane = QUEUE_LANE[queue]
            self.express_busy += lane == EXPRESS
            self.last_lane = lane
            self.running[queue] += 1
            if QUEUE_KIND[queue] == "train":
                job["started"] = now
            self.push(now + self.draw(QUEUE_KIND[queue]), "done", {"queue": queue, "job": job, "started": now})

    def run(self) -> list[dict]:
        while self.events:
            now, _, kind, data = heapq.heappop(self.events)
            if kind == "arrive":
                queue = LANE_QUEUES[data["lane"]][1]
                ours, naive = self.told(queue)
                avatar = {"lane": data["lane"], "paid": now, "eta": ours, "naive": naive}
                self.avatars.append(avatar)
                self.lines[queue].append(avatar)
            else:
                queue, job = data["queue"], data["job"]
                self.idle += 1
                self.running[queue] -= 1
                self.express_busy -= QUEUE_LANE[queue] == EXPRESS
                seconds = now - data["started"]
                self.average[queue] = (1 - EWMA_WEIGHT) * self.average[queue] + EWMA_WEIGHT * seconds
                kind_of = QUEUE_KIND[queue]
                self.pooled[kind_of] = (1 - EWMA_WEIGHT) * self.pooled[kind_of] + EWMA_WEIGHT * seconds
                if kind_of == "train":
                    job["trained"] = now
                    self.lines[LANE_QUEUES[job["lane"]][0]].append({"lane": job["lane"]})  # its first render set
            self.dispatch(now)
        return self.avatars


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--per-day", type=float, default=450.0, help="avatars paid for in the day")
    parser.add_argument("--express", type=float, default=0.12, help="share of them on the express sku")
    parser.add_argument("--share", type=float, default=0.25, help="EXPRESS_GPU_SHARE")
    parser.add_argument("--cap", type=float, default=0.5, help="EXPRESS_GPU_CAP")
    parser.add_argument("--noise", type=float, default=0.3, help="log-normal sigma of job durations")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    avatars = Simulation(args).run()
    print(f"{len(avatars)} avatars in a day on {args.workers} GPU workers, {args.express:.0%} express, "
          f"share {args.share}, cap {args.cap}, duration noise sigma {args.noise}")
    print(f"{'lane':9} {'n':>5} {'|err| p50':>10} {'p90':>8} {'naive p50':>10} {'p90':>8} {'ours/naive p50':>15} "
          f"{'p90':>6} {'wait p50':>9} {'p90':>8} {'broken':>7}")
    for lane in (EXPRESS, STANDARD):
        rows = [a for a in avatars if a["lane"] == lane]
        actual = [a["trained"] - a["paid"] for a in rows]
        ours = [abs(a["eta"] - t) for a, t in zip(rows, actual)]
        naive = [abs(a["naive"] - t) for a, t in zip(rows, actual)]
        waits = [a["started"] - a["paid"] for a in rows]
        broken = sum(w > PROMISED_WAIT_S + MARGIN_S for w in waits) if lane == EXPRESS else "-"
        o50, o90, n50, n90 = (statistics.median(ours), quantile(ours, 0.9), statistics.median(naive),
                              quantile(naive, 0.9))
        print(f"{lane:9} {len(rows):5d} {o50:9.0f}s {o90:7.0f}s {n50:9.0f}s {n90:7.0f}s {o50 / n50:15.2f} "
              f"{o90 / n90:6.2f} {statistics.median(waits):8.0f}s {quantile(waits, 0.9):7.0f}s {broken!s:>7}")


if __name__ == "__main__":
    main()
