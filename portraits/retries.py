"""What happens to GPU work that failed for a technical reason: retried while attempts remain, else failed.

One mechanism for trainings and renders; each caller adds what failing means for it (a refund, a credit back).
Every step is a state transition, so running it twice, or from 50 places at once, acts once.
"""
from __future__ import annotations

from portraits import states
from portraits.queue.tracking import QueueTracker


def retry_or_fail(services, entity: str, doc_id: str, *, attempts_field: str, retries: int, running_state: str,
                  enqueue, subject: str, reason: str) -> tuple[str, dict | None]:
    """Returns (outcome, the failed document when this call failed it): outcome is gone, retried, already_handled
    or failed."""
    doc = services.db[states.COLLECTIONS[entity]].find_one({"_id": doc_id})
    if doc is None:
        return "gone", None
    if doc.get(attempts_field, 0) <= retries:
        requeued = states.transition(services.db, entity, doc_id, "queued", expect={running_state}, reason=reason)
        if requeued is None:
            return "already_handled", None
        enqueue(services, requeued)
        return "retried", None
    failed = states.transition(services.db, entity, doc_id, "failed", expect={running_state, "queued"},
                               reason=reason, set_fields={"failure": reason})
    if failed is None:
        return "already_handled", None
    QueueTracker(services.redis).set_subject(subject, state="failed")
    return "failed", failed
