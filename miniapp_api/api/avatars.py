"""Avatars: start one, upload photos that are judged on arrival, follow the queue (rules: portraits.avatars)."""
from __future__ import annotations

from flask import Blueprint, g, request

from miniapp_api.api import queue_poll
from miniapp_api.api.auth import login_required
from miniapp_api.api.requests import json_body, owned, services
from miniapp_api.errors import ApiError
from portraits import avatars, consents, keys
from portraits.queue.tracking import QueueTracker

bp = Blueprint("avatars", __name__, url_prefix="/api/v1/avatars")


@bp.post("")
@login_required
def create_avatar():
    body = json_body({"gender": str})
    return avatar_json(avatars.create_avatar(services(), g.user, body["gender"])), 201


@bp.get("/<avatar_id>")
@login_required
def get_avatar(avatar_id):
    avatar = avatars.refresh_readiness(services(), owned("avatars", avatar_id, "avatar"), g.user)
    return avatar_json(avatar)


@bp.get("/<avatar_id>/queue")
def avatar_queue(avatar_id):
    """The cheap poll, safe at thousands of clients (see miniapp_api.api.queue_poll)."""
    return queue_poll.answer(services(), request.headers.get("Authorization", ""), avatar_id)


@bp.post("/<avatar_id>/photos")
@login_required
def upload_photo(avatar_id):
    svc = services()
    avatar = owned("avatars", avatar_id, "avatar")
    consents.require_face_consent(svc.settings, g.user)
    if request.mimetype != "multipart/form-data":
        raise ApiError(415, "multipart_required", "Upload the photo as multipart/form-data, field 'photo'.")
    upload = request.files.get("photo")
    if upload is None:
        raise ApiError(400, "photo_missing", "The multipart field 'photo' is missing.")
    role = request.form.get("role", "extra")
    photo, updated = avatars.add_photo(svc, g.user, avatar, upload.read(svc.settings.max_upload_bytes + 1), role)
    return {"id": photo["id"], "accepted": photo["accepted"], "reasons": photo["reasons"], "role": role,
            "avatar": avatar_json(updated)}, 201


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
        "missing": (avatars.missing_for_training(svc, avatar, g.user)
                    if avatar["state"] in avatars.TAKES_PHOTOS else []),
        "order_id": avatar.get("order_id"),
        "photos_purged": bool(avatar.get("photos_purged_at")),
        "failure": "technical_failure" if avatar["state"] == "failed" else None,
        "queue": None,
    }
    if avatar["state"] in ("queued", "training"):
        tracker = QueueTracker(svc.redis)
        body["queue"] = queue_poll.queue_json(tracker, tracker.subject(keys.avatar_subject(avatar["_id"])))
    return body
