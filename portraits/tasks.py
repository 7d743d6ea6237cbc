"""Queue names and enqueueing. Renders are served ahead of training: GPU workers listen to `render` first."""
from __future__ import annotations

from rq import Queue, Retry

RENDER = "render"
TRAIN = "train"
DEFAULT = "default"
GPU_QUEUES = (RENDER, TRAIN)
ALL_QUEUES = (RENDER, TRAIN, DEFAULT)

# Generous ceilings: a real SD1.5 avatar trains in 5-20 minutes on an A10.
TIMEOUTS = {RENDER: 15 * 60, TRAIN: 60 * 60, DEFAULT: 5 * 60}
RESULT_TTL_S = 24 * 3600
FAILURE_TTL_S = 7 * 24 * 3600


def queue(services, name: str) -> Queue:
    return Queue(name, connection=services.redis, default_timeout=TIMEOUTS[name])


def track_for_owner(services, subject: str, user_id: str) -> None:
    """Start tracking a subject for the queue poll, which checks a token by signature alone (no MongoDB): the
    owner's token generation is kept with it, so a token revoked by consent withdrawal cannot poll what the user
    queues after consenting again."""
    from jobs.tracking import QueueTracker

    user = services.db.users.find_one({"_id": user_id}, {"token_generation": 1}) or {}
    QueueTracker(services.redis).set_subject(subject, owner=user_id, owner_gen=user.get("token_generation", 0),
                                             state="queued")


def enqueue(services, name: str, func, *args, job_id: str, subject: str | None = None,
            retry: Retry | None = None, meta: dict | None = None):
    """Enqueue once per job id; GPU jobs also take a ticket so their queue position is O(log n) to read.

    A subject that comes back with a new job (a retry after a technical failure or a lost worker) goes to the
    front of its queue: it already waited its turn once.
    """
    from jobs.tracking import QueueTracker

    q = queue(services, name)
    existing = q.fetch_job(job_id)
    if existing is not None and existing.get_status(refresh=True) in ("queued", "started", "scheduled", "deferred"):
        return existing
    if name not in GPU_QUEUES:
        return q.enqueue(func, *args, job_id=job_id, retry=retry, meta=meta or {}, result_ttl=RESULT_TTL_S,
                         failure_ttl=FAILURE_TTL_S)
    tracker = QueueTracker(services.redis)
    previous = tracker.subject(subject).get("job_id") if subject else None
    front = bool(previous) and previous != job_id
    with services.redis.pipeline() as pipe:  # MULTI/EXEC: the push and the ticket are one step
        job = q.enqueue_call(func, args=args, job_id=job_id, retry=retry, meta=meta or {}, result_ttl=RESULT_TTL_S,
                             failure_ttl=FAILURE_TTL_S, at_front=front, pipeline=pipe)
        tracker.waiting(name, job_id, subject, front=front, pipeline=pipe)
        pipe.execute()
    return job


def requeue_at_front(services, job, subject: str | None) -> None:
    """Put a job that was handed back (or lost before it ran) at the front of its queue, ticket included."""
    from jobs.tracking import QueueTracker

    q = queue(services, job.origin)
    with services.redis.pipeline() as pipe:
        pipe.zrem(q.failed_job_registry.key, job.id)
        job.started_at = None
        job.ended_at = None
        q._enqueue_job(job, pipeline=pipe, at_front=True)
        QueueTracker(services.redis).handed_back(job.origin, job.id, subject, pipeline=pipe)
        pipe.execute()
