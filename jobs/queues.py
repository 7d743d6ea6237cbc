"""Queue names and enqueueing. Renders are served ahead of trainings: GPU workers listen to `render` first."""
from __future__ import annotations

from rq import Queue, Retry

RENDER = "render"
TRAIN = "train"
DEFAULT = "default"
GPU_QUEUES = (RENDER, TRAIN)
ALL_QUEUES = (RENDER, TRAIN, DEFAULT)

# Generous ceilings: a real SD1.5 avatar trains in 5-20 minutes on an A10.
TIMEOUTS = {RENDER: 15 * 60, TRAIN: 60 * 60, DEFAULT: 5 * 60}


def queue(services, name: str) -> Queue:
    return Queue(name, connection=services.redis, default_timeout=TIMEOUTS[name])


def enqueue(services, name: str, func, *args, job_id: str, subject: str | None = None,
            retry: Retry | None = None, meta: dict | None = None):
    """Enqueue once per job id; GPU jobs also take a ticket so their queue position is O(log n) to read."""
    from jobs.tracking import QueueTracker

    q = queue(services, name)
    existing = q.fetch_job(job_id)
    if existing is not None and existing.get_status(refresh=True) in ("queued", "started", "scheduled", "deferred"):
        return existing
    if name in GPU_QUEUES:
        QueueTracker(services.redis).waiting(name, job_id, subject)
    return q.enqueue(func, *args, job_id=job_id, retry=retry, meta=meta or {}, result_ttl=24 * 3600,
                     failure_ttl=7 * 24 * 3600)
