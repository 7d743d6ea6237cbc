"""Orders: buy an avatar pack through WeChat Pay JSAPI, and follow the order's state."""
from __future__ import annotations

from flask import Blueprint, g

from miniapp_api.api.auth import login_required
from miniapp_api.api.openapi import endpoint
from miniapp_api.api.requests import owned, services
from miniapp_api.schemas import Order, OrderRequest
from portraits import consents
from portraits.billing import orders

bp = Blueprint("orders", __name__, url_prefix="/api/v1/orders")


@bp.post("")
@login_required
@endpoint(ok={201: Order}, errors=[403, 404, 409, 502], rate_limit="rate_limit_orders")
def create_order(json: OrderRequest):
    """Buy an avatar pack: a WeChat Pay JSAPI prepay, paid with wx.requestPayment(pay_params)."""
    avatar = owned("avatars", json.avatar_id, "avatar")
    if avatar["state"] == "ready":
        consents.require_face_consent(services().settings, g.user)  # it may have been withdrawn or outdated since the avatar became ready
    order = orders.create_order(services(), g.user, avatar, json.sku)
    return order_json(order, orders.pay_params(services(), order)), 201


@bp.get("/<order_id>")
@login_required
@endpoint(ok={200: Order}, errors=[404])
def get_order(order_id):
    """An order's state (pay_params while it can still be paid)."""
    order = owned("orders", order_id, "order")
    return order_json(order, orders.pay_params(services(), order))


def order_json(order: dict, params: dict | None = None) -> dict:
    """An order as the client (and the personal-data export) sees it."""
    body = {
        "id": order["_id"],
        "avatar_id": order["avatar_id"],
        "sku": order["sku"],
        "amount": order["amount"],
        "state": order["state"],
        "render_credits": order.get("render_credits", 0),
        "created_at": _iso(order.get("created_at")),
        "paid_at": _iso(order.get("paid_at")),
        "refunds": [
            {"out_refund_no": r["out_refund_no"], "amount": r["amount"], "state": r["state"],
             "reason": r.get("reason"), "requested_at": _iso(r.get("requested_at"))}
            for r in order.get("refunds", [])
        ],
    }
    if params is not None:
        body["pay_params"] = params
    return body


def _iso(value):
    return value.isoformat().replace("+00:00", "Z") if value else None
