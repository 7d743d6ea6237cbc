"""Work handed to RQ, by dotted name: the only module of the domain that knows RQ exists.

The domain says what is owed (`enqueue(services, TRAIN, TRAIN_AVATAR, avatar_id, ...)`); the task functions live in
`jobs/` and are named here as strings, the way microblog's `launch_task` does, so `portraits` never imports `jobs`.
GPU workers listen to `preview` first (one short draw per paid order: the user sees something within seconds of
paying), then the lanes' queues: renders are served ahead of training within a lane; the express lane has queues
of its own, served by a share of the GPU workers (portraits.queue.lanes). The preview queue has no positions or ETA
of its own (nobody polls it).
"""
from __future__ import annotations

from rq import Queue, Retry, Worker
from rq.job import Job
from rq.registry import StartedJobRegistry

from portraits import keys, logs
from portraits.queue import lanes
from portraits.queue.tracking import QueueTracker

PREVIEW = "preview"
RENDER, TRAIN = lanes.LANE_QUEUES[lanes.STANDARD]
RENDER_EXPRESS, TRAIN_EXPRESS = lanes.LANE_QUEUES[lanes.EXPRESS]
DEFAULT = "default"
# Tracked (positions, ETA, tickets: portraits.queue.tracking); express first, the order a worker listens in when it
# takes express work first (portraits.queue.lanes).
GPU_QUEUES = (RENDER_EXPRESS, TRAIN_EXPRESS, RENDER, TRAIN)
# What a GPU worker serves: previews first.
GPU_WORKER_QUEUES = (PREVIEW, *GPU_QUEUES)
# Face judging of uploaded photos (CPU, dlib), served by `python -m jobs.worker intake` so no web process judges.
INTAKE = "intake"
ALL_QUEUES = (*GPU_WORKER_QUEUES, INTAKE, DEFAULT)

# Generous ceilings: a real SD1.5 avatar trains in 5-20 minutes on an A10; one photo is judged in well under a second.
TIMEOUTS = {PREVIEW: 5 * 60, RENDER: 15 * 60, TRAIN: 60 * 60, RENDER_EXPRESS: 15 * 60, TRAIN_EXPRESS: 60 * 60,
            INTAKE: 2 * 60, DEFAULT: 5 * 60}
RESULT_TTL_S = 24 * 3600
FAILURE_TTL_S = 7 * 24 * 3600

# The task functions, by dotted name (tests check that each one resolves to a function in jobs/).
TRAIN_AVATAR = "jobs.training.train_avatar"
RENDER_PORTRAITS = "jobs.rendering.render_portraits"
RENDER_PREVIEW = "jobs.previews.render_preview"
SUBMIT_REFUND = "jobs.refunds.submit_refund"
SEND_MESSAGE = "jobs.notifications.send_message"
FETCH_SHARE_CODE = "jobs.sharing.fetch_share_code"
SUBMIT_CONTENT_CHECK = "jobs.content.submit_content_check"
JUDGE_PHOTO = "jobs.intake.judge_photo"
TASK_NAMES = (TRAIN_AVATAR, RENDER_PORTRAITS, RENDER_PREVIEW, SUBMIT_REFUND, SEND_MESSAGE, FETCH_SHARE_CODE,
              SUBMIT_CONTENT_CHECK, JUDGE_PHOTO)


def gpu_queue_name(kind: str, doc: dict | None) -> str:
    """The queue a render or training (`kind`) of this order's, avatar's or render's lane waits in."""
    return lanes.queue_for(kind, lanes.lane_of(doc))


def queue_tracker(services) -> QueueTracker:
    """The queue tracker whose ETAs follow this deployment's lane rule (EXPRESS_GPU_SHARE, EXPRESS_GPU_CAP)."""
    return QueueTracker(services.redis, lanes.LanePolicy.of(services.settings))


def queue(services, name: str) -> Queue:
    return Queue(name, connection=services.redis, default_timeout=TIMEOUTS[name])


def track_for_owner(services, subject: str, user_id: str) -> None:
    """Start tracking a subject for the queue poll, which checks a token by signature alone (no MongoDB): the
    owner's token generation is kept with it, so a token revoked by consent withdrawal cannot poll what the user
    queues after consenting again."""
    user = services.db.users.find_one({"_id": user_id}, {"token_generation": 1}) or {}
    QueueTracker(services.redis).set_subject(subject, owner=user_id, owner_gen=user.get("token_generation", 0),
                                             state="queued")


def enqueue(services, name: str, task: str, *args, job_id: str, subject: str | None = None,
            retry: Retry | None = None, meta: dict | None = None):
    """Enqueue once per job id; GPU jobs also take a ticket so their queue position is O(log n) to read.

    A subject that comes back with a new job (a retry after a technical failure or a lost worker) goes to the
    front of its queue: it already waited its turn once. The request id being handled, if any, goes into the job's
    meta, so the worker's log lines for the job carry it.
    """
    meta = with_request_id(meta)
    q = queue(services, name)
    existing = q.fetch_job(job_id)
    if existing is not None and existing.get_status(refresh=True) in ("queued", "started", "scheduled", "deferred"):
        return existing
    if name not in GPU_QUEUES:
        return q.enqueue(task, *args, job_id=job_id, retry=retry, meta=meta, result_ttl=RESULT_TTL_S,
                         failure_ttl=FAILURE_TTL_S)
    tracker = QueueTracker(services.redis)
    previous = tracker.subject(subject).get("job_id") if subject else None
    front = bool(previous) and previous != job_id
    with services.redis.pipeline() as pipe:  # MULTI/EXEC: the push and the ticket are one step
        job = q.enqueue_call(task, args=args, job_id=job_id, retry=retry, meta=meta, result_ttl=RESULT_TTL_S,
                             failure_ttl=FAILURE_TTL_S, at_front=front, pipeline=pipe)
        tracker.waiting(name, job_id, subject, front=front, pipeline=pipe)
        pipe.execute()
    return job


def with_request_id(meta: dict | None) -> dict:
    request_id = logs.current_request_id()
    return {**(meta or {}), **({logs.REQUEST_ID_META: request_id} if request_id else {})}


def requeue_at_front(services, job, subject: str | None) -> None:
    """Put a job that was handed back (or lost before it ran) at the front of its queue, ticket included."""
    q = queue(services, job.origin)
    with services.redis.pipeline() as pipe:
        pipe.zrem(q.failed_job_registry.key, job.id)
        job.started_at = None
        job.ended_at = None
        q._enqueue_job(job, pipeline=pipe, at_front=True)
        QueueTracker(services.redis).handed_back(job.origin, job.id, subject, pipeline=pipe)
        pipe.execute()


def _drop_job(services, queue_name: str, job: Job) -> None:
    job.delete(remove_from_queue=True)  # the job hash, its results, and its place in every registry
    QueueTracker(services.redis).finished(queue_name, job.id, measure=False)


def _job_mentions(job: Job, needles: set[str]) -> bool:
    def mentions(value) -> bool:
        if isinstance(value, str):
            return any(needle in value for needle in needles)
        if isinstance(value, dict):
            return any(mentions(k) or mentions(v) for k, v in value.items())
        if isinstance(value, (list, tuple, set)):
            return any(mentions(v) for v in value)
        return False

    try:
        return job.id in needles or mentions(list(job.args)) or mentions(job.kwargs) or mentions(job.meta)
    except Exception:  # a payload that no longer deserialises (code moved) cannot be judged; leave it
        return False


def delete_jobs_of(services, needles: set[str]) -> int:
    """Every RQ job (waiting, deferred, scheduled, finished, failed, canceled) whose arguments, meta or id name one
    of ``needles`` (the user's id and their avatars' and renders' ids) is deleted with its results. A job running
    right now is left to finish: it cannot write anything back once the user's key is shredded."""
    deleted = 0
    for name in ALL_QUEUES:
        q = queue(services, name)
        registries = (q.deferred_job_registry, q.scheduled_job_registry, q.finished_job_registry,
                      q.failed_job_registry, q.canceled_job_registry)
        job_ids = set(q.get_job_ids())
        for registry in registries:
            job_ids.update(registry.get_job_ids())
        for job in Job.fetch_many(sorted(job_ids), connection=services.redis):
            if job is None or not _job_mentions(job, needles):
                continue
            if job.get_status(refresh=False) == "started":
                continue
            _drop_job(services, name, job)
            deleted += 1
    return deleted


def enqueue_message(services, message_id: str, backoff_s: list[int]):
    """A subscribe message, sent by a job of its own so a GPU job never waits on (or fails with) WeChat."""
    return enqueue(services, DEFAULT, SEND_MESSAGE, message_id, job_id=keys.message_job_id(message_id),
                   retry=Retry(max=len(backoff_s), interval=backoff_s))


def enqueue_judging(services, avatar_id: str, photo_id: str, backoff_s: list[int]):
    """One uploaded photo's face judging, on the intake queue (portraits.avatars.judge_upload)."""
    return enqueue(services, INTAKE, JUDGE_PHOTO, avatar_id, photo_id, job_id=keys.judge_job_id(photo_id),
                   retry=Retry(max=len(backoff_s), interval=backoff_s))


def job_status(services, job_id: str) -> str:
    """RQ's word for a job ('queued', 'started', 'failed', ...), or 'expired' once RQ no longer has it."""
    return job_statuses(services, [job_id])[0]


def job_statuses(services, job_ids: list[str]) -> list[str]:
    """job_status for many jobs in one round trip (the sweep asks about every job owed)."""
    with services.redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(Job.key_for(job_id), "status")
        return [raw.decode() if raw is not None else "expired" for raw in pipe.execute()]


def default_queue_counts(services, name: str) -> tuple[int, int]:
    """(waiting, running) of a non-GPU queue, from RQ's own list and registry."""
    q = queue(services, name)
    return q.count, StartedJobRegistry(queue=q).count


def gpu_queue_counts(services) -> list[dict]:
    """Jobs waiting and running, and live workers, of each GPU queue, as the queue tracker counts them (the
    console's numbers; the metrics' queue gauges)."""
    tracker = QueueTracker(services.redis)
    return [{"queue": name, "waiting": tracker.waiting_count(name), "running": tracker.running_count(name),
             "workers": tracker.live_workers(name)} for name in GPU_QUEUES]


def live_workers(services) -> list[dict]:
    return sorted(({"name": worker.name, "state": worker.get_state(), "queues": ", ".join(worker.queue_names()),
                    "job": worker.get_current_job_id(), "heartbeat": worker.last_heartbeat}
                   for worker in Worker.all(connection=services.redis)), key=lambda row: row["name"])
