"""GET /api/v1/avatars/{id}/queue — the poll every waiting client repeats, answered from Redis alone.

The token is checked by its signature (no user lookup) and against the owner and token generation kept with the
tracked subject; the subject, position and ETA come from Redis (usually this process's memory of it, see
portraits.queue.local_view). MongoDB is read only when Redis does not know the avatar: one not queued yet (still
collecting photos), or one whose queue entry Redis lost, which is queued again on the spot (portraits.sweeper)
so a paying user is never told their avatar does not exist.
"""
from __future__ import annotations

from miniapp_api.api.auth import bearer_token
from portraits import keys, sweeper, tasks, users
from portraits.queue import lanes
from portraits.errors import not_found
from portraits.queue.tracking import QueueTracker


def answer(services, authorization: str, avatar_id: str) -> dict:
    token = bearer_token(authorization)
    claims = users.token_claims(services.settings, token)
    tracker = tasks.queue_tracker(services)
    tracked, where = tracker.poll(keys.avatar_subject(avatar_id))
    if not tracked:
        tracked, where = _from_database(services, token, avatar_id, tracker)
    if tracked.get("owner") != claims.get("uid"):
        raise not_found("avatar")
    if tracked.get("owner_gen", "0") != str(claims.get("gen", 0)):
        raise users.invalid_token()  # revoked (consent withdrawn since it was issued), as every other route would say
    return queue_json(tracker, tracked, where)


def _from_database(services, token: str, avatar_id: str, tracker: QueueTracker) -> tuple[dict, dict | None]:
    user = users.user_from_token(services, token)  # a deleted or revoked user is refused here, as everywhere
    avatar = services.db.avatars.find_one({"_id": avatar_id, "user_id": user["_id"]})
    if avatar is None:
        raise not_found("avatar")
    if avatar["state"] == "queued" and sweeper.heal_queued_avatar(services, avatar):
        tracked, where = tracker.poll(keys.avatar_subject(avatar_id))
        if tracked:
            return tracked, where
    return {"owner": user["_id"], "owner_gen": str(user.get("token_generation", 0)), "state": avatar["state"],
            "progress": 1 if avatar["state"] == "trained" else 0, "lane": lanes.lane_of(avatar)}, None


def queue_json(tracker: QueueTracker, tracked: dict, where: dict | None = None) -> dict:
    state = tracked.get("state", "queued")
    progress = float(tracked.get("progress") or 0)
    if state not in ("queued", "training") or not tracked.get("job_id"):
        where = {"position": 0, "ahead": 0, "eta_seconds": 0}
    elif where is None:
        where = tracker.position(tracked["queue"], tracked["job_id"], progress)
    lane = lanes.QUEUE_LANE.get(tracked.get("queue"), tracked.get("lane") or lanes.STANDARD)
    body = {"state": state, "lane": lane, "position": where["position"], "ahead": where["ahead"],
            "eta_seconds": where["eta_seconds"], "progress": progress}
    if tracked.get("total"):
        body.update(step=int(tracked.get("step") or 0), total=int(tracked["total"]))
    return body
