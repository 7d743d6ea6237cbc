"""Subscribe-message grants reported by the client after wx.requestSubscribeMessage: one-time grants are counted.

Each "accept" is one more message WeChat will let us send on that template (capped); "reject" and "ban" (the user
turned subscribe messages off) clear the count; "filter" (WeChat filtered the template out) changes nothing.
Messages consume the grants (jobs.notifications).
"""
from __future__ import annotations

from flask import Blueprint, g

from miniapp_api.api.auth import login_required
from miniapp_api.api.openapi import endpoint
from miniapp_api.api.requests import services
from miniapp_api.errors import ApiError
from miniapp_api.schemas import GrantsReport, Subscriptions

bp = Blueprint("subscriptions", __name__, url_prefix="/api/v1/subscriptions")

MAX_PENDING_GRANTS = 50


@bp.post("")
@login_required
@endpoint(ok={200: Subscriptions})
def report_grants(json: GrantsReport):
    """Report what wx.requestSubscribeMessage answered (answers outside the enum: 400 invalid_grants)."""
    known = set(services().settings.subscribe_templates.values())
    problems = {t: "unknown template" for t in json.grants if t not in known}
    if problems:
        raise ApiError(400, "invalid_grants", "Some grants are not understood.", {"grants": problems})
    users = services().db.users
    for template_id, answer in json.grants.items():
        if answer == "accept":
            users.update_one({"_id": g.user["_id"], f"subscriptions.{template_id}": {"$not": {"$gte": MAX_PENDING_GRANTS}}},
                             {"$inc": {f"subscriptions.{template_id}": 1}})
        elif answer in ("reject", "ban"):
            users.update_one({"_id": g.user["_id"]}, {"$set": {f"subscriptions.{template_id}": 0}})
    user = users.find_one({"_id": g.user["_id"]})
    return {"subscriptions": user.get("subscriptions", {})}
