"""Avatars: photo intake, readiness, and the training lifecycle (queued -> training -> trained | failed).

The state machine itself is in portraits.states; this module holds the rules around it: which photos count, when an
avatar is ready to pay for, what a payment starts, and what a finished or failed training leaves behind.
"""
from __future__ import annotations

import io
import logging
import secrets
from contextlib import contextmanager

import numpy as np
from PIL import Image
from redis.exceptions import LockError

from models.faces import identity_pivot, likeness_baseline
from models.intake import AcceptedFace, IntakeLimits, drop_outliers, judge_photo
from portraits import consents, content_checks, keys, notifications, photos, states, tasks
from portraits.billing import refunds
from portraits.errors import Conflict, Invalid, TooLarge, Unavailable, UnsupportedMedia
from portraits.queue.tracking import QueueTracker
from portraits.retries import retry_or_fail

log = logging.getLogger(__name__)

GENDERS = ("female", "male")
ROLES = ("front", "extra")
CLASS_WORDS = {"female": "woman", "male": "man"}
TRIGGER = "sks"
TAKES_PHOTOS = ("collecting", "ready")
# Uploads that are not a usable picture at all are refused outright (nothing recorded); any other refusal is a
# verdict the user sees in the photo list.
NOT_A_PHOTO = {
    "not_an_image": (Invalid, "The upload is not an image."),
    "unsupported_format": (UnsupportedMedia, "Upload a JPEG, PNG or WebP photo."),
    "file_too_large": (TooLarge, "The photo is over the size limit."),
    "too_many_pixels": (TooLarge, "The photo has too many pixels."),
}


def caption_for(gender: str) -> str:
    return f"a photo of {TRIGGER} {CLASS_WORDS[gender]}"


def subject_words(gender: str) -> str:
    """How a template's prompt names the user: the trigger token and the class word of their avatar."""
    return f"{TRIGGER} {CLASS_WORDS[gender]}"


# ------------------------------------------------------------------------------------------------- intake


def create_avatar(services, user: dict, gender: str) -> dict:
    if gender not in GENDERS:
        raise Invalid("invalid_fields", "gender must be female or male.", {"fields": {"gender": "female|male"}})
    consents.require_face_consent(services.settings, user)
    check_open_avatars(services, user)
    at = states.now()
    avatar = {"_id": "av_" + secrets.token_hex(10), "user_id": user["_id"], "gender": gender,
              "state": "collecting", "photos": [], "train_attempts": 0, "created_at": at, "updated_at": at,
              "history": states.initial_history("collecting", f"user:{user['_id']}")}
    services.db.avatars.insert_one(avatar)
    return avatar


def check_open_avatars(services, user: dict) -> None:
    """Avatars not paid for yet are capped per user (paid ones are capped by what was paid). Two creations at the
    same instant may both pass: the cap bounds a flood, it is not an exact count."""
    limit = services.settings.max_open_avatars
    if services.db.avatars.count_documents({"user_id": user["_id"], "state": {"$in": list(TAKES_PHOTOS)}}) >= limit:
        raise Conflict("too_many_avatars", "You have enough avatars waiting for photos or payment; finish or let "
                                           "one of them expire first.", {"max_open_avatars": limit})


def intake_limits(settings) -> IntakeLimits:
    return IntakeLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)


def check_upload(services, user: dict, avatar: dict, role: str) -> None:
    """What can be refused before the photo is read at all."""
    consents.require_face_consent(services.settings, user)
    if role not in ROLES:
        raise Invalid("invalid_fields", "role must be front or extra.", {"fields": {"role": "front|extra"}})
    if avatar["state"] not in TAKES_PHOTOS:
        raise Conflict("avatar_not_collecting", "This avatar no longer takes photos.", {"state": avatar["state"]})


def add_photo(services, user: dict, avatar: dict, data: bytes, role: str) -> tuple[dict, dict]:
    """Judge one upload and record its verdict; returns (the photo's record, the avatar after it).

    Uploads to one avatar are judged one at a time: read the avatar, judge against its accepted photos, record.
    Two guards keep MAX_PHOTOS and the duplicate and identity checks true when uploads arrive together (the app
    sends several at once; gunicorn threads and the dev server run them concurrently):
    - the database: an accepted photo is recorded only if no accepted photo appeared since the avatar was read
      (a compare-and-set on the photo list), otherwise the upload is judged again against the new photos;
    - a per-avatar Redis lock around read-judge-record, so concurrent uploads queue instead of being judged in
      vain; one that cannot have it within UPLOAD_LOCK_WAIT_S is refused with `avatar_busy` (503, retry later).
    """
    settings = services.settings
    check_upload(services, user, avatar, role)
    check_photo_count(settings, avatar)
    if len(data) > settings.max_upload_bytes:
        raise TooLarge("file_too_large", "The photo is over the size limit.", {"max_bytes": settings.max_upload_bytes})
    with upload_lock(services, avatar["_id"]):
        for _ in range(UPLOAD_ATTEMPTS):
            current = services.db.avatars.find_one({"_id": avatar["_id"]})
            if current is None:
                raise Conflict("avatar_not_collecting", "This avatar no longer takes photos.")
            check_upload(services, user, current, role)
            check_photo_count(settings, current)
            recorded = judge_and_record(services, user, current, data, role)
            if recorded is not None:
                return recorded
    raise Unavailable("avatar_busy", "Other photos of this avatar are being added; try again in a moment.")


# The lock lives at most this long if its holder dies (judging one photo takes well under a second); should one
# outlive it, the database guard in judge_and_record still holds.
UPLOAD_LOCK_TIMEOUT_S = 60
# How long an upload waits for the uploads queued before it on the same avatar.
UPLOAD_LOCK_WAIT_S = 20
# Judgings an upload gets when other accepted photos keep arriving in between (only if the lock was lost).
UPLOAD_ATTEMPTS = 3


@contextmanager
def upload_lock(services, avatar_id: str):
    lock = services.redis.lock(keys.avatar_upload_lock(avatar_id), timeout=UPLOAD_LOCK_TIMEOUT_S,
                               blocking_timeout=UPLOAD_LOCK_WAIT_S)
    if not lock.acquire():
        raise Unavailable("avatar_busy", "Other photos of this avatar are being added; try again in a moment.",
                          {"retry_after_s": 5})
    try:
        yield
    finally:
        try:
            lock.release()
        except LockError:  # expired meanwhile; the compare-and-set on the photo list still kept the limits
            log.warning("upload lock for %s expired before release", avatar_id)


def check_photo_count(settings, avatar: dict) -> None:
    """Accepted photos stop at MAX_PHOTOS; refused ones at MAX_REFUSED_PHOTOS, since judging each costs about a
    second of CPU. Uploads to one avatar are judged one at a time (upload_lock), so the count read holds."""
    if sum(1 for p in avatar["photos"] if p["accepted"]) >= settings.max_photos:
        raise Conflict("too_many_photos", "This avatar has enough photos.", {"max_photos": settings.max_photos})
    if sum(1 for p in avatar["photos"] if not p["accepted"]) >= settings.max_refused_photos:
        raise Conflict("too_many_refused_photos", "Too many photos of this avatar were refused; start a new "
                                                  "avatar with clearer photos.",
                       {"max_refused_photos": settings.max_refused_photos})


def judge_and_record(services, user: dict, avatar: dict, data: bytes, role: str) -> tuple[dict, dict] | None:
    """Judge the upload against ``avatar`` as read, and record the verdict; None when an accepted photo was added
    since ``avatar`` was read (the verdict may no longer hold: judge again)."""
    settings = services.settings
    accepted_photos = [p for p in avatar["photos"] if p["accepted"]]
    accepted_faces = load_accepted_faces(services, avatar, accepted_photos)
    verdict = judge_photo(data, role=role, accepted=accepted_faces, limits=intake_limits(settings),
                          analyzer=services.face_analyzer(), training_size=settings.train_resolution)
    refusal = next((reason for reason in verdict.reasons if reason in NOT_A_PHOTO), None)
    if refusal:
        kind, message = NOT_A_PHOTO[refusal]
        raise kind(refusal, message)
    photo = {"id": "ph_" + secrets.token_hex(8), "role": role, "accepted": verdict.accepted,
             "reasons": list(verdict.reasons), "uploaded_at": states.now()}
    earlier_outliers = []
    if verdict.accepted:
        outliers = identity_outliers(services, [face.embedding for face in accepted_faces] + [verdict.embedding])
        if len(accepted_faces) in outliers:
            photo.update(accepted=False, reasons=["different_person"])
        earlier_outliers = [accepted_photos[i] for i in outliers if i < len(accepted_faces)]
    guard = {"_id": avatar["_id"], "state": {"$in": list(TAKES_PHOTOS)}}
    if photo["accepted"]:
        # Only the aligned crop and its embedding are kept (sealed with the user's key); the upload itself is not.
        crop_key = keys.photo_crop(avatar["user_id"], avatar["_id"], photo["id"])
        embedding_key = keys.photo_embedding(avatar["user_id"], avatar["_id"], photo["id"])
        crop = io.BytesIO()
        verdict.crop.save(crop, format="PNG")
        services.sealed.put(avatar["user_id"], crop_key, crop.getvalue())
        services.sealed.put(avatar["user_id"], embedding_key,
                            np.asarray(verdict.embedding, dtype=np.float64).tobytes())
        photo.update(crop_key=crop_key, embedding_key=embedding_key, phash=str(verdict.phash),
                     face_hash=str(verdict.face_hash), face_tone=list(verdict.tone))
        # Judged against exactly the accepted photos read: none may have been added since (the count and the
        # duplicate and identity checks would not hold). A refused verdict changes no limit and needs no guard.
        seen = [p["id"] for p in accepted_photos]
        guard["photos"] = {"$not": {"$elemMatch": {"accepted": True, "id": {"$nin": seen}}}}
        # It counts only once WeChat's content check passes it (portraits.moderation applies the verdict).
        photo["content_check"] = "pending"
        check = content_checks.record_check(services, "photo", photo["id"], user=user, blob_key=crop_key,
                                            avatar_id=avatar["_id"])
    updated = services.db.avatars.find_one_and_update(
        guard, {"$push": {"photos": photo}, "$set": {"updated_at": states.now()}}, return_document=True)
    if updated is None:
        for key in (photo.get("crop_key"), photo.get("embedding_key")):
            if key:
                services.blobs.delete(key)
        if photo["accepted"]:
            content_checks.forget_check(services, "photo", photo["id"])
        return None  # the avatar left collecting, or took another accepted photo: the caller reads it again
    if photo["accepted"]:
        content_checks.enqueue_submit(services, check)
    for outlier in earlier_outliers:
        updated = refuse_as_different_person(services, avatar["_id"], outlier) or updated
    return photo, refresh_readiness(services, updated, user)


def load_accepted_faces(services, avatar: dict, accepted_photos: list[dict]) -> list[AcceptedFace]:
    return [
        AcceptedFace(embedding=np.frombuffer(services.sealed.get(avatar["user_id"], p["embedding_key"]),
                                             dtype=np.float64),
                     phash=int(p["phash"]),
                     face_hash=int(p["face_hash"]) if "face_hash" in p else None,
                     tone=tuple(p["face_tone"]) if "face_tone" in p else None)
        for p in accepted_photos
    ]


def identity_outliers(services, embeddings: list) -> list[int]:
    """Indices of accepted faces unlike the others (leave-one-out against the mean of the rest).

    The upload-time check compares a new photo with the pivot of the earlier ones, which cannot catch a stranger
    among the first two; this pass re-judges every accepted photo each time one is added, so the set that makes the
    avatar ready never holds one.
    """
    return drop_outliers(embeddings, intake_limits(services.settings))


def refuse_as_different_person(services, avatar_id: str, photo: dict) -> dict | None:
    return refuse_photo(services, avatar_id, photo, "different_person")


def refuse_photo(services, avatar_id: str, photo: dict, reason: str, fields: dict | None = None) -> dict | None:
    """Refuse an accepted photo after the fact (another photo showed it is someone else, or WeChat's content check
    refused it): its crop and embedding go; the avatar after it, or None when the photo was not accepted."""
    # update_one, then a read: the positional `$` in find_one_and_update is refused by SecantusDB ("The positional
    # operator did not find the match needed") and sets the wrong element in mongomock; update_one with the
    # same filter and `$` does what MongoDB does on all three (README, "SecantusDB and MongoDB").
    refused = services.db.avatars.update_one(
        {"_id": avatar_id, "photos": {"$elemMatch": {"id": photo["id"], "accepted": True}}},
        {"$set": {"photos.$.accepted": False, "photos.$.reasons": [reason], "updated_at": states.now(),
                  **{f"photos.$.{name}": value for name, value in (fields or {}).items()}},
         "$unset": {"photos.$.crop_key": "", "photos.$.embedding_key": "", "photos.$.phash": "",
                    "photos.$.face_hash": "", "photos.$.face_tone": ""}})
    for key in (photo.get("crop_key"), photo.get("embedding_key")):
        if key:
            services.blobs.delete(key)
    return services.db.avatars.find_one({"_id": avatar_id}) if refused.matched_count else None


def content_pending(photo: dict) -> bool:
    """Accepted by the face judging, waiting for WeChat's content check (photos from before the checks have none)."""
    return photo["accepted"] and photo.get("content_check") == "pending"


def counted_photos(avatar: dict) -> list[dict]:
    """The photos an avatar trains on: accepted, and passed by the content check."""
    return [p for p in avatar["photos"] if p["accepted"] and not content_pending(p)]


def missing_for_training(services, avatar: dict, user: dict) -> list[str]:
    """What training still needs. Photos waiting for their content check count toward front_photo and more_photos
    (nothing more to upload for them) but the avatar waits for them: content_check_pending."""
    accepted = [p for p in avatar["photos"] if p["accepted"]]
    missing = []
    if not consents.has_face_consent(services.settings, user):
        missing.append("face_consent")
    if not any(p["role"] == "front" for p in accepted):
        missing.append("front_photo")
    if len(accepted) < services.settings.min_photos:
        missing.append("more_photos")
    if any(content_pending(p) for p in accepted):
        missing.append("content_check_pending")
    return missing


def refresh_readiness(services, avatar: dict, user: dict, by: str | None = None) -> dict:
    """Readiness depends on the user too (a consent withdrawn or outdated by a new text version)."""
    if avatar["state"] not in TAKES_PHOTOS:
        return avatar
    target = "ready" if not missing_for_training(services, avatar, user) else "collecting"
    if avatar["state"] != target:
        moved = states.transition(services.db, "avatar", avatar["_id"], target, expect=set(TAKES_PHOTOS),
                                  by=by or f"user:{user['_id']}")
        avatar = moved or services.db.avatars.find_one({"_id": avatar["_id"]})
    return avatar


def apply_content_verdict(services, check: dict, counted: bool, reason: str | None) -> dict | None:
    """WeChat's verdict on one photo (portraits.moderation): counted, or refused with `reason`; the avatar's
    readiness follows. Idempotent: a photo no longer pending is left as it is. The avatar after it, if any."""
    avatar_id, photo_id = check["avatar_id"], check["subject_id"]
    pending = {"_id": avatar_id, "photos": {"$elemMatch": {"id": photo_id, "accepted": True,
                                                           "content_check": "pending"}}}
    if counted:
        services.db.avatars.update_one(pending, {"$set": {"photos.$.content_check": check["state"],
                                                          "updated_at": states.now()}})
    else:
        avatar = services.db.avatars.find_one(pending, {"photos": 1})
        photo = next((p for p in (avatar or {}).get("photos", []) if p["id"] == photo_id), None)
        if photo is not None:
            refuse_photo(services, avatar_id, photo, reason, {"content_check": check["state"]})
    avatar = services.db.avatars.find_one({"_id": avatar_id})
    user = services.db.users.find_one({"_id": check["user_id"]})
    if avatar is None or user is None:
        return avatar
    return refresh_readiness(services, avatar, user, by=f"content-check:{check['_id']}")


# ----------------------------------------------------------------------------------------------- training


def start_training(services, order: dict, before_enqueue=None) -> bool:
    """A payment was applied: the avatar joins the GPU queue (once, however often the payment is seen). False when
    the avatar cannot train for this order (it left `ready` since the order was made, or another order took it):
    the payment is then refunded by the caller. The same update records the preview owed (portraits.previews);
    `before_enqueue(avatar)` runs between that update and the training's enqueue: the preview's job goes first,
    so an idle GPU worker draws the preview before it starts a training."""
    owed = {"preview_owed_at": states.now()} if services.settings.previews_enabled else {}
    avatar = states.transition(services.db, "avatar", order["avatar_id"], "queued", expect={"ready"},
                               by=f"order:{order['_id']}", set_fields={"order_id": order["_id"], **owed})
    if avatar is not None:
        if before_enqueue is not None:
            before_enqueue(avatar)
        enqueue_training(services, avatar)
        return True
    current = services.db.avatars.find_one({"_id": order["avatar_id"]}, {"order_id": 1, "state": 1})
    return bool(current) and current.get("order_id") == order["_id"] and current["state"] != "collecting"


def enqueue_training(services, avatar: dict) -> None:
    job_id = keys.train_job_id(avatar["_id"], avatar.get("train_attempts", 0) + 1)
    subject = keys.avatar_subject(avatar["_id"])
    tasks.track_for_owner(services, subject, avatar["user_id"])
    tasks.enqueue(services, tasks.TRAIN, tasks.TRAIN_AVATAR, avatar["_id"], job_id=job_id, subject=subject)


def begin_training(services, avatar_id: str, job_id: str) -> dict | None:
    """Claim a queued avatar for this job; None when it is not queued (handled elsewhere, or gone)."""
    avatar = states.transition(services.db, "avatar", avatar_id, "training", expect={"queued"}, by=f"job:{job_id}",
                               inc={"train_attempts": 1}, set_fields={"training_started_at": states.now()})
    if avatar is None:
        return None
    QueueTracker(services.redis).set_subject(keys.avatar_subject(avatar_id), state="training", progress=0)
    notifications.notify(services, avatar["user_id"], "training_started", avatar_id, {"avatar_id": avatar_id})
    return avatar


def store_identity_pivot(services, avatar: dict) -> None:
    """The mean face embedding of the accepted photos: what renders are ranked against after the photos are gone;
    and how like the user their own photos are (``likeness_baseline``), what a render's likeness is read against."""
    embeddings = [np.frombuffer(services.sealed.get(avatar["user_id"], p["embedding_key"]), dtype=np.float64)
                  for p in counted_photos(avatar)]
    pivot = np.asarray(identity_pivot(embeddings), dtype=np.float64)
    services.sealed.put(avatar["user_id"], keys.pivot(avatar), pivot.tobytes())
    services.db.avatars.update_one({"_id": avatar["_id"]},
                                   {"$set": {"likeness_baseline": likeness_baseline(embeddings)}})


def training_images(services, avatar: dict) -> list[Image.Image]:
    return [Image.open(io.BytesIO(services.sealed.get(avatar["user_id"], photo["crop_key"]))).convert("RGB")
            for photo in counted_photos(avatar)]


def training_seed(avatar: dict) -> int:
    """Fixed per avatar, so a retried training draws the same noise."""
    return int.from_bytes(avatar["_id"].encode()[:4], "big")


def store_lora(services, avatar: dict, weights: bytes) -> None:
    services.sealed.put(avatar["user_id"], keys.lora(avatar), weights)


def complete_training(services, avatar: dict, job_id: str, _result, seconds: float) -> str:
    """Mark the avatar trained (its LoRA is stored) and delete its photos as the consent text promises."""
    trained = states.transition(services.db, "avatar", avatar["_id"], "trained", expect={"training"},
                                by=f"job:{job_id}",
                                set_fields={"lora_key": keys.lora(avatar), "pivot_key": keys.pivot(avatar),
                                            "trained_at": states.now(), "training_seconds": round(seconds, 3)})
    if trained is None:
        return "superseded"
    photos.purge_avatar_photos(services, trained)
    QueueTracker(services.redis).set_subject(keys.avatar_subject(avatar["_id"]), state="trained", progress=1)
    notifications.notify(services, avatar["user_id"], "avatar_ready", avatar["_id"],
                         {"avatar_id": avatar["_id"]})
    return "trained"


def fail_training(services, avatar_id: str, reason: str) -> str:
    """Retry while attempts remain, else fail the avatar and refund its order — each exactly once."""
    outcome, failed = retry_or_fail(services, "avatar", avatar_id, attempts_field="train_attempts",
                                    retries=services.settings.train_retries, running_state="training",
                                    enqueue=enqueue_training, subject=keys.avatar_subject(avatar_id), reason=reason)
    if failed is None:
        return outcome
    refunds.request_refund(services, failed["order_id"], reason="training_failed")
    return "failed"
