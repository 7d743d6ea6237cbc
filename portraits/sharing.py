"""The mini-program code on share posters (getwxacodeunlimit): fetched once per image, kept sealed beside it, owed
while WeChat cannot make it. Moments does not allow QR codes on shared images, so there is no QR fallback: a
poster waits for its code (GET .../poster answers 202 pending) instead.

An image's `share_code` says where its code stands: absent (never asked for), `pending` (owed: the job
`share-code-<image>` fetches it, retried after SHARE_CODE_BACKOFF_S; the sweep queues it again when its job ended
without the code or Redis lost it) or `ready` (the sealed code is in the blob store).
"""
from __future__ import annotations

import logging

from rq import Retry

from models.posters import UnreadableAppCode, read_app_code
from portraits import keys, states, tasks
from portraits.gateways.wechat import WeChatUnavailable
from portraits.store.vault import KeyShredded

log = logging.getLogger(__name__)

SHARE_PAGE = "pages/index/index"
SCENE_MAX_CHARS = 32  # WeChat's limit for getwxacodeunlimit's scene
APP_CODE_WIDTH = 280
PENDING = "pending"
READY = "ready"
LIVE = ("queued", "started", "scheduled", "deferred")


def scene(image_id: str) -> str:
    return f"i={image_id}"[:SCENE_MAX_CHARS]


def share_code(services, image: dict) -> bytes | None:
    """The image's mini-program code, or None while it is owed: asked of WeChat on first use; when WeChat cannot
    make it, owed to a job (the caller answers pending and the client asks again later)."""
    state = (image.get("share_code") or {}).get("state")
    if state == READY:
        return services.sealed.get(image["user_id"], keys.share_code(image["user_id"], image["_id"]))
    if state == PENDING:
        return None  # the job retries with backoff; a poll does not call WeChat again
    try:
        return _fetch_and_keep(services, image)
    except WeChatUnavailable as error:
        _owe(services, image, str(error))
        return None


def retry_after_s(settings) -> int:
    return max(1, settings.share_code_backoff_s[0])


def fetch_owed(services, image_id: str) -> str:
    """The job: fetch an owed code. Raises WeChatUnavailable while WeChat cannot make it, so RQ retries it."""
    image = services.db.images.find_one({"_id": image_id})
    if image is None:
        return "gone"  # erased with its user meanwhile
    if (image.get("share_code") or {}).get("state") != PENDING:
        return "not_owed"
    try:
        _fetch_and_keep(services, image)
    except WeChatUnavailable as error:
        services.db.images.update_one({"_id": image_id, "share_code.state": PENDING},
                                      {"$inc": {"share_code.attempts": 1},
                                       "$set": {"share_code.last_error": str(error)[:200]}})
        raise
    except KeyShredded:
        return "gone"
    return "made"


def heal(services, older_than) -> dict[str, int]:
    """The sweep's part: an owed code whose job is no longer going to run (its retries spent, or lost with Redis)
    is queued again."""
    owed = list(services.db.images.find({"share_code.state": PENDING, "share_code.since": {"$lt": older_than}},
                                        {"_id": 1}))
    statuses = tasks.job_statuses(services, [keys.share_code_job_id(i["_id"]) for i in owed])
    requeued = 0
    for image, status in zip(owed, statuses):
        if status not in LIVE:
            _enqueue(services, image["_id"])
            requeued += 1
    return {"share_code_requeued": requeued}


def _fetch_and_keep(services, image: dict) -> bytes:
    code = services.wechat.unlimited_wxa_code(scene=scene(image["_id"]), page=SHARE_PAGE, width=APP_CODE_WIDTH)
    try:
        read_app_code(code)
    except UnreadableAppCode as error:
        raise WeChatUnavailable(f"getwxacodeunlimit answered an image that does not decode: {error}") from error
    services.sealed.put(image["user_id"], keys.share_code(image["user_id"], image["_id"]), code)
    services.db.images.update_one({"_id": image["_id"]},
                                  {"$set": {"share_code": {"state": READY, "made_at": states.now()}}})
    return code


def _owe(services, image: dict, error: str) -> None:
    owed = services.db.images.update_one(
        {"_id": image["_id"], "share_code": {"$exists": False}},
        {"$set": {"share_code": {"state": PENDING, "since": states.now(), "attempts": 1,
                                 "last_error": error[:200]}}})
    if owed.modified_count:
        log.warning("mini-program code owed for image %s: %s", image["_id"], error)
        _enqueue(services, image["_id"])


def _enqueue(services, image_id: str) -> None:
    backoff = list(services.settings.share_code_backoff_s)
    tasks.enqueue(services, tasks.DEFAULT, tasks.FETCH_SHARE_CODE, image_id,
                  job_id=keys.share_code_job_id(image_id), retry=Retry(max=len(backoff), interval=backoff))
