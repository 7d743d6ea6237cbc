"""Orders: buy an avatar pack through WeChat Pay JSAPI, and follow the order's state."""
from __future__ import annotations

from flask import Blueprint, g

from miniapp_api import billing
from miniapp_api.auth import login_required
from miniapp_api.avatars import require_face_consent
from miniapp_api.requests import json_body, owned, services

bp = Blueprint("orders", __name__, url_prefix="/api/v1/orders")


@bp.post("")
@login_required
def create_order():
    body = json_body({"avatar_id": str, "sku": str})
    avatar = owned("avatars", body["avatar_id"], "avatar")
    if avatar["state"] == "ready":
        require_face_consent(g.user)  # it may have been withdrawn or outdated since the avatar became ready
    order = billing.create_order(services(), g.user, avatar, body["sku"])
    return billing.order_json(order, billing.pay_params(services(), order)), 201


@bp.get("/<order_id>")
@login_required
def get_order(order_id):
    order = owned("orders", order_id, "order")
    return billing.order_json(order, billing.pay_params(services(), order))
