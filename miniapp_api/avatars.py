"""Avatars: start one, upload photos that are judged on arrival, follow the queue."""
from __future__ import annotations

import io
import secrets

import numpy as np
from flask import Blueprint, g, request
from itsdangerous import BadSignature

from jobs.tracking import QueueTracker
from jobs.training import subject as avatar_subject
from miniapp_api import states
from miniapp_api.auth import bearer_token, login_required
from miniapp_api.consents import has_face_consent
from miniapp_api.errors import ApiError, not_found
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
    return avatar_json(owned("avatars", avatar_id, "avatar"))


@bp.get("/<avatar_id>/queue")
def avatar_queue(avatar_id):
    """The cheap poll: Redis only, token checked by signature alone."""
    from miniapp_api.auth import _serializer

    try:
        claims = _serializer().loads(bearer_token(), max_age=services().settings.token_ttl_s)
    except BadSignature:
        raise ApiError(401, "invalid_token", "The token is not valid.")
    tracker = QueueTracker(services().redis)
    tracked = tracker.subject(avatar_subject(avatar_id))
    if tracked.get("owner") != claims.get("uid"):
        raise not_found("avatar")
    return queue_json(tracker, tracked)


def queue_json(tracker: QueueTracker, tracked: dict) -> dict:
    state = tracked.get("state", "queued")
    progress = float(tracked.get("progress") or 0)
    if state in ("queued", "training") and tracked.get("job_id"):
        where = tracker.position(tracked["queue"], tracked["job_id"], progress)
    else:
        where = {"position": 0, "ahead": 0, "eta_seconds": 0}
    return {"state": state, "position": where["position"], "ahead": where["ahead"],
            "eta_seconds": where["eta_seconds"], "progress": progress}


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
    verdict = judge(svc, avatar, data, role, accepted_photos)
    refusal = next((reason for reason in verdict.reasons if reason in NOT_A_PHOTO), None)
    if refusal:
        status, message = NOT_A_PHOTO[refusal]
        raise ApiError(status, refusal, message)
    photo = {"id": "ph_" + secrets.token_hex(8), "role": role, "accepted": verdict.accepted,
             "reasons": list(verdict.reasons), "uploaded_at": states.now()}
    if verdict.accepted:
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
        raise ApiError(409, "avatar_not_collecting", "This avatar no longer takes photos.")
    updated = refresh_readiness(svc, updated, g.user)
    return {"id": photo["id"], "accepted": photo["accepted"], "reasons": photo["reasons"], "role": role,
            "avatar": avatar_json(updated)}, 201


def judge(svc, avatar, data: bytes, role: str, accepted_photos: list[dict]):
    from models.intake import AcceptedFace, IntakeLimits, judge_photo

    accepted = [
        AcceptedFace(embedding=np.frombuffer(svc.sealed.get(avatar["user_id"], p["embedding_key"]), dtype=np.float64),
                     phash=int(p["phash"]))
        for p in accepted_photos
    ]
    limits = IntakeLimits(max_bytes=svc.settings.max_upload_bytes, max_pixels=svc.settings.max_pixels)
    return judge_photo(data, role=role, accepted=accepted, limits=limits, analyzer=svc.face_analyzer())


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
