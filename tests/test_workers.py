"""GPU workers: heartbeats through long jobs, SIGTERM, and real worker processes killed with SIGKILL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import jobs.gpu_job
from portraits import tasks
from jobs.recovery import reap
from portraits.queue.tracking import QueueTracker
from portraits.store.redis_client import socket_path
from tests.test_queue import quick_paid_avatar
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent

# A real GPU worker process on the test Redis. Its stand-in job never touches MongoDB (that lives in the test
# process): it says it started and then blocks, as a training would, until the process is killed or it is told
# to finish.
WORKER_SCRIPT = """
import sys, time, redis
import jobs.previews, jobs.training, jobs.rendering
from jobs.worker import build_gpu_worker

connection = redis.Redis(unix_socket_path=sys.argv[1])

def stand_in(subject_id):
    connection.rpush("test:started", subject_id)
    while not connection.get("test:finish"):
        time.sleep(0.05)
    return "finished"

jobs.training.train_avatar = stand_in
jobs.rendering.render_portraits = stand_in
jobs.previews.render_preview = lambda avatar_id: "not this test's job"  # taken first after a payment
build_gpu_worker(connection, heartbeat_s=1, dead_after_s=3).work(logging_level="WARNING")
"""


@pytest.fixture
def restore_signals():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    jobs.gpu_job.stopping.clear()


def start_worker_process(redis_server) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, socket_path(redis_server)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def kill_mid_job_and_reap(services, redis_server, on_started=None) -> tuple[list[dict], float]:
    """Start a real worker, SIGKILL it while it runs the avatar's training, run the reaper until it acts."""
    process = start_worker_process(redis_server)
    try:
        wait_for(lambda: services.redis.llen("test:started"), 60, "the worker to start the job")
        if on_started:
            on_started()
    finally:
        process.kill()
        process.wait()
    killed_at = time.monotonic()
    services.redis.delete("test:started")
    outcomes = wait_for(lambda: reap(services), 60, "the reaper to find the lost job", step_s=0.25)
    return outcomes, time.monotonic() - killed_at


@pytest.mark.parametrize("settings_overrides", [{"train_retries": 1}])
def test_sigkilled_worker_job_is_retried_then_refunded_exactly_once(services, login, sim, redis_server, capsys):
    from portraits import states

    api = login("dave")
    avatar, order = quick_paid_avatar(services, api, sim)
    avatar_id = avatar["_id"]

    def our_code_ran():  # what train_avatar's first statement does, in the process that has the database
        assert states.transition(services.db, "avatar", avatar_id, "training", expect={"queued"}, by="job",
                                 inc={"train_attempts": 1})

    # 1. Killed mid-training: found and retried, at the front of the queue.
    outcomes, first_s = kill_mid_job_and_reap(services, redis_server, on_started=our_code_ran)
    assert outcomes == [{"job_id": f"train-{avatar_id}-1", "outcome": "retried"}]
    stored = services.db.avatars.find_one({"_id": avatar_id})
    assert stored["state"] == "queued" and stored["train_attempts"] == 1
    assert QueueTracker(services.redis).position(tasks.TRAIN, f"train-{avatar_id}-2")["position"] == 0

    # 2. The retry's worker is killed too, before our code ran: no attempts left, so the order is refunded.
    outcomes, second_s = kill_mid_job_and_reap(services, redis_server)
    assert outcomes == [{"job_id": f"train-{avatar_id}-2", "outcome": "failed"}]
    assert services.db.avatars.find_one({"_id": avatar_id})["state"] == "failed"
    refunded = api.get(f"/api/v1/orders/{order['id']}").get_json()
    assert refunded["state"] == "refunding" and len(refunded["refunds"]) == 1

    # Never twice: more reaper passes, and RQ's own cleanup, change nothing.
    for _ in range(3):
        assert reap(services) == []
    for name in tasks.GPU_QUEUES:
        tasks.queue(services, name).started_job_registry.cleanup()
    assert len(services.db.orders.find_one({"_id": order["id"]})["refunds"]) == 1
    tracker = QueueTracker(services.redis)
    assert tracker.waiting_count(tasks.TRAIN) == 0 and tracker.running_count(tasks.TRAIN) == 0
    with capsys.disabled():
        print(f"\n  SIGKILL -> job recovered in {first_s:.1f}s (retry) and {second_s:.1f}s (refund); "
              f"WORKER_DEAD_AFTER_S=3 here, 45 by default")


def test_job_that_rq_failed_before_our_code_ran_is_not_stuck(services, login, sim):
    api = login("erin")
    avatar, _ = quick_paid_avatar(services, api, sim)
    q = tasks.queue(services, tasks.TRAIN)
    job = q.fetch_job(f"train-{avatar['_id']}-1")
    # As if RQ itself failed it (e.g. the job could not be loaded) before train_avatar ran.
    q.remove(job)
    with services.redis.pipeline() as pipe:
        job.set_status("failed", pipeline=pipe)
        q.failed_job_registry.add(job, ttl=3600, exc_string="DeserializationError", pipeline=pipe)
        pipe.execute()
    assert reap(services) == [{"job_id": job.id, "outcome": "retried"}]
    stored = services.db.avatars.find_one({"_id": avatar["_id"]})
    assert stored["state"] == "queued" and stored["train_attempts"] == 1
    assert q.get_job_position(f"train-{avatar['_id']}-2") == 0
    assert reap(services) == []


def test_heartbeats_advance_during_a_long_job(services, redis_server, restore_signals):
    """The job blocks the main thread far longer than the execution's time to live; the heartbeat thread keeps
    the execution in the StartedJobRegistry (so the reaper leaves it alone) and the worker alive."""
    from jobs.worker import build_gpu_worker

    tasks.enqueue(services, tasks.TRAIN, time.sleep, 4, job_id="train-long-1")
    worker = build_gpu_worker(services.redis, heartbeat_s=1, dead_after_s=3)
    key = tasks.queue(services, tasks.TRAIN).started_job_registry.key
    samples = []

    def watch():
        while len(samples) < 60 and not (samples and samples[-1][1] is None and len(samples) > 5):
            entries = services.redis.zrange(key, 0, -1, withscores=True)
            samples.append((time.time(), entries[0][1] if entries else None))
            if entries:
                assert reap(services) == []
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    worker.work(burst=True, logging_level="WARNING")
    watcher.join()
    expiries = [score for _, score in samples if score is not None]
    assert len(set(expiries)) >= 3, expiries  # renewed over and over
    assert all(score > at for at, score in samples if score is not None)  # never lapsed
    assert tasks.queue(services, tasks.TRAIN).fetch_job("train-long-1").get_status() == "finished"


def test_sigterm_finishes_the_running_job_in_a_real_worker_process(services, redis_server):
    tasks.enqueue(services, tasks.RENDER, tasks.RENDER_PORTRAITS, "r1", job_id="render-r1-1")  # the stand-in runs
    process = start_worker_process(redis_server)
    try:
        wait_for(lambda: services.redis.llen("test:started"), 60, "the worker to start the job")
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert process.poll() is None  # still finishing the job
        services.redis.set("test:finish", 1)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
    job = tasks.queue(services, tasks.RENDER).fetch_job("render-r1-1")
    assert job.get_status() == "finished" and job.return_value() == "finished"


@pytest.mark.parametrize("settings_overrides", [{"train_steps": 12}])
def test_sigterm_hands_a_long_training_back_without_spending_an_attempt(services, login, sim, drain,
                                                                         restore_signals):
    from jobs.worker import build_gpu_worker

    api = login("frank")
    avatar, _ = quick_paid_avatar(services, api, sim)
    tracker = QueueTracker(services.redis)
    subject = f"avatar:{avatar['_id']}"

    def stop_when_training():
        wait_for(lambda: float(tracker.subject(subject).get("progress") or 0) > 0, 60, "training to start", 0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=stop_when_training)
    sender.start()
    build_gpu_worker(services.redis, heartbeat_s=1, dead_after_s=5, stop_grace_s=0).work(
        burst=True, logging_level="WARNING")
    sender.join()
    stored = services.db.avatars.find_one({"_id": avatar["_id"]})
    assert stored["state"] == "queued" and stored["train_attempts"] == 0
    assert stored["history"][-1]["reason"] == "worker_stopping"
    assert tracker.position(tasks.TRAIN, f"train-{avatar['_id']}-1")["position"] == 0
    assert tracker.running_count(tasks.TRAIN) == 0

    jobs.gpu_job.stopping.clear()
    drain()
    stored = services.db.avatars.find_one({"_id": avatar["_id"]})
    assert stored["state"] == "trained" and stored["train_attempts"] == 1
    assert reap(services) == []  # the handed-back failure record is not a lost job
