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

# More Like Me is free but limited: this many refinements per paid render set (its whole tree of children).
MAX_REFINEMENTS = 3
MORE_LIKE_ME = {"identity": 1.25, "identity_max": 2.0, "style": 0.5, "candidates": 2, "candidates_max": 16}


def claim_render_credit(db, order_id: str, user_id: str) -> dict | None:
    """Take one render set from a paid order atomically; None when none is left (or the order is not paid)."""
    return db.orders.find_one_and_update(
        {"_id": order_id, "user_id": user_id, "state": {"$in": ["paid", "fulfilled"]},
         "render_credits": {"$gt": 0}},
        {"$inc": {"render_credits": -1}})


def claim_refinement(db, root_id: str) -> bool:
    """Count one More Like Me against the root render set; False once MAX_REFINEMENTS are used."""
    claimed = db.renders.find_one_and_update(
        {"_id": root_id, "refinements_used": {"$not": {"$gte": MAX_REFINEMENTS}}},
        {"$inc": {"refinements_used": 1}})
    return claimed is not None


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
    order = claim_render_credit(svc.db, avatar["order_id"], g.user["_id"])
    if order is None:
        raise ApiError(402, "no_render_credits", "All render sets of this order are used.")
    params = {"identity_strength": template.identity_strength, "style_strength": template.style_strength,
              "candidates": template.candidates, "images_to_keep": template.images_to_keep}
    try:
        render = insert_render(svc, avatar, template.id, order["_id"], params, parent=None, charged=True)
    except Exception:
        svc.db.orders.update_one({"_id": order["_id"]}, {"$inc": {"render_credits": 1}})
        raise
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
    avatar = owned("avatars", parent["avatar_id"], "avatar")
    if avatar["state"] != "trained":
        raise ApiError(409, "avatar_not_trained", "The avatar is not ready for portraits.", {"state": avatar["state"]})
    root_id = parent.get("root_id") or parent["_id"]
    if not claim_refinement(svc.db, root_id):
        raise ApiError(409, "refinement_limit", "This render was refined as far as it goes.",
                       {"max": MAX_REFINEMENTS})
    params = more_like_me_params(parent["params"])
    try:
        child = insert_render(svc, avatar, parent["template_id"], parent["order_id"], params, parent=parent,
                               charged=False)
    except Exception:
        svc.db.renders.update_one({"_id": root_id}, {"$inc": {"refinements_used": -1}})
        raise
    return render_json(child), 201


def more_like_me_params(p: dict) -> dict:
    """Stronger identity, weaker style, more candidates; never weaker identity or fewer candidates than before."""
    return {
        "identity_strength": round(max(p["identity_strength"],
                                       min(p["identity_strength"] * MORE_LIKE_ME["identity"],
                                           MORE_LIKE_ME["identity_max"])), 3),
        "style_strength": round(p["style_strength"] * MORE_LIKE_ME["style"], 3),
        "candidates": max(p["candidates"], min(p["candidates"] * MORE_LIKE_ME["candidates"],
                                               MORE_LIKE_ME["candidates_max"])),
        "images_to_keep": p["images_to_keep"],
    }


def new_render_id() -> str:
    return "rd_" + secrets.token_hex(10)


def insert_render(svc, avatar, template_id, order_id, params, *, parent, charged: bool, by: str | None = None,
                  render_id: str | None = None, retry_of: str | None = None) -> dict:
    """A new queued render set (a user's, a More Like Me child, or an operator's retry of a failed one)."""
    at = states.now()
    render = {"_id": render_id or new_render_id(), "user_id": avatar["user_id"], "avatar_id": avatar["_id"],
              "order_id": order_id, "template_id": template_id, "parent_id": parent["_id"] if parent else None,
              "root_id": (parent.get("root_id") or parent["_id"]) if parent else None,
              "parent_likeness": parent.get("likeness_best") if parent else None,
              "params": params, "seed": secrets.randbelow(2**31), "charged": charged, "state": "queued",
              "attempts": 0, "image_ids": [], "created_at": at, "updated_at": at,
              "history": states.initial_history("queued", by or f"user:{avatar['user_id']}")}
    if retry_of:
        render["retry_of"] = retry_of
    svc.db.renders.insert_one(render)
    enqueue_render(svc, render)
    return render


def _refinements_left(svc, render: dict) -> int:
    root = svc.db.renders.find_one({"_id": render["root_id"]}) if render.get("root_id") else render
    return max(0, MAX_REFINEMENTS - (root or {}).get("refinements_used", 0))


def render_json(render: dict) -> dict:
    svc = services()
    images = {i["_id"]: i for i in svc.db.images.find({"_id": {"$in": render.get("image_ids", [])}})}
    body = {"id": render["_id"], "state": render["state"], "avatar_id": render["avatar_id"],
            "template_id": render["template_id"], "parent_id": render.get("parent_id"),
            "likeness": render.get("likeness_best"), "parent_likeness": render.get("parent_likeness"),
            "refinements_left": _refinements_left(svc, render),
            "images": [image_json(images[i]) for i in render.get("image_ids", []) if i in images],
            "queue": None}
    if render["state"] in ("queued", "rendering"):
        tracker = QueueTracker(svc.redis)
        tracked = tracker.subject(render_subject(render["_id"]))
        if tracked.get("job_id"):
            body["queue"] = tracker.position(tracked["queue"], tracked["job_id"])
    return body
