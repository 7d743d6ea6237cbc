"""What the service promises to delete, deleted from every store it was written to.

Photos go once the avatar is trained (or failed and refunded); everything of a user goes on DELETE /me or on
withdrawal of face-processing consent. Payment records stay for accounting with the user replaced by a one-way hash.
"""
from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta

from rq.job import Job

from jobs import queues
from jobs.tracking import QueueTracker
from miniapp_api import states


def user_ref(services, user_id: str) -> str:
    return hmac.new(services.settings.secret_key.encode(), user_id.encode(), hashlib.sha256).hexdigest()[:32]


def label_log_entry(services, content_id: str, user_id: str, at) -> dict:
    return {"content_id": content_id, "user_ref": user_ref(services, user_id), "created_at": at,
            "provider": services.settings.provider_name}


def _photo_blob_keys(avatar: dict) -> list[str]:
    keys = []
    for photo in avatar.get("photos", []):
        keys += [photo[k] for k in ("crop_key", "embedding_key") if photo.get(k)]
    return keys


def purge_avatar_photos(services, avatar: dict) -> int:
    """Photos, crops and per-photo embeddings go; the LoRA and the identity pivot stay as the avatar itself."""
    keys = _photo_blob_keys(avatar)
    for key in keys:
        services.blobs.delete(key)
    services.db.avatars.update_one(
        {"_id": avatar["_id"]},
        {"$set": {"photos": [{"id": p["id"], "role": p.get("role"), "accepted": p["accepted"],
                              "reasons": p.get("reasons", [])} for p in avatar.get("photos", [])],
                  "photos_purged_at": states.now()}},
    )
    return len(keys)


def purge_failed_avatar_photos(services, avatar_id: str) -> int:
    """A failed avatar is of no further use: its photos, and whatever training left behind, go."""
    from jobs.training import lora_key, pivot_key

    avatar = services.db.avatars.find_one({"_id": avatar_id})
    if avatar is None or avatar["state"] != "failed":
        return 0
    services.blobs.delete(lora_key(avatar))
    services.blobs.delete(pivot_key(avatar))
    return purge_avatar_photos(services, avatar)


def purge_stale_collecting(services) -> int:
    """Avatars left collecting (or ready but never paid) past COLLECTING_TTL_S lose their photos and are removed."""
    cutoff = states.now() - timedelta(seconds=services.settings.collecting_ttl_s)
    removed = 0
    for avatar in services.db.avatars.find({"state": {"$in": ["collecting", "ready"]}, "updated_at": {"$lt": cutoff}}):
        if services.db.orders.find_one({"avatar_id": avatar["_id"], "state": {"$nin": ["closed"]}}):
            continue
        _delete_avatar(services, avatar)
        removed += 1
    return removed


def _delete_avatar(services, avatar: dict) -> None:
    """The avatar's blobs, queue entry and document. Its RQ jobs are the caller's to delete (erase_user_data does,
    in one pass over every queue); an avatar that was never paid for has none."""
    from jobs.training import lora_key, pivot_key, subject

    for key in _photo_blob_keys(avatar) + [lora_key(avatar), pivot_key(avatar)]:
        services.blobs.delete(key)
    QueueTracker(services.redis).forget_subject(subject(avatar["_id"]))
    services.db.avatars.delete_one({"_id": avatar["_id"]})


def _drop_job(services, queue: str, job: Job) -> None:
    job.delete(remove_from_queue=True)  # the job hash, its results, and its place in every registry
    QueueTracker(services.redis).finished(queue, job.id, measure=False)


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
    for name in queues.ALL_QUEUES:
        queue = queues.queue(services, name)
        registries = (queue.deferred_job_registry, queue.scheduled_job_registry, queue.finished_job_registry,
                      queue.failed_job_registry, queue.canceled_job_registry)
        job_ids = set(queue.get_job_ids())
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


def erase_user_data(services, user: dict, reason: str) -> dict:
    """Everything personal of a user, from MongoDB, the blob store and Redis; undelivered paid orders refunded."""
    from jobs.rendering import subject as render_subject
    from miniapp_api.billing import expire_order, request_refund

    user_id = user["_id"]
    for order in services.db.orders.find({"user_id": user_id, "state": "paid"}):
        request_refund(services, order["_id"], reason=reason, by=f"user:{user_id}")
    for order in services.db.orders.find({"user_id": user_id, "state": "created"}):
        # Closed at WeChat Pay too, so the user can no longer pay it; if WeChat Pay cannot be reached now, it is
        # closed here and reconciliation closes it there later.
        if expire_order(services, order["_id"], by=f"user:{user_id}") == "close_failed":
            states.transition(services.db, "order", order["_id"], "closed", reason=reason,
                              unset_fields=("open_avatar_id",), set_fields={"gateway_close_pending": True})
    avatars = list(services.db.avatars.find({"user_id": user_id}))
    renders = list(services.db.renders.find({"user_id": user_id}))
    # Jobs first, so that no worker takes one of them up after its avatar or render is gone.
    jobs = delete_jobs_of(services, {user_id} | {a["_id"] for a in avatars} | {r["_id"] for r in renders})
    for avatar in avatars:
        _delete_avatar(services, avatar)
    for render in renders:
        QueueTracker(services.redis).forget_subject(render_subject(render["_id"]))
    services.db.renders.delete_many({"user_id": user_id})
    services.db.images.delete_many({"user_id": user_id})
    services.blobs.delete_prefix(f"users/{user_id}/")
    # Crypto-shredding: whatever copy of a sealed blob survives elsewhere (a backup, a replica) is unreadable now.
    services.vault.shred(user_id)
    return {"avatars": len(avatars), "renders": len(renders), "jobs": jobs}


def _scrub(value, replacements: dict[str, str]):
    if isinstance(value, str):
        for old, new in replacements.items():
            value = value.replace(old, new)
        return value
    if isinstance(value, dict):
        return {k: _scrub(v, replacements) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, replacements) for v in value]
    return value


def pseudonymise_orders(services, user: dict) -> int:
    """Payment records stay for accounting; every mention of the user in them (owner, openid, who requested a
    refund, state history, payment alerts) becomes the one-way reference."""
    ref = user_ref(services, user["_id"])
    replacements = {user["_id"]: ref}
    if user.get("openid"):
        replacements[user["openid"]] = ref
    orders = list(services.db.orders.find({"user_id": user["_id"]}))
    for order in orders:
        scrubbed = _scrub({k: v for k, v in order.items() if k != "openid"}, replacements)
        scrubbed["user_erased"] = True
        services.db.orders.replace_one({"_id": order["_id"]}, scrubbed)
    for alert in services.db.payment_alerts.find({"order_id": {"$in": [o["_id"] for o in orders]}}):
        services.db.payment_alerts.replace_one({"_id": alert["_id"]}, _scrub(alert, replacements))
    return len(orders)


def delete_user(services, user: dict) -> None:
    erase_user_data(services, user, reason="user_deleted")
    pseudonymise_orders(services, user)
    # With the user document gone every token of theirs is refused (auth looks the user up on each request).
    services.db.users.delete_one({"_id": user["_id"]})


def withdraw_face_consent(services, user: dict) -> dict:
    """The account stays (orders, the right to consent again); everything face-related goes, and so do the
    user's sessions: every token issued so far is revoked, and the client logs in again."""
    erased = erase_user_data(services, user, reason="consent_withdrawn")
    services.db.users.update_one(
        {"_id": user["_id"]},
        {"$set": {"consents.face_processing.withdrawn_at": states.now()}, "$unset": {"subscriptions": ""},
         "$inc": {"token_generation": 1}},
    )
    services.vault.create_key(user["_id"])
    return {**erased, "tokens_revoked": True}
