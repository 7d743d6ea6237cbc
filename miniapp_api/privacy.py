"""What the service promises to delete, deleted from every store it was written to.

Photos go once the avatar is trained (or failed and refunded); everything of a user goes on DELETE /me or on
withdrawal of face-processing consent. Payment records stay for accounting with the user replaced by a one-way hash.
"""
from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta

from rq.job import Job
from rq.exceptions import NoSuchJobError

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
    from jobs.training import lora_key, pivot_key

    for key in _photo_blob_keys(avatar) + [lora_key(avatar), pivot_key(avatar)]:
        services.blobs.delete(key)
    _delete_jobs(services, "train", avatar["_id"], avatar.get("train_attempts", 0) + 1)
    QueueTracker(services.redis).forget_subject(f"avatar:{avatar['_id']}")
    services.db.avatars.delete_one({"_id": avatar["_id"]})


def _delete_jobs(services, kind: str, subject_id: str, attempts: int) -> None:
    for attempt in range(1, attempts + 2):
        try:
            job = Job.fetch(f"{kind}-{subject_id}-{attempt}", connection=services.redis)
        except NoSuchJobError:
            continue
        job.cancel() if job.get_status() == "queued" else None
        job.delete()


def erase_user_data(services, user: dict, reason: str) -> dict:
    """Everything personal of a user, from MongoDB, the blob store and Redis; undelivered paid orders refunded."""
    from miniapp_api.billing import request_refund

    user_id = user["_id"]
    for order in services.db.orders.find({"user_id": user_id, "state": "paid"}):
        request_refund(services, order["_id"], reason=reason, by=f"user:{user_id}")
    for order in services.db.orders.find({"user_id": user_id, "state": "created"}):
        states.transition(services.db, "order", order["_id"], "closed", reason=reason, unset_fields=("open_avatar_id",))
    avatars = list(services.db.avatars.find({"user_id": user_id}))
    for avatar in avatars:
        _delete_avatar(services, avatar)
    renders = list(services.db.renders.find({"user_id": user_id}))
    for render in renders:
        _delete_jobs(services, "render", render["_id"], render.get("attempts", 0) + 1)
        QueueTracker(services.redis).forget_subject(f"render:{render['_id']}")
    services.db.renders.delete_many({"user_id": user_id})
    services.db.images.delete_many({"user_id": user_id})
    services.blobs.delete_prefix(f"users/{user_id}/")
    services.vault.shred(user_id)
    return {"avatars": len(avatars), "renders": len(renders)}


def pseudonymise_orders(services, user_id: str) -> None:
    ref = user_ref(services, user_id)
    services.db.orders.update_many({"user_id": user_id}, {"$set": {"user_id": ref, "user_erased": True},
                                                          "$unset": {"openid": ""}})
    services.db.payment_alerts.update_many({"user_id": user_id}, {"$set": {"user_id": ref}})


def delete_user(services, user: dict) -> None:
    erase_user_data(services, user, reason="user_deleted")
    pseudonymise_orders(services, user["_id"])
    services.db.users.delete_one({"_id": user["_id"]})


def withdraw_face_consent(services, user: dict) -> dict:
    erased = erase_user_data(services, user, reason="consent_withdrawn")
    services.db.users.update_one(
        {"_id": user["_id"]},
        {"$set": {"consents.face_processing.withdrawn_at": states.now()}, "$unset": {"subscriptions": ""}},
    )
    services.vault.create_key(user["_id"])
    return erased
