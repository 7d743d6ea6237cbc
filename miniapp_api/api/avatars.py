"""Avatars: start one, upload photos that are judged on arrival, follow the queue."""
from __future__ import annotations

import io
import secrets

import numpy as np
from flask import Blueprint, g, request

from jobs.tracking import QueueTracker
from jobs.training import subject as avatar_subject
from miniapp_api import states
from miniapp_api.auth import login_required
from miniapp_api.consents import has_face_consent
from miniapp_api.errors import ApiError
from miniapp_api.queue_poll import answer as answer_queue_poll, queue_json
from miniapp_api.requests import json_body, owned, services

bp = Blueprint("avatars", __name__, url_prefix="/api/v1/avatars")

GENDERS = ("female", "male")
ROLES = ("front", "extra")
# Uploads that are not a usable picture at all are errors (nothing recorded); any other refusal is a verdict the
# user sees in the photo list.
NOT_A_PHOTO = {
    "not_an_image": (400, "The upload is not an image."),
    "unsupported_format": (415, "Upload a JPEG, PNG or WebP photo."),
    "file_too_large": (413, "The photo is over the size limit."),
    "too_many_pixels": (413, "The photo has too many pixels."),
}


def require_face_consent(user: dict) -> None:
    if not has_face_consent(user):
        raise ApiError(403, "consent_required", "Give face-processing consent first.",
                       {"kind": "face_processing", "version": services().settings.consent_version})


@bp.post("")
@login_required
def create_avatar():
    body = json_body({"gender": str})
    if body["gender"] not in GENDERS:
        raise ApiError(400, "invalid_fields", "gender must be female or male.", {"fields": {"gender": "female|male"}})
    require_face_consent(g.user)
    at = states.now()
    avatar = {"_id": "av_" + secrets.token_hex(10), "user_id": g.user["_id"], "gender": body["gender"],
              "state": "collecting", "photos": [], "train_attempts": 0, "created_at": at, "updated_at": at,
              "history": states.initial_history("collecting", f"user:{g.user['_id']}")}
    services().db.avatars.insert_one(avatar)
    return avatar_json(avatar), 201


@bp.get("/<avatar_id>")
@login_required
def get_avatar(avatar_id):
    avatar = owned("avatars", avatar_id, "avatar")
    if avatar["state"] in ("collecting", "ready"):
        # Readiness depends on the user too (a consent withdrawn or outdated by a new text version).
        avatar = refresh_readiness(services(), avatar, g.user)
    return avatar_json(avatar)


@bp.get("/<avatar_id>/queue")
def avatar_queue(avatar_id):
    """The cheap poll, safe at thousands of clients (see miniapp_api.queue_poll)."""
    return answer_queue_poll(services(), request.headers.get("Authorization", ""), avatar_id)


@bp.post("/<avatar_id>/photos")
@login_required
def upload_photo(avatar_id):
    svc = services()
    settings = svc.settings
    avatar = owned("avatars", avatar_id, "avatar")
    require_face_consent(g.user)
    if request.mimetype != "multipart/form-data":
        raise ApiError(415, "multipart_required", "Upload the photo as multipart/form-data, field 'photo'.")
    upload = request.files.get("photo")
    if upload is None:
        raise ApiError(400, "photo_missing", "The multipart field 'photo' is missing.")
    role = request.form.get("role", "extra")
    if role not in ROLES:
        raise ApiError(400, "invalid_fields", "role must be front or extra.", {"fields": {"role": "front|extra"}})
    if avatar["state"] not in ("collecting", "ready"):
        raise ApiError(409, "avatar_not_collecting", "This avatar no longer takes photos.", {"state": avatar["state"]})
    data = upload.read(settings.max_upload_bytes + 1)
    accepted_photos = [p for p in avatar["photos"] if p["accepted"]]
    if len(accepted_photos) >= settings.max_photos:
        raise ApiError(409, "too_many_photos", "This avatar has enough photos.", {"max_photos": settings.max_photos})

    if len(data) > settings.max_upload_bytes:
        raise ApiError(413, "file_too_large", "The photo is over the size limit.",
                       {"max_bytes": settings.max_upload_bytes})
    accepted_faces = load_accepted_faces(svc, avatar, accepted_photos)
    verdict = judge(svc, data, role, accepted_faces)
    refusal = next((reason for reason in verdict.reasons if reason in NOT_A_PHOTO), None)
    if refusal:
        status, message = NOT_A_PHOTO[refusal]
        raise ApiError(status, refusal, message)
    photo = {"id": "ph_" + secrets.token_hex(8), "role": role, "accepted": verdict.accepted,
             "reasons": list(verdict.reasons), "uploaded_at": states.now()}
    earlier_outliers = []
    if verdict.accepted:
        outliers = identity_outliers(svc, [face.embedding for face in accepted_faces] + [verdict.embedding])
        if len(accepted_faces) in outliers:
            photo.update(accepted=False, reasons=["different_person"])
        earlier_outliers = [accepted_photos[i] for i in outliers if i < len(accepted_faces)]
    if photo["accepted"]:
        # Only the aligned crop and its embedding are kept (sealed with the user's key); the upload itself is not.
        base = f"users/{avatar['user_id']}/avatars/{avatar_id}/photos/{photo['id']}"
        crop = io.BytesIO()
        verdict.crop.save(crop, format="PNG")
        svc.sealed.put(avatar["user_id"], base + ".png", crop.getvalue())
        svc.sealed.put(avatar["user_id"], base + ".emb", np.asarray(verdict.embedding, dtype=np.float64).tobytes())
        photo.update(crop_key=base + ".png", embedding_key=base + ".emb", phash=str(verdict.phash))
    updated = svc.db.avatars.find_one_and_update(
        {"_id": avatar_id, "state": {"$in": ["collecting", "ready"]}},
        {"$push": {"photos": photo}, "$set": {"updated_at": states.now()}}, return_document=True)
    if updated is None:
        for key in (photo.get("crop_key"), photo.get("embedding_key")):
            if key:
                svc.blobs.delete(key)
        raise ApiError(409, "avatar_not_collecting", "This avatar no longer takes photos.")
    for outlier in earlier_outliers:
        updated = refuse_as_different_person(svc, avatar_id, outlier) or updated
    updated = refresh_readiness(svc, updated, g.user)
    return {"id": photo["id"], "accepted": photo["accepted"], "reasons": photo["reasons"], "role": role,
            "avatar": avatar_json(updated)}, 201


def load_accepted_faces(svc, avatar: dict, accepted_photos: list[dict]) -> list:
    from models.intake import AcceptedFace

    return [
        AcceptedFace(embedding=np.frombuffer(svc.sealed.get(avatar["user_id"], p["embedding_key"]), dtype=np.float64),
                     phash=int(p["phash"]))
        for p in accepted_photos
    ]


def intake_limits(settings):
    from models.intake import IntakeLimits

    return IntakeLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)


def judge(svc, data: bytes, role: str, accepted_faces: list):
    from models.intake import judge_photo

    return judge_photo(data, role=role, accepted=accepted_faces, limits=intake_limits(svc.settings),
                       analyzer=svc.face_analyzer(), training_size=svc.settings.train_resolution)


def identity_outliers(svc, embeddings: list) -> list[int]:
    """Indices of accepted faces unlike the others (leave-one-out against the mean of the rest).

    The upload-time check compares a new photo with the pivot of the earlier ones, which cannot catch a stranger
    among the first two; this pass re-judges every accepted photo each time one is added, so the set that makes the
    avatar ready never holds one.
    """
    from models.intake import drop_outliers

    return drop_outliers(embeddings, intake_limits(svc.settings).same_person_min_similarity)


def refuse_as_different_person(svc, avatar_id: str, photo: dict) -> dict | None:
    updated = svc.db.avatars.find_one_and_update(
        {"_id": avatar_id, "photos": {"$elemMatch": {"id": photo["id"], "accepted": True}}},
        {"$set": {"photos.$.accepted": False, "photos.$.reasons": ["different_person"], "updated_at": states.now()},
         "$unset": {"photos.$.crop_key": "", "photos.$.embedding_key": "", "photos.$.phash": ""}},
        return_document=True)
    for key in (photo.get("crop_key"), photo.get("embedding_key")):
        if key:
            svc.blobs.delete(key)
    return updated


def missing_for_training(svc, avatar: dict, user: dict) -> list[str]:
    accepted = [p for p in avatar["photos"] if p["accepted"]]
    missing = []
    if not has_face_consent(user):
        missing.append("face_consent")
    if not any(p["role"] == "front" for p in accepted):
        missing.append("front_photo")
    if len(accepted) < svc.settings.min_photos:
        missing.append("more_photos")
    return missing


def refresh_readiness(svc, avatar: dict, user: dict) -> dict:
    missing = missing_for_training(svc, avatar, user)
    target = "collecting" if missing else "ready"
    if avatar["state"] != target:
        moved = states.transition(svc.db, "avatar", avatar["_id"], target, expect={"collecting", "ready"},
                                  by=f"user:{user['_id']}")
        avatar = moved or svc.db.avatars.find_one({"_id": avatar["_id"]})
    return avatar


def avatar_json(avatar: dict) -> dict:
    svc = services()
    accepted = [p for p in avatar["photos"] if p["accepted"]]
    body = {
        "id": avatar["_id"],
        "state": avatar["state"],
        "gender": avatar["gender"],
        "photos": [{"id": p["id"], "role": p.get("role"), "accepted": p["accepted"], "reasons": p.get("reasons", [])}
                   for p in avatar["photos"]],
        "accepted_count": len(accepted),
        "min_photos": svc.settings.min_photos,
        "max_photos": svc.settings.max_photos,
        "missing": missing_for_training(svc, avatar, g.user) if avatar["state"] in ("collecting", "ready") else [],
        "order_id": avatar.get("order_id"),
        "photos_purged": bool(avatar.get("photos_purged_at")),
        "failure": "technical_failure" if avatar["state"] == "failed" else None,
        "queue": None,
    }
    if avatar["state"] in ("queued", "training"):
        tracker = QueueTracker(svc.redis)
        body["queue"] = queue_json(tracker, tracker.subject(avatar_subject(avatar["_id"])))
    return body
