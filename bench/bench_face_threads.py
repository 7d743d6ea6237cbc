"""Concurrent photo judging: how to share dlib between request threads (issue 11 item 5).

Run: .venv/bin/python bench/bench_face_threads.py [--threads 2 4 8] [--photos 8] [--phone]

Every mode judges the same photos (threads x photos judge_photo calls) and is compared with a baseline measured in
the same run: one thread judging them one after another on one shared analyzer. Modes:
- locks:      one shared FaceAnalyzer (a lock per dlib model, one HOG detector);
- hog-pool:   the same with os.cpu_count() HOG detectors taken from a pool (the HOG scan is the only dlib call that
              releases the GIL, so it is the only one more copies can run in parallel);
- one-lock:   one shared FaceAnalyzer with one lock around each whole judge call's dlib work (coarser);
- per-thread: each thread its own FaceAnalyzer (loaded before timing; its locks are never contended);
- processes:  a process pool of os.cpu_count() workers, each with its own FaceAnalyzer, fed the photo bytes.
Ratios are throughput against the baseline (> 1 is faster); under them, this process's CPU seconds per wall second
(2.0 would be both cores busy). Also prints what one more copy of the models costs (load time, resident memory),
and which dlib calls hold the GIL: while another thread loops on the call, how long a 1 ms sleep takes to wake.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import cv2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import sample_photos as photos  # noqa: E402
from models.faces import FaceAnalyzer  # noqa: E402
from models.intake import IntakeLimits, _decode, _open, judge_photo  # noqa: E402

LIMITS = IntakeLimits()


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def judge(data: bytes, analyzer) -> bool:
    return judge_photo(data, role="extra", accepted=[], limits=LIMITS, analyzer=analyzer).accepted


class OneLockAnalyzer:
    """A shared analyzer behind one lock for all of its dlib work (faces, embed): the coarse alternative."""

    def __init__(self, analyzer: FaceAnalyzer):
        self._analyzer = analyzer
        self._lock = threading.Lock()

    def faces(self, *args, **kwargs):
        with self._lock:
            return self._analyzer.faces(*args, **kwargs)

    def embed(self, *args, **kwargs):
        with self._lock:
            return self._analyzer.embed(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._analyzer, name)


def gil_probe(analyzer: FaceAnalyzer, data: bytes) -> None:
    import dlib
    import numpy as np

    rgb = _decode(_open(data, LIMITS), data)
    face = analyzer.faces(rgb)[0]
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    crop = np.ascontiguousarray(cv2.resize(rgb, (128, 128)))
    calls = {
        "decode": lambda: _decode(_open(data, LIMITS), data),
        "hog": lambda: analyzer._detectors.queue[0].run(gray, 0, -0.1),
        "cnn": lambda: analyzer._verifier.finds_a_face(crop),
        "landmarks": lambda: analyzer._shape_predictor(rgb, dlib.rectangle(*face.box)),
        "embed": lambda: analyzer.embed(rgb, face),
    }
    waits = []
    for name, call in calls.items():
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                call()

        worker = threading.Thread(target=loop)
        worker.start()
        samples = []
        until = time.perf_counter() + 1.5
        while time.perf_counter() < until:
            start = time.perf_counter()
            time.sleep(0.001)
            samples.append(time.perf_counter() - start)
        stop.set()
        worker.join()
        waits.append(f"{name} {statistics.median(samples) * 1000:.0f}")
    print("1 ms sleep wakes after (median ms) while another thread runs: " + ", ".join(waits))


def in_threads(threads: int, work: list[bytes], analyzer_for) -> float:
    """Seconds for `threads` threads, started together, each judging every photo of `work`."""
    barrier = threading.Barrier(threads + 1)
    failures = []

    def run(index: int) -> None:
        analyzer = analyzer_for(index)
        barrier.wait()
        for data in work:
            if not judge(data, analyzer):
                failures.append(index)

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in pool:
        thread.join()
    elapsed = time.perf_counter() - start
    assert not failures, f"{len(failures)} photos refused"
    return elapsed


_WORKER_ANALYZER = None


def _worker_init() -> None:
    global _WORKER_ANALYZER
    _WORKER_ANALYZER = FaceAnalyzer()


def _worker_judge(data: bytes) -> bool:
    return judge(data, _WORKER_ANALYZER)


def _worker_ready(_: int) -> bool:
    return _WORKER_ANALYZER is not None


def in_processes(pool: ProcessPoolExecutor, threads: int, work: list[bytes]) -> float:
    """As in_threads, with `threads` threads each handing its photos to the pool one at a time (as requests would)."""
    barrier = threading.Barrier(threads + 1)
    failures = []

    def run(index: int) -> None:
        barrier.wait()
        for data in work:
            if not pool.submit(_worker_judge, data).result():
                failures.append(index)

    clients = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for client in clients:
        client.start()
    barrier.wait()
    start = time.perf_counter()
    for client in clients:
        client.join()
    elapsed = time.perf_counter() - start
    assert not failures
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--photos", type=int, default=8, help="photos each thread judges")
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs per mode")
    parser.add_argument("--modes", nargs="+", default=["locks", "hog-pool", "one-lock", "per-thread", "processes"])
    parser.add_argument("--phone", action="store_true", help="4000x3000 phone-sized JPEGs instead of 1024 px ones")
    args = parser.parse_args()

    if args.phone:
        from bench.bench_intake import phone_photo

        work = [phone_photo()] * args.photos
    else:
        work = (photos.astronaut_photos(8) * (args.photos // 8 + 1))[:args.photos]

    # What one more copy of the models costs.
    loads, grows = [], []
    kept = []
    for _ in range(3):
        before = rss_mb()
        start = time.perf_counter()
        kept.append(FaceAnalyzer())
        loads.append(time.perf_counter() - start)
        judge(work[0], kept[-1])  # first use allocates dlib's working buffers too
        grows.append(rss_mb() - before)
    print(f"one FaceAnalyzer: load {statistics.median(loads) * 1000:.0f} ms, "
          f"+{statistics.median(grows):.0f} MB resident (incl. first judge) per copy; cpus={os.cpu_count()}")
    shared = kept[0]
    gil_probe(shared, work[0])
    start = time.perf_counter()
    hog_pool = FaceAnalyzer(hog_detectors=os.cpu_count() or 1)
    print(f"with {os.cpu_count()} HOG detectors: load {(time.perf_counter() - start) * 1000:.0f} ms")
    one_lock = OneLockAnalyzer(shared)
    per_thread = [FaceAnalyzer() for _ in range(max(args.threads))]

    # spawn, not fork: a child forked from a process whose threads have used OpenCV/dlib can deadlock.
    pool = ProcessPoolExecutor(max_workers=os.cpu_count(), initializer=_worker_init,
                               mp_context=multiprocessing.get_context("spawn"))
    while not all(pool.map(_worker_ready, range(4 * (os.cpu_count() or 1)))):
        time.sleep(0.1)
    pool.submit(_worker_judge, work[0]).result()

    names = args.modes
    print(f"{'threads':>7} {'photos':>6} {'base/s':>6} " + " ".join(f"{name:>10}" for name in names)
          + "   (throughput ratio vs the baseline of the same round; median of rounds)")
    for threads in args.threads:
        total = threads * len(work)
        runs = {
            "locks": lambda: in_threads(threads, work, lambda i: shared),
            "hog-pool": lambda: in_threads(threads, work, lambda i: hog_pool),
            "one-lock": lambda: in_threads(threads, work, lambda i: one_lock),
            "per-thread": lambda: in_threads(threads, work, lambda i: per_thread[i]),
            "processes": lambda: in_processes(pool, threads, work),
        }
        ratios = {name: [] for name in names}
        busy = {name: [] for name in names}  # this process's CPU seconds per wall second (threads modes; max: cpus)
        bases = []
        # Rounds interleave the baseline with every mode, so a neighbour's load on the machine hits both sides.
        for _ in range(args.repeats):
            for name in names:
                base = in_threads(1, work * threads, lambda i: shared)
                bases.append(base)
                cpu = time.process_time()
                seconds = runs[name]()
                busy[name].append((time.process_time() - cpu) / seconds)
                ratios[name].append(base / seconds)
        print(f"{threads:>7} {total:>6} {total / statistics.median(bases):>6.2f} "
              + " ".join(f"{statistics.median(ratios[name]):>10.2f}" for name in names))
        print(f"{'':>21}" + " ".join(f"{f'cpu {statistics.median(busy[name]):.2f}':>10}" for name in names
                                     if name != "processes"))
    pool.shutdown()


if __name__ == "__main__":
    main()
