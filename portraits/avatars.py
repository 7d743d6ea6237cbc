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
from models.intake import AcceptedFace, IntakeLimits, drop_outliers, header_refusal, judge_photo
from portraits import consents, content_checks, keys, notifications, photos, products, states, tasks
from portraits.billing import promises, refunds
from portraits.errors import Conflict, Invalid, TooLarge, Unavailable, UnsupportedMedia
from portraits.queue import lanes
from portraits.queue.tracking import QueueTracker
from portraits.store.blobs import BlobNotFound
from portraits.store.vault import KeyShredded
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


def group_subject_words(genders: list[str]) -> str:
    """How an album template's scene prompt names its members, in order: "a woman and a man". No trigger token:
    the scene is drawn on the base model, each face then with its owner's LoRA (subject_words)."""
    people = [f"a {CLASS_WORDS[gender]}" for gender in genders]
    return people[0] if len(people) == 1 else f"{', '.join(people[:-1])} and {people[-1]}"


# ------------------------------------------------------------------------------------------------- intake


def create_avatar(services, user: dict, gender: str, sku: str | None = None) -> dict:
    """sku: the product the user means to buy (its photo minimum is what `missing` counts toward); an order for
    another product later sets the avatar to that one (for_product)."""
    if gender not in GENDERS:
        raise Invalid("invalid_fields", "gender must be female or male.", {"fields": {"gender": "female|male"}})
    check_sku(services.settings, sku)
    consents.require_face_consent(services.settings, user)
    check_open_avatars(services, user)
    at = states.now()
    avatar = {"_id": "av_" + secrets.token_hex(10), "user_id": user["_id"], "gender": gender, "sku": sku,
              "state": "collecting", "photos": [], "train_attempts": 0, "created_at": at, "updated_at": at,
              "history": states.initial_history("collecting", f"user:{user['_id']}")}
    services.db.avatars.insert_one(avatar)
    return avatar


def check_sku(settings, sku: str | None) -> None:
    if sku is not None and sku not in settings.skus:
        raise Invalid("unknown_sku", "No such product.", {"sku": sku, "known": sorted(settings.skus)})


def photo_minimum(settings, avatar: dict) -> int:
    """Accepted photos this avatar needs: its product's minimum (MIN_PHOTOS for an avatar without one)."""
    return products.min_photos(settings, avatar.get("sku"))


def for_product(services, user: dict, avatar: dict, sku: str) -> dict:
    """An order for `sku` is about to be made: the avatar must have what that product needs (409 avatar_not_ready
    with `missing` and `min_photos` otherwise, nothing changed), and from now on collects for it (its readiness
    follows that product's minimum). The avatar after it; unchanged when the minimum is the one it collects for."""
    if avatar["state"] not in TAKES_PHOTOS or products.min_photos(services.settings, sku) == photo_minimum(
            services.settings, avatar):
        return avatar
    if missing_for_training(services, {**avatar, "sku": sku}, user):
        raise not_ready(services, {**avatar, "sku": sku}, user)
    services.db.avatars.update_one({"_id": avatar["_id"], "state": {"$in": list(TAKES_PHOTOS)}},
                                   {"$set": {"sku": sku, "updated_at": states.now()}})
    current = services.db.avatars.find_one({"_id": avatar["_id"]})
    return refresh_readiness(services, current, user) if current is not None else avatar


def not_ready(services, avatar: dict, user: dict) -> Conflict:
    """The refusal of an order for an avatar that cannot be paid for: its state, what it misses, its minimum."""
    return Conflict("avatar_not_ready", "This avatar cannot be paid for now.",
                    {"state": avatar["state"],
                     "missing": missing_for_training(services, avatar, user) if avatar["state"] in TAKES_PHOTOS
                     else [],
                     "min_photos": photo_minimum(services.settings, avatar)})


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


def photo_state(photo: dict) -> str:
    """judging, accepted or refused (states.MACHINES["photo"]); photos recorded before judging left the request
    have no state of their own, and their `accepted` says it."""
    return photo.get("state") or ("accepted" if photo["accepted"] else "refused")


def judging(photo: dict) -> bool:
    return photo_state(photo) == "judging"


def add_photo(services, user: dict, avatar: dict, data: bytes, role: str) -> tuple[dict, dict]:
    """Take one upload: refuse what its header alone refuses, store it sealed, record it `judging` and queue its
    judging on the intake queue (judge_upload, on the intake worker); returns (the photo's record, the avatar after
    it). The request never decodes the photo nor runs a face model.

    MAX_PHOTOS counts the photos accepted and those still judging (judging never adds to that number, so the count
    read holds against verdicts landing meanwhile). Uploads to one avatar are recorded one at a time, under a short
    per-avatar Redis lock; should it be lost, a compare-and-set on the photo list still refuses to record an upload
    next to a photo that appeared since the avatar was read (that upload is counted again)."""
    settings = services.settings
    check_upload(services, user, avatar, role)
    check_photo_count(settings, avatar)
    if len(data) > settings.max_upload_bytes:
        raise TooLarge("file_too_large", "The photo is over the size limit.", {"max_bytes": settings.max_upload_bytes})
    refusal = header_refusal(data, intake_limits(settings))
    if refusal in NOT_A_PHOTO:
        kind, message = NOT_A_PHOTO[refusal]
        raise kind(refusal, message)
    photo_id = "ph_" + secrets.token_hex(8)
    upload_key = keys.photo_upload(avatar["user_id"], avatar["_id"], photo_id)
    services.sealed.put(avatar["user_id"], upload_key, data)
    photo = {"id": photo_id, "role": role, "state": "judging", "accepted": False, "reasons": [],
             "upload_key": upload_key, "uploaded_at": states.now()}
    try:
        with upload_lock(services, avatar["_id"]):
            for _ in range(UPLOAD_ATTEMPTS):
                current = services.db.avatars.find_one({"_id": avatar["_id"]})
                if current is None:
                    raise Conflict("avatar_not_collecting", "This avatar no longer takes photos.")
                check_upload(services, user, current, role)
                check_photo_count(settings, current)
                seen = [p["id"] for p in current["photos"]]
                updated = services.db.avatars.find_one_and_update(
                    {"_id": avatar["_id"], "state": {"$in": list(TAKES_PHOTOS)},
                     "photos": {"$not": {"$elemMatch": {"id": {"$nin": seen}, "state": {"$ne": "refused"}}}}},
                    {"$push": {"photos": photo}, "$set": {"updated_at": states.now()}}, return_document=True)
                if updated is not None:
                    break
            else:
                raise Unavailable("avatar_busy", "Other photos of this avatar are being added; try again in a moment.")
    except Exception:
        services.blobs.delete(upload_key)
        raise
    enqueue_judging(services, avatar["_id"], photo_id)
    return photo, refresh_readiness(services, updated, user)


def enqueue_judging(services, avatar_id: str, photo_id: str) -> None:
    tasks.enqueue_judging(services, avatar_id, photo_id, JUDGING_BACKOFF_S)


# The lock lives at most this long if its holder dies (recording an upload takes milliseconds, judging one photo
# well under a second); should one outlive it, the database guards in add_photo and record_verdict still hold.
UPLOAD_LOCK_TIMEOUT_S = 60
# How long an upload waits for the uploads queued before it on the same avatar (each holds the lock for a few
# database calls), and a judging for the judging before it.
UPLOAD_LOCK_WAIT_S = 20
# Tries an upload or a judging gets when other photos keep arriving in between (only if the lock was lost).
UPLOAD_ATTEMPTS = 3
# A judging job that failed (the avatar busy, the database away) is tried again after these; the sweep queues the
# judging again should every try fail or Redis lose the job.
JUDGING_BACKOFF_S = [5, 30, 120]


@contextmanager
def avatar_lock(services, name: str):
    lock = services.redis.lock(name, timeout=UPLOAD_LOCK_TIMEOUT_S, blocking_timeout=UPLOAD_LOCK_WAIT_S)
    if not lock.acquire():
        raise Unavailable("avatar_busy", "Other photos of this avatar are being added; try again in a moment.",
                          {"retry_after_s": 5})
    try:
        yield
    finally:
        try:
            lock.release()
        except LockError:  # expired meanwhile; the compare-and-set on the photo list still kept the limits
            log.warning("lock %s expired before release", name)


def upload_lock(services, avatar_id: str):
    return avatar_lock(services, keys.avatar_upload_lock(avatar_id))


def judging_lock(services, avatar_id: str):
    """One judging per avatar at a time: each verdict is reached against the verdicts recorded before it, so the
    duplicate, identity and count rules hold whatever order the intake workers take the jobs in."""
    return avatar_lock(services, keys.avatar_judging_lock(avatar_id))


def check_photo_count(settings, avatar: dict) -> None:
    """Accepted (and judging) photos stop at MAX_PHOTOS; refused ones at MAX_REFUSED_PHOTOS, since judging each
    costs CPU. Uploads to one avatar are recorded one at a time (upload_lock), so the count read holds."""
    if sum(1 for p in avatar["photos"] if photo_state(p) != "refused") >= settings.max_photos:
        raise Conflict("too_many_photos", "This avatar has enough photos.", {"max_photos": settings.max_photos})
    if too_many_refused(settings, avatar):
        raise Conflict("too_many_refused_photos", "Too many photos of this avatar were refused; start a new "
                                                  "avatar with clearer photos.",
                       {"max_refused_photos": settings.max_refused_photos})


def too_many_refused(settings, avatar: dict) -> bool:
    return sum(1 for p in avatar["photos"] if photo_state(p) == "refused") >= settings.max_refused_photos


def judge_upload(services, avatar_id: str, photo_id: str) -> str:
    """The intake job: judge one photo recorded `judging` against the avatar's photos accepted so far, record the
    verdict, and let the avatar's readiness follow. Idempotent: a photo no longer judging (judged already, or gone
    with its avatar or user) is left as it is. Returns what happened."""
    with judging_lock(services, avatar_id):
        for _ in range(UPLOAD_ATTEMPTS):
            avatar = services.db.avatars.find_one({"_id": avatar_id})
            photo = next((p for p in (avatar or {}).get("photos", []) if p["id"] == photo_id), None)
            if photo is None or not judging(photo):
                return "not_judging"
            outcome = judge_and_record(services, avatar, photo)
            if outcome is not None:
                return outcome
    raise Unavailable("avatar_busy", "Other photos of this avatar kept arriving while this one was judged.")


def judge_and_record(services, avatar: dict, photo: dict) -> str | None:
    """Judge ``photo`` against ``avatar`` as read, and record the verdict; None when an accepted photo was recorded
    since ``avatar`` was read (the verdict may no longer hold: judge again)."""
    settings = services.settings
    user = services.db.users.find_one({"_id": avatar["user_id"]})
    data = sealed_upload(services, avatar, photo) if user is not None else None
    if data is None or avatar["state"] not in TAKES_PHOTOS:
        # The user was erased (their key with them), or the avatar left collecting: nothing will train on it.
        return record_verdict(services, avatar, photo, {"accepted": False, "reasons": ["avatar_not_collecting"]})
    if too_many_refused(settings, avatar):
        return record_verdict(services, avatar, photo, {"accepted": False, "reasons": ["too_many_refused_photos"]})
    accepted_photos = [p for p in avatar["photos"] if p["accepted"]]
    if len(accepted_photos) >= settings.max_photos:
        return record_verdict(services, avatar, photo, {"accepted": False, "reasons": ["too_many_photos"]})
    accepted_faces = load_accepted_faces(services, avatar, accepted_photos)
    verdict = judge_photo(data, role=photo["role"], accepted=accepted_faces, limits=intake_limits(settings),
                          analyzer=services.face_analyzer(), training_size=settings.train_resolution)
    fields = {"accepted": verdict.accepted, "reasons": list(verdict.reasons)}
    earlier_outliers = []
    if verdict.accepted:
        outliers = identity_outliers(services, [face.embedding for face in accepted_faces] + [verdict.embedding])
        if len(accepted_faces) in outliers:
            fields.update(accepted=False, reasons=["different_person"])
        earlier_outliers = [accepted_photos[i] for i in outliers if i < len(accepted_faces)]
    check = None
    if fields["accepted"]:
        # Only the aligned crop and its embedding are kept (sealed with the user's key); the upload itself is not.
        crop_key = keys.photo_crop(avatar["user_id"], avatar["_id"], photo["id"])
        embedding_key = keys.photo_embedding(avatar["user_id"], avatar["_id"], photo["id"])
        crop = io.BytesIO()
        verdict.crop.save(crop, format="PNG")
        services.sealed.put(avatar["user_id"], crop_key, crop.getvalue())
        services.sealed.put(avatar["user_id"], embedding_key,
                            np.asarray(verdict.embedding, dtype=np.float64).tobytes())
        # It counts only once WeChat's content check passes it (portraits.moderation applies the verdict). The check
        # is asked for after judging, so no quota is spent on photos the judging refuses.
        fields.update(crop_key=crop_key, embedding_key=embedding_key, phash=str(verdict.phash),
                      face_hash=str(verdict.face_hash), face_tone=list(verdict.tone), content_check="pending")
        check = content_checks.record_check(services, "photo", photo["id"], user=user, blob_key=crop_key,
                                            avatar_id=avatar["_id"])
    outcome = record_verdict(services, avatar, photo, fields)
    if outcome is None:
        for key in (fields.get("crop_key"), fields.get("embedding_key")):
            if key:
                services.blobs.delete(key)
        if check is not None:
            content_checks.forget_check(services, "photo", photo["id"])
        return None
    if check is not None:
        content_checks.enqueue_submit(services, check)
    updated = services.db.avatars.find_one({"_id": avatar["_id"]})
    for outlier in earlier_outliers:
        updated = refuse_as_different_person(services, avatar["_id"], outlier) or updated
    refresh_readiness(services, updated, user, by=f"intake:{photo['id']}")
    return outcome


def sealed_upload(services, avatar: dict, photo: dict) -> bytes | None:
    """The upload waiting to be judged; None once its user's key is shredded or the blob is gone with them."""
    try:
        return services.sealed.get(avatar["user_id"], photo["upload_key"])
    except (KeyShredded, BlobNotFound):
        return None


def record_verdict(services, avatar: dict, photo: dict, fields: dict) -> str | None:
    """Write one judging photo's verdict (and drop its upload): "accepted" or "refused", "not_judging" when another
    run recorded it first, None when an accepted verdict no longer holds (an accepted photo was recorded since
    ``avatar`` was read: judged with the lock lost)."""
    target = "accepted" if fields["accepted"] else "refused"
    if target not in states.MACHINES["photo"]["judging"]:
        raise states.IllegalTransition(f"photo cannot reach {target!r} from 'judging'")
    query = {"_id": avatar["_id"], "photos": {"$elemMatch": {"id": photo["id"], "state": "judging"}}}
    update = {"$set": {"photos.$.state": target, "updated_at": states.now(), "photos.$.judged_at": states.now(),
                       **{f"photos.$.{name}": value for name, value in fields.items()}},
              "$unset": {"photos.$.upload_key": ""}}
    if target == "accepted":
        # Accepted verdicts are counted on the avatar: one reached against an older count no longer holds.
        seen = avatar.get("accepted_seq")
        query["accepted_seq"] = seen if seen is not None else {"$exists": False}
        update["$inc"] = {"accepted_seq": 1}
    written = services.db.avatars.update_one(query, update).matched_count
    if not written:
        current = services.db.avatars.find_one({"_id": avatar["_id"]}, {"photos": 1})
        still = next((p for p in (current or {}).get("photos", []) if p["id"] == photo["id"]), None)
        if still is not None and judging(still):
            return None
        return "not_judging"
    services.blobs.delete(photo["upload_key"])
    return target


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
        {"$set": {"photos.$.accepted": False, "photos.$.state": "refused", "photos.$.reasons": [reason],
                  "updated_at": states.now(),
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
    (nothing more to upload for them) but the avatar waits for them: content_check_pending. Photos still being
    judged count toward nothing yet (they may be refused), and training waits for their verdicts: photos_judging."""
    accepted = [p for p in avatar["photos"] if p["accepted"]]
    missing = []
    if not consents.has_face_consent(services.settings, user):
        missing.append("face_consent")
    if not any(p["role"] == "front" for p in accepted):
        missing.append("front_photo")
    if len(accepted) < photo_minimum(services.settings, avatar):
        missing.append("more_photos")
    if any(content_pending(p) for p in accepted):
        missing.append("content_check_pending")
    if any(judging(p) for p in avatar["photos"]):
        missing.append("photos_judging")
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
                               by=f"order:{order['_id']}",
                               set_fields={"order_id": order["_id"], "lane": lanes.lane_of(order), "sku": order["sku"],
                                           **owed})
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
    tasks.enqueue(services, tasks.gpu_queue_name("train", avatar), tasks.TRAIN_AVATAR, avatar["_id"], job_id=job_id,
                  subject=subject)


def begin_training(services, avatar_id: str, job_id: str) -> dict | None:
    """Claim a queued avatar for this job; None when it is not queued (handled elsewhere, or gone)."""
    avatar = states.transition(services.db, "avatar", avatar_id, "training", expect={"queued"}, by=f"job:{job_id}",
                               inc={"train_attempts": 1}, set_fields={"training_started_at": states.now()})
    if avatar is None:
        return None
    QueueTracker(services.redis).set_subject(keys.avatar_subject(avatar_id), state="training", progress=0)
    # The wait an express order was promised ends here (its promise is settled by the first start only).
    promises.training_started(services, avatar.get("order_id"), avatar["training_started_at"], by=f"job:{job_id}")
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
