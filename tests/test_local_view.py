"""Polls answered from the web process's memory stay exact: every change to the line reaches the next poll."""
from __future__ import annotations

import multiprocessing
import random
import threading

import pytest
import redis as redis_py

from portraits.queue import local_view

from portraits import tasks
from portraits.queue.local_view import LocalView
from portraits.queue.tracking import QueueTracker, waiting_key
from portraits.store.redis_client import socket_path
from tests.test_queue import _enqueue
from tests.waiting import wait_for


def enqueue(services, tag: str, attempt: int = 1):
    return _enqueue(services, tasks.TRAIN, tag, subject=f"avatar:{tag}", job_id=f"train-{tag}-{attempt}")


def count_commands_sent_by_this_thread(monkeypatch) -> list:
    """Every command this thread writes to any Redis connection from now on (pipelines included). Counted at the
    sender, not with INFO commandstats, because other threads and processes share the test's Redis server."""
    sent, me = [], threading.get_ident()
    send = redis_py.connection.AbstractConnection.send_packed_command

    def counting(connection, command, *args, **kwargs):
        if threading.get_ident() == me:
            sent.append(command)
        return send(connection, command, *args, **kwargs)

    monkeypatch.setattr(redis_py.connection.AbstractConnection, "send_packed_command", counting)
    return sent


def test_memory_answers_agree_with_rq_through_random_joins_retries_cancels_and_dequeues(services):
    """The compact line (lo, holes, fronts) against RQ's own LPOS after every step of a random day."""
    tracker = QueueTracker(services.redis)
    q = tasks.queue(services, tasks.TRAIN)
    rng = random.Random(7)
    attempts, waiting, running = {}, set(), set()
    for step in range(160):
        action = rng.choices(["join", "retry", "cancel", "serve", "finish"], weights=[5, 1, 1, 3, 2])[0]
        if action == "join" or not (waiting or running):
            tag = f"s{step}"
            attempts[tag] = 1
            enqueue(services, tag)
            waiting.add(tag)
        elif action == "retry" and running:  # a failed attempt goes back first with a new job id
            tag = rng.choice(sorted(running))
            tracker.finished(tasks.TRAIN, f"train-{tag}-{attempts[tag]}", measure=False)
            attempts[tag] += 1
            tracker.set_subject(f"avatar:{tag}", state="queued")
            enqueue(services, tag, attempts[tag])
            running.discard(tag)
            waiting.add(tag)
        elif action == "cancel" and waiting:
            tag = rng.choice(sorted(waiting))
            q.fetch_job(f"train-{tag}-{attempts[tag]}").cancel()
            tracker.forget_subject(f"avatar:{tag}")
            waiting.discard(tag)
        elif action == "serve" and waiting:
            job, _ = q.dequeue_any([q], None, connection=services.redis)
            tag = job.id.split("-")[1]
            tracker.started(tasks.TRAIN, job.id)
            tracker.set_subject(f"avatar:{tag}", state="training", progress=0)
            waiting.discard(tag)
            running.add(tag)
        elif action == "finish" and running:
            tag = rng.choice(sorted(running))
            tracker.finished(tasks.TRAIN, f"train-{tag}-{attempts[tag]}", measure=True)
            tracker.set_subject(f"avatar:{tag}", state="trained", progress=1)
            running.discard(tag)
        for tag in waiting:
            job_id = f"train-{tag}-{attempts[tag]}"
            _, where = tracker._poll_from_memory(LocalView.of(services.redis), f"avatar:{tag}")
            assert where["position"] == q.get_job_position(job_id) == services.redis.zrank(
                waiting_key(tasks.TRAIN), job_id), (step, action, tag)
        for tag in running:
            _, where = tracker.poll(f"avatar:{tag}")
            assert where["position"] == 0 and where["running"]
    assert tracker.waiting_count(tasks.TRAIN) == len(waiting)


def test_a_poll_with_nothing_changed_sends_nothing_to_redis(services, monkeypatch):
    monkeypatch.setattr(local_view, "FENCE_READS", False)  # as in production
    tracker = QueueTracker(services.redis)
    for i in range(5):
        enqueue(services, f"n{i}")
    first = tracker.poll("avatar:n3")
    sent = count_commands_sent_by_this_thread(monkeypatch)
    again = tracker.poll("avatar:n3")
    assert sent == []
    assert again == first and again[1]["position"] == 3
    tracker.started(tasks.TRAIN, "train-n0-1")
    assert tracker.poll("avatar:n3")[1]["position"] == 2 and sent  # the counter does see a real read


def test_without_the_fence_a_change_reaches_memory_and_nothing_else_is_read(services, monkeypatch):
    monkeypatch.setattr(local_view, "FENCE_READS", False)
    tracker = QueueTracker(services.redis)
    for i in range(6):
        enqueue(services, f"w{i}")
    assert tracker.poll("avatar:w5")[1]["position"] == 5
    view = LocalView.of(services.redis)
    tracker.started(tasks.TRAIN, "train-w0-1")
    # Without the fence the change reaches memory a few microseconds after the writer hears back.
    assert wait_for(lambda: tracker.poll("avatar:w5")[1]["position"] == 4, 30, "the change to reach memory",
                    step_s=0.001)
    misses = view.misses
    for _ in range(50):
        assert tracker.poll("avatar:w5")[1]["position"] == 4
    assert view.misses == misses


def test_a_change_by_another_client_reaches_the_next_poll(services, redis_server):
    tracker = QueueTracker(services.redis)
    for i in range(5):
        enqueue(services, f"c{i}")
    assert tracker.poll("avatar:c4")[1]["position"] == 4
    # Another process's client (its own connection pool) serves the head of the line and cancels one.
    elsewhere = QueueTracker(redis_py.Redis(unix_socket_path=socket_path(redis_server)))
    elsewhere.started(tasks.TRAIN, "train-c0-1")
    assert tracker.poll("avatar:c4")[1]["position"] == 3
    elsewhere.forget_subject("avatar:c2")
    assert tracker.poll("avatar:c4")[1]["position"] == 2
    elsewhere.worker_alive([tasks.TRAIN], "gpu-x", ttl_s=60)
    elsewhere.worker_alive([tasks.TRAIN], "gpu-y", ttl_s=60)
    two_workers = tracker.poll("avatar:c4")[1]["eta_seconds"]
    elsewhere.worker_gone([tasks.TRAIN], "gpu-y")
    assert tracker.poll("avatar:c4")[1]["eta_seconds"] > two_workers
    services.redis.flushall()
    assert tracker.poll("avatar:c4") == ({}, None)


@pytest.mark.parametrize("fence", [True, False])
def test_a_killed_connection_is_never_trusted_again(services, monkeypatch, fence):
    monkeypatch.setattr(local_view, "FENCE_READS", fence)
    tracker = QueueTracker(services.redis)
    for i in range(4):
        enqueue(services, f"k{i}")
    assert tracker.poll("avatar:k3")[1]["position"] == 3
    tracking = [client for client in services.redis.client_list() if "t" in client["flags"]]
    assert len(tracking) == 1
    services.redis.client_kill_filter(_id=tracking[0]["id"])
    tracker.started(tasks.TRAIN, "train-k0-1")  # no invalidation can reach the dead connection
    assert tracker.poll("avatar:k3")[1]["position"] == 2
    assert tracker.poll("avatar:k3")[1]["position"] == 2  # and the view reconnected


def test_values_are_bounded_and_aged(services, monkeypatch):
    view = LocalView.of(services.redis)
    monkeypatch.setattr(local_view, "MAX_KEYS", 3)
    for i in range(6):
        services.redis.set(f"test:key{i}", i)
        assert view.read([("text", f"test:key{i}")]) == [str(i)]
    assert len(view._values) <= 3
    monkeypatch.setattr(local_view, "MAX_AGE_S", -1.0)
    misses = view.misses
    view.read([("text", "test:key5")])
    assert view.misses == misses + 1


def _poll_in_child(subject, results):
    from jobs import context

    results.put(QueueTracker(context.services().redis).poll(subject)[1]["position"])


def test_a_forked_process_reads_through_its_own_connection(services, monkeypatch):
    from jobs import context

    tracker = QueueTracker(services.redis)
    for i in range(3):
        enqueue(services, f"f{i}")
    assert tracker.poll("avatar:f2")[1]["position"] == 2
    monkeypatch.setattr(context, "services", lambda: services)
    tracker.started(tasks.TRAIN, "train-f0-1")
    results = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(target=_poll_in_child, args=("avatar:f2", results))
    child.start()
    child.join(60)
    assert child.exitcode == 0 and results.get(timeout=5) == 1
    assert tracker.poll("avatar:f2")[1]["position"] == 1  # the parent's connection was left alone


@pytest.mark.parametrize("ticket, expected", [(4, 2), (5, 3), (7, 4), (8, 5), (6, -1), (3, -1), (-4, 0), (-2, 1), (-3, -1)])
def test_line_rank_from_the_compact_shape(ticket, expected):
    from portraits.queue.tracking import line_rank

    # Waiting: fronts -4, -2; back tickets 4, 5, 7, 8 (lo 4, hole 6).
    assert line_rank(ticket, {"lo": "4"}, [6.0], [-4.0, -2.0]) == expected
