"""Orders: buy an avatar pack through WeChat Pay JSAPI or virtual payment (or with a free redo credit), and follow
the order's state."""
from __future__ import annotations

from flask import Blueprint, g

from miniapp_api.api.auth import login_required
from miniapp_api.api.avatars import preview_json
from miniapp_api.api.openapi import endpoint
from miniapp_api.api.requests import owned, services
from miniapp_api.schemas import Order, OrderRequest
from portraits import consents
from portraits.billing import orders, rails
from portraits.queue import lanes

bp = Blueprint("orders", __name__, url_prefix="/api/v1/orders")


@bp.post("")
@login_required
@endpoint(ok={201: Order}, errors=[402, 403, 404, 409, 502], rate_limit="rate_limit_orders")
def create_order(json: OrderRequest):
    """Buy an avatar pack. The rail (PAYMENT_RAIL, the request's platform) decides how: a WeChat Pay JSAPI prepay
    paid with wx.requestPayment(pay_params), or virtual payment paid with wx.requestVirtualPayment(xpay_params);
    use_credit pays with a free redo credit (the order answers paid at once). On iOS, ios_make_good says what a
    technical failure is made good with, since iOS virtual payments cannot be refunded by us."""
    avatar = owned("avatars", json.avatar_id, "avatar")
    if avatar["state"] == "ready":
        consents.require_face_consent(services().settings, g.user)  # it may have been withdrawn or outdated since the avatar became ready
    order = orders.create_order(services(), g.user, avatar, json.sku, platform=json.platform,
                                use_credit=json.use_credit)
    return client_order_json(order), 201


@bp.get("/<order_id>")
@login_required
@endpoint(ok={200: Order}, errors=[404])
def get_order(order_id):
    """An order's state (pay_params or xpay_params while it can still be paid) and its avatar's preview."""
    return client_order_json(owned("orders", order_id, "order"))


def client_order_json(order: dict) -> dict:
    """An order with what paying it needs and, on iOS, the make-good rule."""
    body = order_json(order, orders.pay_params(services(), order))
    avatar = services().db.avatars.find_one({"_id": order["avatar_id"], "order_id": order["_id"]})
    body["preview"] = preview_json(avatar)
    xpay_params = orders.xpay_params(services(), order, g.user)
    if xpay_params is not None:
        body["xpay_params"] = xpay_params
    if rails.refund_impossible(order):
        body["ios_make_good"] = services().settings.xpay_ios_make_good
    return body


def order_json(order: dict, params: dict | None = None) -> dict:
    """An order as the client (and the personal-data export) sees it."""
    body = {
        "id": order["_id"],
        "avatar_id": order["avatar_id"],
        "sku": order["sku"],
        "amount": order["amount"],
        "rail": rails.rail_of(order),
        "platform": order.get("platform"),
        "state": order["state"],
        "render_credits": order.get("render_credits", 0),
        "lane": lanes.lane_of(order),
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
    promise = order.get("promise") or order.get("promise_terms")
    if promise:
        body["promise"] = promise_json(promise)
    return body


def promise_json(promise: dict) -> dict:
    """An express order's promised wait: its terms from the order's creation, its clock from payment."""
    compensation = promise.get("compensation")
    return {"state": promise.get("state"), "wait_s": promise["wait_s"], "margin_s": promise["margin_s"],
            "difference_fen": promise["difference_fen"], "deadline": _iso(promise.get("deadline")),
            "waited_s": promise.get("waited_s"),
            "compensation": compensation.get("kind") if compensation else None}


def _iso(value):
    return value.isoformat().replace("+00:00", "Z") if value else None
