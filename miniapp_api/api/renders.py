"""Renders (one template on one avatar) and More Like Me (rules: portraits.renders)."""
from __future__ import annotations

from flask import Blueprint, g

from miniapp_api.api.auth import login_required
from miniapp_api.api.images import image_json
from miniapp_api.api.openapi import endpoint
from miniapp_api.api.requests import owned, services
from miniapp_api.schemas import Render, RenderRequest
from portraits import renders

bp = Blueprint("renders", __name__, url_prefix="/api/v1/renders")


@bp.post("")
@login_required
@endpoint(ok={201: Render}, errors=[402, 404, 409], rate_limit="rate_limit_renders")
def create_render(json: RenderRequest):
    """Render a template on an avatar (uses one render set of its order)."""
    avatar = owned("avatars", json.avatar_id, "avatar")
    return render_json(renders.create_render(services(), g.user, avatar, json.template_id)), 201


@bp.get("/<render_id>")
@login_required
@endpoint(ok={200: Render}, errors=[404])
def get_render(render_id):
    """A render's state and images."""
    return render_json(owned("renders", render_id, "render"))


@bp.post("/<render_id>/more-like-me")
@login_required
@endpoint(ok={201: Render}, errors=[404, 409], rate_limit="rate_limit_renders")
def more_like_me(render_id):
    """Render it again, closer to the user's face (free, a few times per render)."""
    parent = owned("renders", render_id, "render")
    avatar = owned("avatars", parent["avatar_id"], "avatar")
    return render_json(renders.more_like_me(services(), parent, avatar)), 201


def render_json(render: dict) -> dict:
    svc = services()
    images = {i["_id"]: i for i in svc.db.images.find({"_id": {"$in": render.get("image_ids", [])}})}
    return {"id": render["_id"], "state": render["state"], "avatar_id": render["avatar_id"],
            "template_id": render["template_id"], "parent_id": render.get("parent_id"),
            "likeness": render.get("likeness_best"), "parent_likeness": render.get("parent_likeness"),
            "relative_likeness": render.get("relative_likeness_best"),
            "refinements_left": renders.refinements_left(svc, render),
            # Portraits the content check refused are not delivered: not listed, not downloadable.
            "images": [image_json(images[i]) for i in render.get("image_ids", [])
                       if i in images and images[i].get("content_check") != "refused"],
            "queue": renders.queue_position(svc, render)}
