"""Orders: created with a WeChat Pay prepay, expired (closed at WeChat Pay, then here) when left unpaid, fulfilled by
the first finished render. A paid order is what `payments` makes of it; its refunds are `refunds`' business."""
from __future__ import annotations

import logging
import secrets
from datetime import timedelta

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from portraits import errors, identity, states
from portraits.billing import payments
from portraits.billing.locks import order_lock
from portraits.gateways.wechatpay import PaymentGatewayError

log = logging.getLogger(__name__)


def new_order_id() -> str:
    return "P" + states.now().strftime("%Y%m%d") + secrets.token_hex(6).upper()


def create_order(services, user: dict, avatar: dict, sku: str) -> dict:
    settings = services.settings
    product = settings.skus.get(sku)
    if product is None:
        raise errors.Invalid("unknown_sku", "No such product.", {"sku": sku, "known": sorted(settings.skus)})
    identity.require_phone(services, user)  # real identity before payment
    if avatar["state"] != "ready":
        raise errors.Conflict("avatar_not_ready", "This avatar cannot be paid for now.",
                              {"state": avatar["state"], "missing": avatar.get("missing", [])})
    _expire_stale_open_order(services, avatar["_id"], by=f"user:{user['_id']}")
    at = states.now()
    order = {
        "_id": new_order_id(),
        "user_id": user["_id"],
        "openid": user["openid"],
        "avatar_id": avatar["_id"],
        "open_avatar_id": avatar["_id"],
        "sku": sku,
        "amount": int(product["amount"]),
        "render_credits": int(product["render_sets"]),
        "state": "created",
        "refunds": [],
        "created_at": at,
        "updated_at": at,
        "expires_at": at + timedelta(seconds=settings.order_expire_s),
        "history": states.initial_history("created", f"user:{user['_id']}"),
    }
    try:
        services.db.orders.insert_one(order)
    except DuplicateKeyError:
        existing = services.db.orders.find_one({"open_avatar_id": avatar["_id"]}, {"_id": 1})
        raise errors.Conflict("order_already_open", "There is already an unpaid order for this avatar.",
                              {"order_id": existing["_id"] if existing else None})
    try:
        prepay_id = services.payments.prepay(order["_id"], order["amount"], product["description"], user["openid"])
    except PaymentGatewayError as error:
        # Closed here at once so the user can retry; a timed-out prepay may still have created the order at
        # WeChat Pay, so the reconciliation job closes it there too, after the grace period.
        states.transition(services.db, "order", order["_id"], "closed", by=f"user:{user['_id']}",
                          reason=f"prepay_failed:{error.code}", unset_fields=("open_avatar_id",),
                          set_fields={"gateway_close_pending": True})
        raise errors.UpstreamFailed("payment_unavailable",
                                    "WeChat Pay did not answer; nothing was charged. Try again.",
                                    {"gateway_code": error.code})
    # The payment callback may already have landed (it can arrive before prepay returns): read the order back.
    return services.db.orders.find_one_and_update({"_id": order["_id"]}, {"$set": {"prepay_id": prepay_id}},
                                                  return_document=ReturnDocument.AFTER)


def _expire_stale_open_order(services, avatar_id: str, by: str) -> None:
    stale = services.db.orders.find_one({"open_avatar_id": avatar_id, "state": "created",
                                         "expires_at": {"$lte": states.now()}}, {"_id": 1})
    if stale is not None:
        expire_order(services, stale["_id"], by=by)


def expire_order(services, order_id: str, by: str) -> str:
    """Close an unpaid order at WeChat Pay, then here. Returns what happened (a stable word)."""
    order = services.db.orders.find_one({"_id": order_id})
    if order is None or order["state"] != "created":
        return "not_open"
    try:
        services.payments.close_order(order_id)
    except PaymentGatewayError as error:
        if error.code == "orderpaid":
            return payments.apply_queried_payment(services, order_id, source=by)
        if error.code != "order_not_exist":  # not existing at WeChat Pay means there is nothing to close there
            log.warning("closing %s at WeChat Pay failed: %s", order_id, error)
            return "close_failed"
    with order_lock(services, order_id):
        closed = states.transition(services.db, "order", order_id, "closed", expect={"created"}, by=by,
                                   reason="expired", unset_fields=("open_avatar_id",),
                                   set_fields={"closed_at": states.now()})
    return "closed" if closed is not None else "already_moved"


def close_at_gateway(services, order_id: str, by: str) -> str:
    """For orders closed here whose prepay failed: make sure WeChat Pay has them closed as well."""
    try:
        services.payments.close_order(order_id)
    except PaymentGatewayError as error:
        if error.code == "orderpaid":
            return payments.apply_queried_payment(services, order_id, source=by)
        if error.code != "order_not_exist":
            return "close_failed"
    services.db.orders.update_one({"_id": order_id}, {"$unset": {"gateway_close_pending": ""}})
    return "closed_at_gateway"


def pay_params(services, order: dict) -> dict | None:
    if order["state"] != "created" or not order.get("prepay_id"):
        return None
    return services.payments.pay_params(order["prepay_id"])


def fulfil(services, order_id: str) -> dict | None:
    with order_lock(services, order_id):
        return states.transition(services.db, "order", order_id, "fulfilled", expect={"paid"}, by="render")
