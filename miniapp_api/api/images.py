"""Labelled images, downloadable and shareable by their owner only."""
from __future__ import annotations

import io
import json

from flask import Blueprint, Response, url_for
from PIL import Image

from miniapp_api.api.auth import login_required
from miniapp_api.api.openapi import endpoint
from miniapp_api.api.requests import owned, services
from miniapp_api.schemas import PNG
from models.labels import METADATA_KEY, find_cjk_font, label_metadata
from models.posters import make_poster
from portraits import keys
from portraits.errors import Conflict, not_found
from portraits.gateways.wechat import WeChatUnavailable

bp = Blueprint("images", __name__, url_prefix="/api/v1/images")

SHARE_PAGE = "pages/index/index"
SCENE_MAX_CHARS = 32  # WeChat's limit for getwxacodeunlimit's scene
APP_CODE_WIDTH = 280
DEFAULT_CAPTION = "我的AI写真"


def image_json(image: dict) -> dict:
    return {"id": image["_id"], "url": url_for("images.get_image", image_id=image["_id"]),
            "poster_url": url_for("images.get_poster", image_id=image["_id"]),
            "likeness": image.get("likeness"), "content_id": image["content_id"], "render_id": image["render_id"],
            "width": image.get("width"), "height": image.get("height"),
            "content_check": image.get("content_check", "pass")}


def delivered_image(image_id: str) -> dict:
    """The user's image once WeChat's content check passed it: 409 image_pending_check while it waits, 404 (as for
    any other id) when it was refused."""
    image = owned("images", image_id, "image")
    if image.get("content_check") == "refused":
        raise not_found("image")
    if image.get("content_check") == "pending":
        raise Conflict("image_pending_check", "This portrait is still being checked; try again in a moment.")
    return image


@bp.get("/<image_id>")
@login_required
@endpoint(ok={200: PNG}, errors=[404, 409])
def get_image(image_id):
    """The image (owner only): a PNG with visible and metadata AI labels, once WeChat's content check passed it."""
    image = delivered_image(image_id)
    data = services().sealed.get(image["user_id"], keys.image(image["user_id"], image_id))
    services().db.images.update_one({"_id": image_id}, {"$inc": {"downloads": 1}})
    return Response(data, mimetype="image/png", headers={
        "Content-Disposition": f'attachment; filename="{image_id}.png"', "Cache-Control": "private, no-store"})


@bp.get("/<image_id>/poster")
@login_required
@endpoint(ok={200: PNG}, errors=[404, 409])
def get_poster(image_id):
    """A 750x1334 share poster with a mini-program code back into the app."""
    svc = services()
    image = delivered_image(image_id)
    render = svc.db.renders.find_one({"_id": image["render_id"]})
    template = svc.catalog.get(render["template_id"]) if render else None
    portrait = Image.open(io.BytesIO(svc.sealed.get(image["user_id"], keys.image(image["user_id"], image_id))))
    metadata = json.dumps(label_metadata(content_id=image["content_id"], provider=svc.settings.provider_name),
                          ensure_ascii=True)
    poster = make_poster(portrait, caption_zh=template.caption_zh if template else DEFAULT_CAPTION,
                         app_code_png=_app_code(svc, image_id), fallback_url=share_url(svc, image_id),
                         font_path=find_cjk_font(svc.settings.cjk_font_path),
                         portrait_labelled=True, png_text={METADATA_KEY: metadata})
    return Response(poster, mimetype="image/png", headers={"Cache-Control": "private, no-store"})


def share_url(svc, image_id: str) -> str:
    return f"{svc.settings.public_base_url}/s/{image_id}"


def _app_code(svc, image_id: str) -> bytes | None:
    """The mini-program code opening the app on this image's scene; None when WeChat cannot give one."""
    scene = f"i={image_id}"[:SCENE_MAX_CHARS]
    try:
        return svc.wechat.unlimited_wxa_code(scene=scene, page=SHARE_PAGE, width=APP_CODE_WIDTH)
    except WeChatUnavailable:
        return None
