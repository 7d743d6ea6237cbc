"""Renders (one template on one avatar) and More Like Me."""
from __future__ import annotations

import secrets

from flask import Blueprint, g

from jobs.rendering import enqueue_render
from jobs.tracking import QueueTracker
from jobs.rendering import subject as render_subject
from miniapp_api import states
from miniapp_api.auth import login_required
from miniapp_api.errors import ApiError
from miniapp_api.images import image_json
from miniapp_api.requests import json_body, owned, services

bp = Blueprint("renders", __name__, url_prefix="/api/v1/renders")

MAX_REFINEMENTS = 3
MORE_LIKE_ME = {"identity": 1.25, "identity_max": 1.6, "style": 0.5, "candidates": 2, "candidates_max": 16}


@bp.post("")
@login_required
def create_render():
    body = json_body({"avatar_id": str, "template_id": str})
    svc = services()
    avatar = owned("avatars", body["avatar_id"], "avatar")
    template = svc.catalog.get(body["template_id"])
    if template is None:
        raise ApiError(404, "template_not_found", "No such template.")
    if avatar["state"] != "trained":
        raise ApiError(409, "avatar_not_trained", "The avatar is not ready for portraits yet.",
                       {"state": avatar["state"]})
    if template.gender != avatar["gender"]:
        raise ApiError(400, "template_gender_mismatch", "Pick a template made for this avatar's gender.",
                       {"template_gender": template.gender, "avatar_gender": avatar["gender"]})
    order = svc.db.orders.find_one_and_update(
        {"_id": avatar["order_id"], "user_id": g.user["_id"], "state": {"$in": ["paid", "fulfilled"]},
         "render_credits": {"$gt": 0}},
        {"$inc": {"render_credits": -1}})
    if order is None:
        raise ApiError(402, "no_render_credits", "All render sets of this order are used.")
    params = {"identity_strength": template.identity_strength, "style_strength": template.style_strength,
              "candidates": template.candidates, "images_to_keep": template.images_to_keep}
    render = _insert_render(svc, avatar, template.id, order["_id"], params, parent=None, charged=True)
    return render_json(render), 201


@bp.get("/<render_id>")
@login_required
def get_render(render_id):
    return render_json(owned("renders", render_id, "render"))


@bp.post("/<render_id>/more-like-me")
@login_required
def more_like_me(render_id):
    svc = services()
    parent = owned("renders", render_id, "render")
    if parent["state"] != "done":
        raise ApiError(409, "render_not_done", "Wait for this render to finish first.", {"state": parent["state"]})
    if svc.db.renders.count_documents({"parent_id": render_id}) >= MAX_REFINEMENTS:
        raise ApiError(409, "refinement_limit", "This render was refined as far as it goes.",
                       {"max": MAX_REFINEMENTS})
    avatar = owned("avatars", parent["avatar_id"], "avatar")
    p = parent["params"]
    params = {
        "identity_strength": round(min(p["identity_strength"] * MORE_LIKE_ME["identity"], MORE_LIKE_ME["identity_max"]), 3),
        "style_strength": round(p["style_strength"] * MORE_LIKE_ME["style"], 3),
        "candidates": min(p["candidates"] * MORE_LIKE_ME["candidates"], MORE_LIKE_ME["candidates_max"]),
        "images_to_keep": p["images_to_keep"],
    }
    child = _insert_render(svc, avatar, parent["template_id"], parent["order_id"], params, parent=parent, charged=False)
    return render_json(child), 201


def _insert_render(svc, avatar, template_id, order_id, params, parent, charged: bool) -> dict:
    at = states.now()
    render = {"_id": "rd_" + secrets.token_hex(10), "user_id": avatar["user_id"], "avatar_id": avatar["_id"],
              "order_id": order_id, "template_id": template_id, "parent_id": parent["_id"] if parent else None,
              "parent_likeness": parent.get("likeness_best") if parent else None,
              "params": params, "seed": secrets.randbelow(2**31), "charged": charged, "state": "queued",
              "attempts": 0, "image_ids": [], "created_at": at, "updated_at": at,
              "history": states.initial_history("queued", f"user:{avatar['user_id']}")}
    svc.db.renders.insert_one(render)
    enqueue_render(svc, render)
    return render


def render_json(render: dict) -> dict:
    svc = services()
    images = {i["_id"]: i for i in svc.db.images.find({"_id": {"$in": render.get("image_ids", [])}})}
    body = {"id": render["_id"], "state": render["state"], "avatar_id": render["avatar_id"],
            "template_id": render["template_id"], "parent_id": render.get("parent_id"),
            "likeness": render.get("likeness_best"), "parent_likeness": render.get("parent_likeness"),
            "images": [image_json(images[i]) for i in render.get("image_ids", []) if i in images],
            "queue": None}
    if render["state"] in ("queued", "rendering"):
        tracker = QueueTracker(svc.redis)
        tracked = tracker.subject(render_subject(render["_id"]))
        if tracked.get("job_id"):
            body["queue"] = tracker.position(tracked["queue"], tracked["job_id"])
    return body
