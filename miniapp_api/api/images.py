"""Labelled images, downloadable and shareable by their owner only (and an album's by each of its members)."""
from __future__ import annotations

import io
import json

from flask import Blueprint, Response, g, url_for
from PIL import Image

from miniapp_api.api.auth import login_required
from miniapp_api.api.openapi import endpoint
from miniapp_api.api.requests import services
from miniapp_api.schemas import JPEG, PNG, PosterPending
from models.labels import METADATA_KEY, find_cjk_font, label_metadata, media_type
from models.posters import make_poster
from portraits import albums, keys, sharing
from portraits.errors import Conflict, not_found

bp = Blueprint("images", __name__, url_prefix="/api/v1/images")

DEFAULT_CAPTION = "我的AI写真"
EXTENSIONS = {JPEG: "jpg", PNG: "png"}


def image_json(image: dict) -> dict:
    return {"id": image["_id"], "url": url_for("images.get_image", image_id=image["_id"]),
            "poster_url": url_for("images.get_poster", image_id=image["_id"]),
            "likeness": image.get("likeness"), "content_id": image["content_id"], "render_id": image["render_id"],
            "width": image.get("width"), "height": image.get("height"),
            "content_check": image.get("content_check", "pass")}


def delivered_image(image_id: str) -> dict:
    """The user's image once WeChat's content check passed it: 409 image_pending_check while it waits, 404 (as for
    any other id) when it was refused."""
    svc = services()
    image = svc.db.images.find_one({"_id": image_id})
    if image is None or not albums.can_view_image(svc, image, g.user["_id"]):  # an album's: each member's too
        raise not_found("image")
    if image.get("content_check") == "refused":
        raise not_found("image")
    if image.get("content_check") == "pending":
        raise Conflict("image_pending_check", "This portrait is still being checked; try again in a moment.")
    return image


@bp.get("/<image_id>")
@login_required
@endpoint(ok={200: JPEG}, also_answers={200: PNG}, errors=[404, 409])
def get_image(image_id):
    """The image (owner only; an album's: each member), once WeChat's content check passed it: a JPEG (metadata label in XMP and EXIF), or a
    PNG (iTXt label) for ID photos and under PORTRAIT_FORMAT=png; both with the visible AI label."""
    image = delivered_image(image_id)
    data = services().sealed.get(image["user_id"], keys.image(image["user_id"], image_id))
    services().db.images.update_one({"_id": image_id}, {"$inc": {"downloads": 1}})
    kind = media_type(data)
    return Response(data, mimetype=kind, headers={
        "Content-Disposition": f'attachment; filename="{image_id}.{EXTENSIONS[kind]}"',
        "Cache-Control": "private, no-store"})


@bp.get("/<image_id>/poster")
@login_required
@endpoint(ok={200: PNG, 202: PosterPending}, errors=[404, 409])
def get_poster(image_id):
    """A 750x1334 share poster carrying the mini-program code back into the app (never a QR code: Moments does not
    allow them). 202 `pending` while WeChat cannot draw the code yet: it is retried; ask again after Retry-After."""
    svc = services()
    image = delivered_image(image_id)
    code = sharing.share_code(svc, image)
    if code is None:
        wait = sharing.retry_after_s(svc.settings)
        return {"state": "pending", "reason": "wxacode_pending", "retry_after_s": wait}, 202, {"Retry-After": str(wait)}
    render = svc.db.renders.find_one({"_id": image["render_id"]})
    template = svc.catalog.get(render["template_id"]) if render else None
    portrait = Image.open(io.BytesIO(svc.sealed.get(image["user_id"], keys.image(image["user_id"], image_id))))
    metadata = json.dumps(label_metadata(content_id=image["content_id"], provider=svc.settings.provider_name),
                          ensure_ascii=True)
    poster = make_poster(portrait, caption_zh=template.caption_zh if template else DEFAULT_CAPTION,
                         app_code_png=code, font_path=find_cjk_font(svc.settings.cjk_font_path),
                         portrait_labelled=True, png_text={METADATA_KEY: metadata})
    return Response(poster, mimetype="image/png", headers={"Cache-Control": "private, no-store"})
