"""GET /api/v1/avatars/{id}/queue — the poll every waiting client repeats, answered from Redis alone.

The token is checked by its signature (no user lookup) and against the owner and token generation kept with the
tracked subject; the subject, position and ETA come from Redis (usually this process's memory of it, see
portraits.queue.local_view). MongoDB is never touched.
"""
from __future__ import annotations

from miniapp_api.api.auth import bearer_token
from portraits import keys, users
from portraits.errors import not_found
from portraits.queue.tracking import QueueTracker


def answer(services, authorization: str, avatar_id: str) -> dict:
    claims = users.token_claims(services.settings, bearer_token(authorization))
    tracker = QueueTracker(services.redis)
    tracked, where = tracker.poll(keys.avatar_subject(avatar_id))
    if not tracked or tracked.get("owner") != claims.get("uid"):
        raise not_found("avatar")
    if tracked.get("owner_gen", "0") != str(claims.get("gen", 0)):
        raise users.invalid_token()  # revoked (consent withdrawn since it was issued), as every other route would say
    return queue_json(tracker, tracked, where)


def queue_json(tracker: QueueTracker, tracked: dict, where: dict | None = None) -> dict:
    state = tracked.get("state", "queued")
    progress = float(tracked.get("progress") or 0)
    if state not in ("queued", "training") or not tracked.get("job_id"):
        where = {"position": 0, "ahead": 0, "eta_seconds": 0}
    elif where is None:
        where = tracker.position(tracked["queue"], tracked["job_id"], progress)
    body = {"state": state, "position": where["position"], "ahead": where["ahead"],
            "eta_seconds": where["eta_seconds"], "progress": progress}
    if tracked.get("total"):
        body.update(step=int(tracked.get("step") or 0), total=int(tracked["total"]))
    return body
