"""Finding GPU jobs whose worker died, and handing jobs back when a worker is asked to stop.

A GPU worker's execution stays in RQ's StartedJobRegistry only as long as its heartbeat thread keeps it there
(WORKER_DEAD_AFTER_S). When a worker or its process is SIGKILLed (out of memory, driver crash), the entry expires;
the reaper lets RQ's own abandoned-job handling move it to the FailedJobRegistry, then walks the GPU queues'
FailedJobRegistry. The same walk covers a job RQ failed before our code ran at all. For each failed job not yet
looked at, the job id names the subject and the attempt (`train-<avatar>-<n>`, `render-<render>-<n>`); only if the
avatar or render is still on that very attempt does the reaper call the ordinary, idempotent failure handler
(retry, or fail and refund). Jobs our own code already moved on are stale and left alone, so a refund is never made
twice; "stale" never means "thrown away": whatever the step that moved it on still owes (a refund not yet asked for,
a credit not yet returned, an order not yet fulfilled, photos not yet purged) is recorded in MongoDB and done by the
sweep (portraits.sweeper). The reaper runs periodically (jobs.periodic) and when a GPU worker starts, in any process that has the
database; a short claim in Redis keeps two reapers off the same job.
"""
from __future__ import annotations

import logging
import re
import secrets

from rq.job import Job
from rq.exceptions import NoSuchJobError

from jobs import context
from portraits import avatars, renders, states, tasks
from portraits.queue.tracking import PREFIX, QueueTracker

log = logging.getLogger(__name__)

REAP_INTERVAL_S = 30
CLAIM_TTL_S = 120
JOB_ID = re.compile(r"^(train|render)-(.+)-(\d+)$")
# kind -> (entity, attempts field, subject prefix)
KINDS = {"train": ("avatar", "train_attempts", "avatar"), "render": ("render", "attempts", "render")}
LOST_REASON = "worker_lost"


def parse_job_id(job_id: str):
    match = JOB_ID.match(job_id)
    if match is None:
        return None
    return match.group(1), match.group(2), int(match.group(3))


def _reaped_key(job_id: str) -> str:
    return f"{PREFIX}:reaped:{job_id}"


def reap_lost_jobs() -> list[dict]:
    """Periodic entry point (jobs.periodic)."""
    return reap(context.services())


def reap(services) -> list[dict]:
    """Recover every GPU job that died without our code handling it; returns what was done, one dict per job."""
    outcomes = []
    tracker = QueueTracker(services.redis)
    for name in tasks.GPU_QUEUES:
        q = tasks.queue(services, name)
        q.started_job_registry.cleanup()  # RQ's abandoned-job handling: expired executions -> FailedJobRegistry
        failed = [job_id.decode() for job_id in services.redis.zrange(q.failed_job_registry.key, 0, -1)]
        if failed:
            with services.redis.pipeline(transaction=False) as pipe:
                for job_id in failed:
                    pipe.exists(_reaped_key(job_id))
                seen = pipe.execute()
            for job_id, already in zip(failed, seen):
                if not already:
                    outcome = recover(services, name, job_id)
                    if outcome is not None:
                        outcomes.append({"job_id": job_id, "outcome": outcome})
        _drop_stale_running(services, tracker, name)
    for entry in outcomes:
        log.warning("reaper: %s -> %s", entry["job_id"], entry["outcome"])
    return outcomes


def recover(services, queue_name: str, job_id: str) -> str | None:
    """Handle one failed or abandoned GPU job exactly once; None when another reaper holds it right now."""
    claim = f"{PREFIX}:reaping:{job_id}"
    if not services.redis.set(claim, secrets.token_hex(8), nx=True, ex=CLAIM_TTL_S):
        return None
    try:
        parsed = parse_job_id(job_id)
        outcome = "unknown_job" if parsed is None else _recover_subject(services, *parsed)
        services.redis.set(_reaped_key(job_id), outcome, ex=tasks.FAILURE_TTL_S)
        QueueTracker(services.redis).drop(queue_name, job_id)
        return outcome
    finally:
        services.redis.delete(claim)


def _recover_subject(services, kind: str, subject_id: str, attempt: int) -> str:
    entity, attempts_field, _ = KINDS[kind]
    collection = services.db[states.COLLECTIONS[entity]]
    doc = collection.find_one({"_id": subject_id}, {"state": 1, attempts_field: 1})
    if doc is None:
        return "gone"
    tries = doc.get(attempts_field, 0)
    running_state = "training" if kind == "train" else "rendering"
    if doc["state"] == "queued" and tries == attempt - 1:
        # Lost before our code ran: it counts as an attempt, so a job that can never start is not retried forever.
        started = states.transition(services.db, entity, subject_id, running_state, expect={"queued"},
                                    by="reaper", reason="job_lost_before_start", inc={attempts_field: 1},
                                    extra_filter={attempts_field: tries})
        if started is None:
            return "already_handled"
    elif not (doc["state"] == running_state and tries == attempt):
        return "stale"
    handler = avatars.fail_training if kind == "train" else renders.fail_render
    return handler(services, subject_id, LOST_REASON)


def _drop_stale_running(services, tracker: QueueTracker, queue_name: str) -> None:
    """Running entries whose RQ job is no longer started would inflate the ETA; the job was handled elsewhere."""
    for job_id in tracker.running_jobs(queue_name):
        raw = services.redis.hget(Job.key_for(job_id), "status")
        status = raw.decode() if raw is not None else None
        if status in ("started", "queued", "scheduled", "deferred"):
            continue
        if status == "failed" and not services.redis.exists(_reaped_key(job_id)):
            continue  # not looked at yet: recover() drops it once handled
        tracker.drop(queue_name, job_id)


def hand_back(services, job, worker_name: str) -> str:
    """The job raised HandBack: its subject returns to `queued` with the attempt given back, and the same job goes
    to the front of its queue."""
    parsed = parse_job_id(job.id)
    if parsed is None:
        return "unknown_job"
    kind, subject_id, attempt = parsed
    entity, attempts_field, subject_prefix = KINDS[kind]
    running_state = "training" if kind == "train" else "rendering"
    moved = states.transition(services.db, entity, subject_id, "queued", expect={running_state},
                              by=f"worker:{worker_name}", reason="worker_stopping", inc={attempts_field: -1},
                              extra_filter={attempts_field: attempt})
    if moved is None:
        return "already_handled"  # the reaper sees the failed job and finds it stale or handles it
    subject = f"{subject_prefix}:{subject_id}"
    QueueTracker(services.redis).set_subject(subject, state="queued", progress=0)
    try:
        fresh = Job.fetch(job.id, connection=services.redis)
    except NoSuchJobError:
        fresh = job
    tasks.requeue_at_front(services, fresh, subject)
    return "handed_back"
