"""The lifecycle every GPU job shares, trainings and renders alike.

    claim (queued -> running, one attempt spent) -> work -> complete   | or: a technical failure -> retry or fail

The domain decides what claiming, completing and failing mean (portraits.avatars, portraits.renders); this module
only runs the steps in order and keeps the queue tracker's running set and measured durations honest. A worker that
is stopping hands a long job back (HandBack) instead of finishing it; see jobs.worker.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from rq import get_current_job

from jobs import context
from portraits import metrics, tasks
from portraits.queue.lanes import QUEUE_KIND
from portraits.queue.tracking import QueueTracker

log = logging.getLogger(__name__)
DURATIONS = {"train": metrics.TRAINING_SECONDS, "render": metrics.RENDER_SECONDS}

stopping = threading.Event()
stop_grace_s = [20.0]


class HandBack(BaseException):
    """Raised inside a job when its worker is stopping: the job goes back to the queue, no attempt is spent.

    A BaseException, so the jobs' `except Exception` failure handling (retry, refund) does not take it for a
    technical failure."""


def check_hand_back(fraction: float, elapsed_s: float) -> None:
    """Called by long jobs at each step: raise HandBack when the worker is stopping and the job would outlast the
    grace period."""
    if not stopping.is_set() or fraction >= 1.0:
        return
    remaining = elapsed_s * (1.0 - fraction) / fraction if fraction > 0 else float("inf")
    if remaining > stop_grace_s[0]:
        raise HandBack(f"worker stopping; about {remaining:.0f}s of work left")


@dataclass(frozen=True)
class GpuJobKind:
    queue: str  # the standard lane's queue; a job runs on (and is measured for) the queue it came from
    collection: str  # where the claimed document lives: one erased meanwhile (DELETE /me) ends the job quietly
    claim: Callable  # (services, doc_id, job_id) -> doc | None
    work: Callable  # (services, doc, job) -> result; raises on a technical failure
    complete: Callable  # (services, doc, job_id, result, seconds) -> outcome
    fail: Callable  # (services, doc_id, reason) -> outcome


def run(kind: GpuJobKind, doc_id: str) -> str:
    services = context.services()
    tracker = QueueTracker(services.redis)
    job = get_current_job()
    job_id = job.id if job else f"inline-{doc_id}"
    queue = job.origin if job is not None and job.origin in tasks.GPU_QUEUES else kind.queue
    duration = DURATIONS[QUEUE_KIND[queue]]
    doc = kind.claim(services, doc_id, job_id)
    if doc is None:
        tracker.finished(queue, job_id, measure=False)
        return "skipped"
    tracker.started(queue, job_id)
    started = time.monotonic()
    try:
        result = kind.work(services, doc, job)
    except Exception as error:
        duration.labels(outcome="failed").observe(time.monotonic() - started)
        tracker.finished(queue, job_id, measure=False)
        if services.db[kind.collection].count_documents({"_id": doc_id}, limit=1) == 0:
            # Its user was erased while it ran (their key shredded, their blobs gone). A failed job would keep the
            # error, which names the user's blob keys, in Redis for the failure TTL and in the log: end it instead.
            log.info("%s stopped: its %s was erased while it ran", job_id, kind.collection[:-1])
            return "erased"
        kind.fail(services, doc_id, f"{type(error).__name__}: {error}")
        raise
    seconds = time.monotonic() - started
    duration.labels(outcome="done").observe(seconds)
    tracker.finished(queue, job_id, measure=True)
    return kind.complete(services, doc, job_id, result, seconds)
