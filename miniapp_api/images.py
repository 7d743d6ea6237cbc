"""Labelled images, downloadable and shareable by their owner only."""
from __future__ import annotations

from flask import Blueprint, Response, g, url_for

from jobs.rendering import image_key
from miniapp_api.auth import login_required
from miniapp_api.requests import owned, services

bp = Blueprint("images", __name__, url_prefix="/api/v1/images")


def image_json(image: dict) -> dict:
    return {"id": image["_id"], "url": url_for("images.get_image", image_id=image["_id"]),
            "poster_url": url_for("images.get_poster", image_id=image["_id"]),
            "likeness": image.get("likeness"), "content_id": image["content_id"],
            "width": image.get("width"), "height": image.get("height")}


@bp.get("/<image_id>")
@login_required
def get_image(image_id):
    image = owned("images", image_id, "image")
    data = services().sealed.get(image["user_id"], image_key(image["user_id"], image_id))
    services().db.images.update_one({"_id": image_id}, {"$inc": {"downloads": 1}})
    return Response(data, mimetype="image/png", headers={
        "Content-Disposition": f'attachment; filename="{image_id}.png"', "Cache-Control": "private, no-store"})


@bp.get("/<image_id>/poster")
@login_required
def get_poster(image_id):
    import io

    from PIL import Image

    from miniapp_api.posters import make_poster
    from miniapp_api.wechat import WeChatUnavailable
    from models.labels import find_cjk_font

    svc = services()
    image = owned("images", image_id, "image")
    render = svc.db.renders.find_one({"_id": image["render_id"]})
    template = svc.catalog.get(render["template_id"]) if render else None
    portrait = Image.open(io.BytesIO(svc.sealed.get(image["user_id"], image_key(image["user_id"], image_id))))
    scene = f"i={image_id}"[:32]
    try:
        code = svc.wechat.unlimited_wxa_code(scene=scene, page="pages/index/index", width=280)
    except WeChatUnavailable:
        code = None
    poster = make_poster(portrait, caption_zh=template.caption_zh if template else "我的AI写真",
                         app_code_png=code, fallback_url=f"{svc.settings.public_base_url}/s/{image_id}",
                         font_path=find_cjk_font(svc.settings.cjk_font_path))
    return Response(poster, mimetype="image/png", headers={"Cache-Control": "private, no-store"})
