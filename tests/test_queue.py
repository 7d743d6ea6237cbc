"""Queue position and ETA from Redis alone: exact FIFO, retries first, deletions leave the line, no MongoDB."""
from __future__ import annotations

import io
import secrets

import numpy as np
import pytest
from PIL import Image

from portraits import tasks
from portraits.queue.tracking import QueueTracker, estimate


def record(tag: str) -> str:
    """A stand-in GPU job: appends its tag to a Redis list so tests can see the order jobs ran in."""
    from jobs import context

    context.services().redis.rpush("test:ran", tag)
    return tag


def quick_paid_avatar(services, api, sim, photos: int = 3, sku: str = "avatar_pack") -> tuple[dict, dict]:
    """A ready avatar written straight to the stores (skipping photo intake), bought and paid through the
    simulator: the avatar is queued for training afterwards."""
    from portraits import states

    rng = np.random.default_rng(len(api.user_id))
    avatar_id = "av_" + secrets.token_hex(10)
    stored = []
    for index in range(photos):
        crop = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(crop, format="PNG")
        base = f"users/{api.user_id}/avatars/{avatar_id}/photos/ph{index}"
        services.sealed.put(api.user_id, base + ".png", crop.getvalue())
        services.sealed.put(api.user_id, base + ".emb", rng.normal(size=128).astype(np.float64).tobytes())
        stored.append({"id": f"ph{index}", "role": "front" if index == 0 else "extra", "accepted": True,
                       "reasons": [], "crop_key": base + ".png", "embedding_key": base + ".emb", "phash": "0"})
    at = states.now()
    services.db.avatars.insert_one({"_id": avatar_id, "user_id": api.user_id, "gender": "female", "state": "ready",
                                    "photos": stored, "train_attempts": 0, "created_at": at, "updated_at": at,
                                    "history": states.initial_history("ready", "test")})
    order = api.post("/api/v1/orders", json={"avatar_id": avatar_id, "sku": sku}).get_json()
    assert sim.pay(order["id"])["delivered"]
    avatar = services.db.avatars.find_one({"_id": avatar_id})
    assert avatar["state"] == "queued"
    return avatar, order


def _enqueue(services, name, tag, subject=None, job_id=None):
    return tasks.enqueue(services, name, record, tag, job_id=job_id or f"{name}-{tag}-1", subject=subject)


def test_position_is_exact_fifo_and_matches_rq_dequeue_order(services):
    tracker = QueueTracker(services.redis)
    q = tasks.queue(services, tasks.TRAIN)
    for i in range(12):
        _enqueue(services, tasks.TRAIN, f"a{i}", subject=f"avatar:a{i}")
    # Ours (ZRANK) agrees with RQ's own LPOS scan for every job.
    for i in range(12):
        job_id = f"train-a{i}-1"
        assert tracker.position(tasks.TRAIN, job_id)["position"] == q.get_job_position(job_id) == i

    # A retry (the same subject with a new job) goes first, in RQ's list and in ours.
    _enqueue(services, tasks.TRAIN, "a7", subject="avatar:a7", job_id="train-a7-2")
    assert q.get_job_position("train-a7-2") == 0
    assert tracker.position(tasks.TRAIN, "train-a7-2")["position"] == 0
    assert tracker.position(tasks.TRAIN, "train-a0-1")["position"] == 1

    # A deleted avatar's job leaves the line: everyone behind moves up.
    q.fetch_job("train-a3-1").cancel()
    tracker.forget_subject("avatar:a3")
    assert tracker.position(tasks.TRAIN, "train-a4-1")["position"] == q.get_job_position("train-a4-1") == 4

    # Dequeue order == ticket order, to the last job.
    order = [job_id.decode() for job_id in services.redis.zrange("portraits:waiting:train", 0, -1)]
    dequeued = []
    while (job := q.dequeue_any([q], None, connection=services.redis)) is not None:
        dequeued.append(job[0].id)
        tracker.started(tasks.TRAIN, job[0].id)
        if len(dequeued) < len(order):
            assert tracker.position(tasks.TRAIN, order[len(dequeued)])["position"] == 0
    assert dequeued == order
    assert tracker.waiting_count(tasks.TRAIN) == 0


def test_eta_from_measured_durations_live_workers_and_progress(services):
    tracker = QueueTracker(services.redis)
    for seconds in (100, 200):
        tracker.record_duration(tasks.TRAIN, seconds)
    average = tracker.average_duration(tasks.TRAIN)
    assert average == pytest.approx(0.8 * 100 + 0.2 * 200)

    for i in range(7):
        _enqueue(services, tasks.TRAIN, f"e{i}", subject=f"avatar:e{i}")
    tracker.worker_alive([tasks.TRAIN], "gpu-1", ttl_s=60)
    tracker.worker_alive([tasks.TRAIN], "gpu-2", ttl_s=60)
    tracker.worker_alive([tasks.TRAIN], "dead-gpu", ttl_s=-1)  # its heartbeat lapsed: not counted
    assert tracker.live_workers(tasks.TRAIN) == 2

    where = tracker.position(tasks.TRAIN, "train-e5-1")
    assert where == {"position": 5, "ahead": 5, "eta_seconds": int(np.ceil(average * (5 // 2 + 1))),
                     "running": False, "lane": "standard"}
    # Renders are served first by the same workers: waiting renders push a training's ETA back.
    _enqueue(services, tasks.RENDER, "r0", subject="render:r0")
    later = tracker.position(tasks.TRAIN, "train-e5-1")["eta_seconds"]
    assert later == int(np.ceil(average * 3 + 60.0 / 2))

    # The running job: remaining time from its progress.
    tracker.started(tasks.TRAIN, "train-e0-1")
    tracker.set_subject("avatar:e0", state="training", progress=0.75)
    tracked, running = tracker.poll("avatar:e0")
    assert running == {"position": 0, "ahead": 0, "eta_seconds": int(np.ceil(average * 0.25)), "running": True,
                       "lane": "standard"}
    assert estimate(-1, 100.0, 1, 1, False, 0.0)["eta_seconds"] == 0


def test_queue_route_is_served_from_redis_alone(services, client, login):
    alice, bob = login("alice"), login("bob")
    tracker = QueueTracker(services.redis)
    for i in range(3):
        _enqueue(services, tasks.TRAIN, f"x{i}", subject=f"avatar:x{i}")
    tracker.set_subject("avatar:mine", owner=alice.user_id, state="queued")
    _enqueue(services, tasks.TRAIN, "mine", subject="avatar:mine")

    class NoMongo:
        def __getattr__(self, name):
            raise AssertionError(f"the queue poll touched MongoDB ({name})")

        __getitem__ = __getattr__

    database, services.db = services.db, NoMongo()
    try:
        poll = alice.get("/api/v1/avatars/mine/queue")
        assert poll.status_code == 200, poll.get_json()
        body = poll.get_json()
        assert body["state"] == "queued" and body["position"] == 3 and body["ahead"] == 3
        assert body["eta_seconds"] > 0
        assert bob.get("/api/v1/avatars/mine/queue").status_code == 404
        # Only an avatar Redis does not know at all is looked up in MongoDB (one still collecting photos, or one
        # whose entry Redis lost); nobody's is still 404.
        services.db = database
        assert alice.get("/api/v1/avatars/nobody/queue").status_code == 404
        services.db = NoMongo()
        forged = client.get("/api/v1/avatars/mine/queue",
                            headers={"Authorization": "Bearer " + alice.token[:-2] + "xx"})
        assert forged.status_code == 401 and forged.get_json()["error"]["code"] == "invalid_token"
    finally:
        services.db = database  # the services fixture drops the database of a MONGO_URI run through it


def test_training_progress_is_visible_in_the_avatar_state(services, login, sim, drain, monkeypatch):
    api = login("carol")
    avatar, _ = quick_paid_avatar(services, api, sim)
    seen = []

    def look(fraction, elapsed_s):  # called by the training job at every step
        seen.append((api.get(f"/api/v1/avatars/{avatar['_id']}").get_json(),
                     api.get(f"/api/v1/avatars/{avatar['_id']}/queue").get_json()))

    monkeypatch.setattr("jobs.gpu_job.check_hand_back", look)
    drain()
    total = services.settings.train_steps
    assert len(seen) == total
    for step, (state, poll) in enumerate(seen, start=1):
        assert state["state"] == "training" and poll["state"] == "training"
        assert poll["step"] == step and poll["total"] == total
        assert state["queue"]["progress"] == poll["progress"] == round(step / total, 4)
        assert poll["position"] == 0
    job = tasks.queue(services, tasks.TRAIN).fetch_job(f"train-{avatar['_id']}-1")
    # Beside the request id of the payment callback that queued it (portraits.logs).
    assert {k: v for k, v in job.meta.items() if k != "request_id"} == {"step": total, "total": total, "progress": 1.0}
    assert services.db.avatars.find_one({"_id": avatar["_id"]})["state"] == "trained"
    assert QueueTracker(services.redis).average_duration(tasks.TRAIN) < 600  # measured, not the default


def test_gpu_workers_serve_renders_before_trainings(services):
    from jobs.worker import build_gpu_worker

    for i in range(3):
        _enqueue(services, tasks.TRAIN, f"t{i}", subject=f"avatar:t{i}")
    for i in range(2):
        _enqueue(services, tasks.RENDER, f"r{i}", subject=f"render:r{i}")
    worker = build_gpu_worker(services.redis, heartbeat_s=1, dead_after_s=5)
    worker.work(burst=True, max_jobs=5, logging_level="WARNING")
    assert [t.decode() for t in services.redis.lrange("test:ran", 0, -1)] == ["r0", "r1", "t0", "t1", "t2"]
