"""The cheap queue poll while users upload photos: its p99 quiet, and during an upload storm, through the real app.

    python bench/bench_upload_storm.py [--seconds 15] [--uploaders 4] [--rate 4] [--web-workers 2] [--threads 4]

Starts the Procfile's `web` (gunicorn, `--web-workers` workers) and `intake` (`python -m jobs.worker intake`)
as separate processes on the embedded Redis and database server (miniapp_api.dev.supervisor, as `make serve` does),
with the local WeChat simulator. Logs in users over HTTP like the mini-program (phone, consent, avatars), seeds one
avatar waiting in the training line (a real token, the line in Redis), then:
- quiet: one client polls GET /api/v1/avatars/{id}/queue back to back for `--seconds`; p99 of its latencies;
- storm: the same poll while `--uploaders` clients POST 12 MP phone photos (4000x3000 JPEGs, ~0.8 MB, each a
  different face crop so none is a duplicate) to their avatars, `--rate` uploads per second in all (0: back to back,
  as fast as the web answers); the intake worker judges them meanwhile.
`--threads N` runs gunicorn's gthread workers with N threads each (the Procfile's: WEB_THREADS, default 4, safe now
that no request runs a face model); `--threads 0` sync workers, one request at a time per worker.
Prints both p99s and their ratio (target: within 2x), the uploads answered per second and how many verdicts the
intake worker landed during the storm. The quiet run is the baseline, measured in the same run on the same processes.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
from PIL import Image  # noqa: E402

from bench.bench_queue_http import seed  # noqa: E402
from miniapp_api.dev.supervisor import Topology  # noqa: E402
from models import sample_photos  # noqa: E402
from portraits.queue.tracking import subject_key  # noqa: E402
from portraits.store import db as db_module  # noqa: E402
from tests.conftest import phone_for  # noqa: E402
from wechat_sim.client import SimulatorClient  # noqa: E402

POLLED_AVATAR = "av_bench"
PHOTOS_PER_AVATAR = 30  # MAX_PHOTOS: a new avatar when one is full


def phone_photos(count: int) -> list[bytes]:
    """12 MP JPEGs, each a different crop of the astronaut portrait on a wall-coloured canvas."""
    made = []
    for index, data in enumerate(sample_photos.astronaut_photos(count)):
        canvas = Image.new("RGB", (4000, 3000), (214, 208, 200))
        face = Image.open(io.BytesIO(data)).convert("RGB").resize((2400, 2400))
        canvas.paste(face, (400 + 40 * (index % 10), 300))
        made.append(sample_photos.encode(canvas, quality=90))
    return made


class User:
    def __init__(self, base: str, sim: SimulatorClient, name: str):
        self.base, self.http = base, requests.Session()
        body = self.call("post", "/auth/login", json={"code": sim.login_code(name)})
        self.id, self.token = body["user"]["id"], body["token"]
        self.http.headers["Authorization"] = f"Bearer {self.token}"
        self.call("post", "/me/phone", json={"code": sim.phone_code(name, phone_for(name))})
        version = self.call("get", "/consents")[0]["version"]
        self.call("post", "/consents", json={"kind": "face_processing", "version": version, "age_14_or_over": True,
                                             "own_face": True})

    def call(self, method: str, path: str, **kwargs) -> dict:
        response = getattr(self.http, method)(self.base + path, timeout=120, **kwargs)
        if response.status_code not in (200, 201):
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:300]}")
        return response.json()


def poll_latencies(url: str, token: str, seconds: float) -> list[float]:
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {token}"
    latencies, stop = [], time.monotonic() + seconds
    while time.monotonic() < stop:
        started = time.perf_counter()
        response = http.get(url, timeout=60)
        latencies.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise RuntimeError(f"poll answered {response.status_code}: {response.text[:300]}")
    return latencies


def p99_ms(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000


def upload_storm(user: User, photos: list[bytes], stop: threading.Event, answered: list[float],
                 interval_s: float) -> None:
    avatar, sent = None, 0
    next_at = time.monotonic()
    while not stop.is_set():
        if interval_s:
            next_at += interval_s
            stop.wait(max(0.0, next_at - time.monotonic()))
        if avatar is None or sent == PHOTOS_PER_AVATAR:
            avatar, sent = user.call("post", "/avatars", json={"gender": "female"})["id"], 0
        started = time.perf_counter()
        taken = user.call("post", f"/avatars/{avatar}/photos", data={"role": "front" if sent == 0 else "extra"},
                          files={"photo": ("photo.jpg", photos[sent % len(photos)], "image/jpeg")})
        answered.append(time.perf_counter() - started)
        assert taken["state"] == "judging", taken
        sent += 1


def judged_count(database) -> int:
    return sum(1 for avatar in database.avatars.find({}, {"photos.state": 1})
               for photo in avatar.get("photos", []) if photo.get("state") in ("accepted", "refused"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--uploaders", type=int, default=4)
    parser.add_argument("--rate", type=float, default=4.0, help="uploads per second in all; 0: back to back")
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4, help="gthread workers with this many threads; 0: sync")
    args = parser.parse_args(argv)
    print("preparing 30 photos of 4000x3000 ...", flush=True)
    photos = phone_photos(PHOTOS_PER_AVATAR)
    limits = {"RATE_LIMIT_UPLOADS": "100000/minute", "RATE_LIMIT_AVATARS": "100000/minute",
              "RATE_LIMIT_LOGIN": "100000/minute", "MAX_OPEN_AVATARS": "1000", "LOG_LEVEL": "WARNING"}
    limits["GUNICORN_CMD_ARGS"] = (f"--worker-class gthread --threads {args.threads}" if args.threads
                                   else "--worker-class sync")
    topology = Topology(Path(tempfile.mkdtemp(prefix="bench-storm-")) / "instance", processes=("web", "intake"),
                        web_workers=args.web_workers, environ={**os.environ, **limits})
    started = time.monotonic()
    topology.start()
    kind = f"gthread x{args.threads}" if args.threads else "sync"
    print(f"web ({args.web_workers} {kind} workers) and intake up in {time.monotonic() - started:.1f}s; "
          f"{os.cpu_count()} CPUs", flush=True)
    try:
        database = db_module.connect(topology.settings)
        sim = SimulatorClient(topology.simulator_url)
        base = topology.base_url + "/api/v1"
        waiting = User(base, sim, "poller")
        redis = topology.shared_redis()
        seed(redis, 1_000)
        redis.hset(subject_key(f"avatar:{POLLED_AVATAR}"), "owner", waiting.id)
        url = f"{base}/avatars/{POLLED_AVATAR}/queue"
        print("sample poll:", requests.get(url, headers={"Authorization": f"Bearer {waiting.token}"}).text.strip())
        uploaders = [User(base, sim, f"uploader{i}") for i in range(args.uploaders)]
        poll_latencies(url, waiting.token, 2)  # warm-up

        quiet = poll_latencies(url, waiting.token, args.seconds)
        stop, answered, threads = threading.Event(), [], []
        before = judged_count(database)
        for user in uploaders:
            interval_s = len(uploaders) / args.rate if args.rate else 0.0
            threads.append(threading.Thread(target=upload_storm, args=(user, photos, stop, answered, interval_s),
                                            daemon=True))
            threads[-1].start()
        time.sleep(1)  # the storm under way before the poll is measured
        storm = poll_latencies(url, waiting.token, args.seconds)
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        judged = judged_count(database) - before

        print(f"quiet: {len(quiet)} polls, median {statistics.median(quiet) * 1000:.1f} ms, "
              f"p99 {p99_ms(quiet):.1f} ms")
        print(f"storm: {len(storm)} polls, median {statistics.median(storm) * 1000:.1f} ms, "
              f"p99 {p99_ms(storm):.1f} ms; {len(answered)} uploads answered `judging` "
              f"({len(answered) / (args.seconds + 1):.1f}/s, median {statistics.median(answered) * 1000:.0f} ms, "
              f"p99 {p99_ms(answered):.0f} ms); {judged} verdicts landed meanwhile")
        print(f"ratio storm p99 / quiet p99: {p99_ms(storm) / p99_ms(quiet):.2f} (target <= 2)")
    finally:
        topology.stop()


if __name__ == "__main__":
    main()
