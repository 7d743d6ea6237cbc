"""Subscribe-message grants reported by the client after wx.requestSubscribeMessage: one-time grants are counted."""
from __future__ import annotations

from flask import Blueprint, g

from miniapp_api.auth import login_required
from miniapp_api.errors import ApiError
from miniapp_api.requests import json_body, services

bp = Blueprint("subscriptions", __name__, url_prefix="/api/v1/subscriptions")

MAX_PENDING_GRANTS = 50


@bp.post("")
@login_required
def report_grants():
    body = json_body({"grants": dict})
    known = set(services().settings.subscribe_templates.values())
    problems = {t: "unknown template" for t in body["grants"] if t not in known}
    problems.update({t: "must be accept or reject" for t, v in body["grants"].items()
                     if v not in ("accept", "reject")})
    if problems:
        raise ApiError(400, "invalid_grants", "Some grants are not understood.", {"grants": problems})
    users = services().db.users
    for template_id, answer in body["grants"].items():
        if answer == "accept":
            users.update_one({"_id": g.user["_id"], f"subscriptions.{template_id}": {"$not": {"$gte": MAX_PENDING_GRANTS}}},
                             {"$inc": {f"subscriptions.{template_id}": 1}})
        else:
            users.update_one({"_id": g.user["_id"]}, {"$set": {f"subscriptions.{template_id}": 0}})
    user = users.find_one({"_id": g.user["_id"]})
    return {"subscriptions": user.get("subscriptions", {})}
