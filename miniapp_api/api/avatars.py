"""Avatars: start one, upload photos (stored at once, judged by the intake worker), follow the queue (rules:
portraits.avatars)."""
from __future__ import annotations

from flask import Blueprint, g, request, url_for

from miniapp_api.api import queue_poll
from miniapp_api.api.auth import login_required
from miniapp_api.api.openapi import endpoint
from miniapp_api.api.requests import owned, services
from miniapp_api.schemas import Avatar, AvatarRequest, PhotoUpload, PhotoVerdict, Queue
from portraits import avatars, consents, keys, previews, tasks

bp = Blueprint("avatars", __name__, url_prefix="/api/v1/avatars")


@bp.post("")
@login_required
@endpoint(ok={201: Avatar}, errors=[403, 409], rate_limit="rate_limit_avatars")
def create_avatar(json: AvatarRequest):
    """Start an avatar, optionally for the product the user means to buy (its photo minimum applies)."""
    return avatar_json(avatars.create_avatar(services(), g.user, json.gender, json.sku)), 201


@bp.get("/<avatar_id>")
@login_required
@endpoint(ok={200: Avatar}, errors=[404])
def get_avatar(avatar_id):
    """State, photo verdicts, queue, and the preview once paid (pending, ready with its url, superseded)."""
    avatar = avatars.refresh_readiness(services(), owned("avatars", avatar_id, "avatar"), g.user)
    return avatar_json(avatar)


@bp.get("/<avatar_id>/queue")
@endpoint(ok={200: Queue}, errors=[404])
def avatar_queue(avatar_id):
    """The cheap poll, answered from Redis alone: safe at thousands of clients (miniapp_api.api.queue_poll)."""
    return queue_poll.answer(services(), request.headers.get("Authorization", ""), avatar_id)


@bp.post("/<avatar_id>/photos")
@login_required
@endpoint(ok={201: PhotoVerdict}, errors=[403, 404, 409, 503], rate_limit="rate_limit_uploads")
def upload_photo(avatar_id, form: PhotoUpload):
    """Upload one photo: stored sealed and answered at once as `judging`; its verdict lands in the avatar's photo
    list (poll GET /avatars/{id}). What its header alone refuses (not an image, a format or size not taken) is an
    error, and nothing is stored."""
    svc = services()
    avatar = owned("avatars", avatar_id, "avatar")
    consents.require_face_consent(svc.settings, g.user)
    data = form.photo.read(svc.settings.max_upload_bytes + 1)
    photo, updated = avatars.add_photo(svc, g.user, avatar, data, form.role)
    return {"id": photo["id"], "state": photo["state"], "accepted": photo["accepted"], "reasons": photo["reasons"],
            "role": form.role, "avatar": avatar_json(updated)}, 201


def avatar_json(avatar: dict) -> dict:
    svc = services()
    accepted = [p for p in avatar["photos"] if p["accepted"]]
    body = {
        "id": avatar["_id"],
        "state": avatar["state"],
        "gender": avatar["gender"],
        "photos": [{"id": p["id"], "role": p.get("role"), "state": avatars.photo_state(p), "accepted": p["accepted"],
                    "reasons": p.get("reasons", []), "content_check": p.get("content_check")}
                   for p in avatar["photos"]],
        "accepted_count": len(accepted),
        "sku": avatar.get("sku"),
        "min_photos": avatars.photo_minimum(svc.settings, avatar),
        "max_photos": svc.settings.max_photos,
        "missing": (avatars.missing_for_training(svc, avatar, g.user)
                    if avatar["state"] in avatars.TAKES_PHOTOS else []),
        "order_id": avatar.get("order_id"),
        "photos_purged": bool(avatar.get("photos_purged_at")),
        "failure": "technical_failure" if avatar["state"] == "failed" else None,
        "queue": None,
        "preview": preview_json(avatar),
    }
    if avatar["state"] in ("queued", "training"):
        tracker = tasks.queue_tracker(svc)
        body["queue"] = queue_poll.queue_json(tracker, tracker.subject(keys.avatar_subject(avatar["_id"])))
    return body


def preview_json(avatar: dict | None) -> dict | None:
    """The avatar's preview as the client sees it (portraits.previews.client_state), with its URL once ready."""
    state = previews.client_state(services(), avatar) if avatar is not None else None
    if state is None:
        return None
    url = url_for("images.get_image", image_id=state["image_id"]) if state["image_id"] else None
    return {**state, "url": url}
