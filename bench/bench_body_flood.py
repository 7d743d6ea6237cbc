"""Memory of a served app under a flood of oversized bodies to POST /api/v1/auth/login (issue 13, item 2).

    python bench/bench_body_flood.py [--rounds 4] [--parallel 6] [--mb 14.8]

Serves `miniapp_api:create_app()` with gunicorn (one worker, threads = --parallel; EMBEDDED, so MongoDB, Redis and
WeChat are played in the worker; the login rate limit lifted so the bodies, not the limiter, are what is measured),
then sends --rounds rounds of --parallel concurrent requests, each a valid JSON login body of --mb megabytes, and
samples the worker's RSS (psutil) throughout. The baseline, measured first in the same run, is the same count of
small valid-size logins. Printed: the worker's RSS before, its peak and final growth under each load, and the
growth under the flood as a multiple of the baseline's. No threshold: compare runs of the code before and after.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(port: int, threads: int, instance_dir: str) -> subprocess.Popen:
    env = {**os.environ, "EMBEDDED": "1", "INSTANCE_DIR": instance_dir, "HF_HUB_OFFLINE": "1",
           "RATE_LIMIT_LOGIN": "1000000/minute", "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}"}
    return subprocess.Popen([sys.executable, "-m", "gunicorn", "-w", "1", "-k", "gthread", "--threads", str(threads),
                             "-b", f"127.0.0.1:{port}", "--timeout", "120", "miniapp_api:create_app()"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(port: int, server: subprocess.Popen) -> psutil.Process:
    for _ in range(600):
        if server.poll() is not None:
            raise RuntimeError("gunicorn exited")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return psutil.Process(server.pid).children()[0]
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("gunicorn did not answer")


def post(port: int, body: bytes) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("POST", "/api/v1/auth/login", body=body,
                           headers={"Content-Type": "application/json", "Content-Length": str(len(body))})
        return str(connection.getresponse().status)
    except OSError as error:  # the server answered and closed before taking the whole body
        try:
            return str(connection.getresponse().status)
        except (OSError, http.client.HTTPException):
            return type(error).__name__
    finally:
        connection.close()


class Sampler:
    """The worker's RSS, sampled every 10 ms while a load runs."""

    def __init__(self, process: psutil.Process):
        self.process, self.peak, self._stop = process, 0, threading.Event()

    def __enter__(self):
        self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def load(port: int, worker: psutil.Process, body: bytes, rounds: int, parallel: int) -> dict:
    before = worker.memory_info().rss
    statuses = Counter()
    started = time.perf_counter()
    with Sampler(worker) as sampler, ThreadPoolExecutor(parallel) as pool:
        for _ in range(rounds):
            statuses.update(pool.map(lambda _: post(port, body), range(parallel)))
    return {"before": before, "peak": sampler.peak, "after": worker.memory_info().rss, "statuses": dict(statuses),
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--parallel", type=int, default=6)
    parser.add_argument("--mb", type=float, default=14.8)
    args = parser.parse_args()
    small = json.dumps({"code": "c" * 32}).encode()
    big = json.dumps({"code": "c" * int(args.mb * MB - 12)}).encode()
    port = free_port()
    with tempfile.TemporaryDirectory() as instance_dir:
        server = serve(port, args.parallel, instance_dir)
        try:
            worker = wait_ready(port, server)
            post(port, small)  # the first login warms the simulator and the database
            idle = worker.memory_info().rss
            baseline = load(port, worker, small, args.rounds, args.parallel)
            flood = load(port, worker, big, args.rounds, args.parallel)
        finally:
            server.terminate()
            server.wait(30)
    print(f"{args.rounds} rounds x {args.parallel} parallel logins; worker RSS at rest {idle / MB:.0f} MB")
    for name, run in (("baseline, small bodies", baseline), (f"flood, {args.mb} MB bodies", flood)):
        print(f"  {name:28} peak +{(run['peak'] - run['before']) / MB:7.1f} MB   after +"
              f"{(run['after'] - run['before']) / MB:7.1f} MB   peak {run['peak'] / MB:6.0f} MB   "
              f"{run['seconds']:5.1f} s   answers {run['statuses']}")
    growth = max(flood["peak"] - flood["before"], 1) / max(baseline["peak"] - baseline["before"], 1 * MB)
    print(f"  peak growth under the flood: {growth:.1f}x the baseline's (baseline floor 1 MB)")


if __name__ == "__main__":
    main()
