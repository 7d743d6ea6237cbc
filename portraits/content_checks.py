"""Content security of every medium: each user photo and each generated portrait is checked by WeChat's
security.mediaCheckAsync before it counts or is delivered.

One check per medium, in `content_checks` (its state machine is in portraits.states):
- `request_check` records it `queued` and enqueues its submission on the default queue (the upload or the render
  never waits on WeChat);
- `submit` claims it (`submitting`), takes one call from the quota counted in Redis per minute and per day
  (CONTENT_CHECK_PER_MINUTE / _PER_DAY) and calls WeChat with a signed, expiring link to the medium
  (`media_link`); it is then `submitted` with WeChat's trace_id. Out of quota (ours or WeChat's 45011/45009) or
  WeChat unreachable, it goes back to `queued`: the queue the console shows, drained by the sweep;
- the verdict arrives as a `wxa_media_check` message push: `record_verdict` keeps it by trace_id first, then
  `decide` moves the check. The submitter calls `decide` too once it has written the trace_id, so a push that
  lands before the trace_id is written (WeChat can be that fast) is applied by whichever of the two comes second;
- a check `submitted` longer than CONTENT_CHECK_TIMEOUT_S goes `timeout` (`expire_overdue`, from the sweep).
What a decided check means for its photo or portrait (`outcome`) is applied by portraits.moderation.
"""
from __future__ import annotations

import time
from datetime import timedelta

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from portraits import keys, states, tasks
from portraits.errors import Forbidden, not_found
from portraits.gateways.wechat import MediaCheckQuotaExhausted, WeChatUnavailable

KINDS = ("photo", "image", "preview")
DECIDED = ("pass", "risky", "review", "timeout")
WAITING = ("queued", "submitting", "submitted")
# A verdict's suggest as WeChat words it -> the check's state. Anything else is read as `review` (unsure).
SUGGESTS = {"pass": "pass", "risky": "risky", "review": "review"}
MEDIA_LINK_SALT = "media-link"
# Redis counters outlive their window by this much (a minute's counter is read for one minute only).
QUOTA_WINDOWS = {"minute": 60, "day": 86400}
# WeChat's day is Beijing's.
BEIJING_OFFSET_S = 8 * 3600
# What the media link serves while the check waits for WeChat to fetch it.
SERVED_STATES = ("submitting", "submitted")


def request_check(services, kind: str, subject_id: str, *, user: dict, blob_key: str, avatar_id: str | None = None,
                  render_id: str | None = None) -> dict:
    """Record the check of one medium and enqueue its submission."""
    check = record_check(services, kind, subject_id, user=user, blob_key=blob_key, avatar_id=avatar_id,
                         render_id=render_id)
    if check["state"] == "queued":
        enqueue_submit(services, check)
    return check


def record_check(services, kind: str, subject_id: str, *, user: dict, blob_key: str, avatar_id: str | None = None,
                 render_id: str | None = None) -> dict:
    """Record the check of one medium, once (a replayed step finds it recorded), without enqueuing it: a check
    recorded and never enqueued (the process died in between) is submitted by the sweep."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    check_id = keys.content_check_id(kind, subject_id)
    at = states.now()
    check = {"_id": check_id, "kind": kind, "subject_id": subject_id, "user_id": user["_id"],
             "openid": user["openid"], "blob_key": blob_key, "avatar_id": avatar_id, "render_id": render_id,
             "state": "queued", "submissions": 0, "errors": 0, "created_at": at, "updated_at": at,
             "history": states.initial_history("queued", f"{kind}:{subject_id}")}
    services.db.content_checks.update_one({"_id": check_id}, {"$setOnInsert": check}, upsert=True)
    return services.db.content_checks.find_one({"_id": check_id})


def forget_check(services, kind: str, subject_id: str) -> None:
    """The medium was never recorded after all (its upload lost a race): its check goes."""
    services.db.content_checks.delete_one({"_id": keys.content_check_id(kind, subject_id), "state": "queued"})


def enqueue_submit(services, check: dict) -> None:
    tasks.enqueue(services, tasks.DEFAULT, tasks.SUBMIT_CONTENT_CHECK, check["_id"],
                  job_id=keys.content_check_job_id(check["_id"], check.get("submissions", 0) + 1))


# ------------------------------------------------------------------------------------------------- quota


def take_quota(services) -> bool:
    """Count one mediaCheckAsync call against this minute's and today's quota; False (nothing counted) when either
    is used up."""
    settings = services.settings
    now = time.time()
    periods = {"minute": int(now // 60), "day": int((now + BEIJING_OFFSET_S) // 86400)}
    limits = {"minute": settings.content_check_per_minute, "day": settings.content_check_per_day}
    with services.redis.pipeline() as pipe:
        for window, period in periods.items():
            pipe.incr(keys.content_check_quota(window, period))
            pipe.expire(keys.content_check_quota(window, period), QUOTA_WINDOWS[window] * 2)
        counts = pipe.execute()[::2]
    if all(count <= limits[window] for window, count in zip(periods, counts)):
        return True
    with services.redis.pipeline() as pipe:
        for window, period in periods.items():
            pipe.decr(keys.content_check_quota(window, period))
        pipe.execute()
    return False


def quota_used(services) -> dict:
    now = time.time()
    periods = {"minute": int(now // 60), "day": int((now + BEIJING_OFFSET_S) // 86400)}
    values = services.redis.mget([keys.content_check_quota(window, period) for window, period in periods.items()])
    return {window: int(value or 0) for window, value in zip(periods, values)}


# ------------------------------------------------------------------------------------------------- submission


def media_link(services, check_id: str) -> str:
    """The signed link WeChat fetches the medium from: it names this check only and expires after
    MEDIA_LINK_TTL_S."""
    token = URLSafeTimedSerializer(services.settings.secret_key, salt=MEDIA_LINK_SALT).dumps(check_id)
    return f"{services.settings.public_base_url}/api/v1/media/{token}"


def check_for_media_token(services, token: str) -> dict:
    """The check a media link names, while its medium is waiting to be fetched; refused when the link is forged
    (media_link_invalid) or expired (media_link_expired)."""
    serializer = URLSafeTimedSerializer(services.settings.secret_key, salt=MEDIA_LINK_SALT)
    try:
        check_id = serializer.loads(token, max_age=services.settings.media_link_ttl_s)
    except SignatureExpired:
        raise Forbidden("media_link_expired", "This media link has expired.") from None
    except BadSignature:
        raise Forbidden("media_link_invalid", "This media link is not valid.") from None
    check = services.db.content_checks.find_one({"_id": check_id, "state": {"$in": list(SERVED_STATES)}})
    if check is None:
        raise not_found("media")
    return check


def submit(services, check_id: str) -> tuple[str, dict | None]:
    """Submit one queued check to WeChat: (what happened, the check once submitted, else None)."""
    claimed = states.transition(services.db, "content_check", check_id, "submitting", expect={"queued"},
                                by="content-check", set_fields={"submitting_at": states.now()})
    if claimed is None:
        return "not_queued", None
    if not take_quota(services):
        return _back_to_queue(services, check_id, "quota"), None
    services.db.content_checks.update_one({"_id": check_id}, {"$inc": {"submissions": 1}})
    try:
        trace_id = services.wechat.media_check_async(media_link(services, check_id), claimed["openid"],
                                                     services.settings.content_check_scene)
    except MediaCheckQuotaExhausted:
        return _back_to_queue(services, check_id, "quota"), None
    except WeChatUnavailable:
        return _back_to_queue(services, check_id, "wechat_unavailable"), None
    submitted = states.transition(services.db, "content_check", check_id, "submitted", expect={"submitting"},
                                  by="content-check", set_fields={"trace_id": trace_id,
                                                                  "submitted_at": states.now()},
                                  unset_fields=("waiting_for",))
    return ("submitted", submitted) if submitted is not None else ("superseded", None)


def _back_to_queue(services, check_id: str, why: str) -> str:
    """The check waits in the queue (for quota, or for WeChat to answer again) until the sweep drains it."""
    states.transition(services.db, "content_check", check_id, "queued", expect={"submitting"}, by="content-check",
                      reason=why, set_fields={"waiting_for": why})
    return f"queued_{why}"


def release_stale_submissions(services, older_than) -> int:
    """Checks left `submitting` by a process that died during the call go back to the queue (WeChat may have taken
    the first call too: its verdict is then kept, unmatched, and the second one decides)."""
    released = 0
    for check in services.db.content_checks.find({"state": "submitting", "submitting_at": {"$lt": older_than}},
                                                 {"_id": 1}):
        released += _back_to_queue(services, check["_id"], "interrupted") == "queued_interrupted"
    return released


def queued(services, limit: int) -> list[dict]:
    return list(services.db.content_checks.find({"state": "queued"}).sort("created_at", 1).limit(limit))


def waiting_counts(services) -> dict:
    """Checks by waiting state, and how many of the queued wait for quota (the console's numbers)."""
    counts = {state: services.db.content_checks.count_documents({"state": state}) for state in WAITING}
    counts["waiting_for_quota"] = services.db.content_checks.count_documents({"state": "queued",
                                                                              "waiting_for": "quota"})
    return counts


# ------------------------------------------------------------------------------------------------- verdicts


def record_verdict(services, event: dict) -> str | None:
    """Keep a pushed verdict by its trace_id (first one wins: WeChat may push it more than once); the trace_id, or
    None when the event names none."""
    trace_id = event.get("trace_id")
    if not isinstance(trace_id, str) or not trace_id:
        return None
    result = event.get("result") if isinstance(event.get("result"), dict) else {}
    verdict = {"suggest": result.get("suggest"), "label": _int(result.get("label")),
               "errcode": _int(event.get("errcode")) or 0, "errmsg": event.get("errmsg"),
               "received_at": states.now()}
    services.db.content_verdicts.update_one({"_id": trace_id}, {"$setOnInsert": verdict}, upsert=True)
    return trace_id


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def decide(services, trace_id: str) -> dict | None:
    """Apply the verdict kept for trace_id to the check submitted under it; the check once decided (or queued
    again after an error verdict), None when either is not there yet or the check moved on."""
    verdict = services.db.content_verdicts.find_one({"_id": trace_id})
    check = services.db.content_checks.find_one({"trace_id": trace_id, "state": "submitted"})
    if verdict is None or check is None:
        return None
    fields = {"verdict": {k: verdict.get(k) for k in ("suggest", "label", "errcode", "errmsg")},
              "decided_at": states.now()}
    if verdict["errcode"]:
        # WeChat could not judge it (it could not fetch the medium): submitted again, a few times.
        if check.get("errors", 0) + 1 < services.settings.content_check_attempts:
            again = states.transition(services.db, "content_check", check["_id"], "queued", expect={"submitted"},
                                      by=f"push:{trace_id}", reason=f"verdict_error:{verdict['errcode']}",
                                      extra_filter={"trace_id": trace_id}, inc={"errors": 1},
                                      set_fields={"waiting_for": "resubmission"}, unset_fields=("trace_id",))
            if again is not None:
                enqueue_submit(services, again)
            return again
        return states.transition(services.db, "content_check", check["_id"], "timeout", expect={"submitted"},
                                 by=f"push:{trace_id}", reason="verdict_errors", extra_filter={"trace_id": trace_id},
                                 inc={"errors": 1}, set_fields=fields)
    target = SUGGESTS.get(verdict.get("suggest"), "review")
    return states.transition(services.db, "content_check", check["_id"], target, expect={"submitted"},
                             by=f"push:{trace_id}", extra_filter={"trace_id": trace_id}, set_fields=fields)


def expire_overdue(services, older_than) -> list[dict]:
    """Checks submitted before `older_than` whose verdict never came: `timeout` (CONTENT_CHECK_TIMEOUT_POLICY says
    what that means)."""
    expired = []
    for check in services.db.content_checks.find({"state": "submitted", "submitted_at": {"$lt": older_than}},
                                                 {"_id": 1}):
        moved = states.transition(services.db, "content_check", check["_id"], "timeout", expect={"submitted"},
                                  by="sweeper", reason="no_verdict", set_fields={"decided_at": states.now()})
        if moved is not None:
            expired.append(moved)
    return expired


def timeout_cutoff(services):
    return states.now() - timedelta(seconds=services.settings.content_check_timeout_s)


def outcome(settings, check: dict) -> tuple[bool, str | None]:
    """(counted, refusal reason) of a decided check: risky is refused; review and timeout as their policy says."""
    state = check["state"]
    if state == "pass":
        return True, None
    if state == "risky":
        return False, "content_risky"
    policy = settings.content_check_review_policy if state == "review" else settings.content_check_timeout_policy
    return (True, None) if policy == "accept" else (False, f"content_{state}")


def unsettled(services) -> list[dict]:
    """Decided checks whose photo or portrait was not yet told (the process died in between)."""
    return list(services.db.content_checks.find({"state": {"$in": list(DECIDED)}, "settled_at": {"$exists": False}}))


def mark_settled(services, check_id: str) -> None:
    services.db.content_checks.update_one({"_id": check_id}, {"$set": {"settled_at": states.now()}})


# An image is delivered unless its content check is still pending or refused it: passed by the check (or by its
# policy), and images from before the checks have no verdict. One rule, as a predicate and as a MongoDB filter.
WITHHELD_CHECKS = ("pending", "refused")
DELIVERED_IMAGE = {"content_check": {"$nin": list(WITHHELD_CHECKS)}}


def image_delivered(image: dict) -> bool:
    """The image document matches DELIVERED_IMAGE."""
    return image.get("content_check") not in WITHHELD_CHECKS
