"""Orders: created on a payment rail (a WeChat Pay prepay, a virtual-payment order the client pays with the
signed parameters we give it, or a free redo credit), expired (closed at the gateway, then here) when left unpaid,
fulfilled by the first finished render. A paid order is what `payments` makes of it; its refunds are `refunds`'
business (and, where money cannot be refunded, `makegood`'s)."""
from __future__ import annotations

import logging
import secrets
from datetime import timedelta

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from portraits import avatars, errors, identity, products, states, users
from portraits.billing import makegood, payments, promises, rails
from portraits.billing.locks import order_lock
from portraits.gateways.wechatpay import PaymentGatewayError
from portraits.queue import lanes

log = logging.getLogger(__name__)


def new_order_id() -> str:
    return "P" + states.now().strftime("%Y%m%d") + secrets.token_hex(6).upper()


def create_order(services, user: dict, avatar: dict, sku: str, platform: str | None = None,
                 use_credit: bool = False) -> dict:
    """platform: the client's (wx.getDeviceInfo), which with PAYMENT_RAIL=by_platform picks the rail; use_credit:
    pay with one of the user's free redo credits for this sku instead of money."""
    settings = services.settings
    product = settings.skus.get(sku)
    if product is None:
        raise errors.Invalid("unknown_sku", "No such product.", {"sku": sku, "known": sorted(settings.skus)})
    if products.album_people(settings, sku):
        raise errors.Invalid("album_sku", "An album is bought with POST /api/v1/albums (it invites the others).",
                             {"sku": sku})
    identity.require_phone(services, user)  # real identity before payment
    avatar = avatars.for_product(services, user, avatar, sku)
    if avatar["state"] != "ready":
        raise avatars.not_ready(services, avatar, user)
    rail = _purchase_rail(services, user, sku, platform, use_credit)
    _expire_stale_open_order(services, avatar["_id"], by=f"user:{user['_id']}")
    order = _new_order(settings, user, avatar, sku, rail, platform)
    order["open_avatar_id"] = avatar["_id"]
    promise_terms = promises.terms(settings, product)
    if promise_terms is not None:
        order.update(lane=lanes.EXPRESS, promise_terms=promise_terms)
    return _place(services, user, order, product)


def _purchase_rail(services, user: dict, sku: str, platform: str | None, use_credit: bool) -> str:
    """The rail an order is paid on: a free redo credit for the sku (402 no_make_good_credit without one), else
    the client's (409 session_key_missing on virtual payment without a session)."""
    rail = rails.CREDIT if use_credit else rails.rail_for(services.settings, platform)
    if use_credit and not makegood.has_credit(user, sku):
        raise errors.PaymentRequired("no_make_good_credit", "You have no free redo credit for this product.",
                                     {"sku": sku})
    if rail == rails.XPAY and users.session_key(services, user) is None:
        raise errors.Conflict("session_key_missing", "Log in again (wx.login) before paying.", {})
    return rail


def create_album_order(services, user: dict, avatar: dict, sku: str, album_id: str, order_id: str,
                       platform: str | None = None, use_credit: bool = False) -> dict:
    """The order of an album (portraits.albums): the inviter's trained avatar pays for a plan drawn with every
    member's; paid on the client's rail like any order, or with a free redo credit for the album sku (an iOS album
    that ended undelivered was made good with one), it opens the album's invitation instead of a training. An
    inviter may have several albums open: there is no one-open-order-per-avatar rule. order_id: chosen by the
    album first (new_order_id), which is written with it."""
    settings = services.settings
    identity.require_phone(services, user)
    rail = _purchase_rail(services, user, sku, platform, use_credit)
    order = {**_new_order(settings, user, avatar, sku, rail, platform), "_id": order_id}
    order["album_id"] = album_id
    return _place(services, user, order, settings.skus[sku])


def _new_order(settings, user: dict, avatar: dict, sku: str, rail: str, platform: str | None) -> dict:
    product = settings.skus[sku]
    at = states.now()
    order = {
        "_id": new_order_id(),
        "user_id": user["_id"],
        "openid": user["openid"],
        "avatar_id": avatar["_id"],
        "sku": sku,
        "amount": 0 if rail == rails.CREDIT else int(product["amount"]),
        "render_credits": int(product["render_sets"]),
        # What the order owes after training, fixed when it is bought (portraits.packs renders it).
        "render_plan": products.render_plan(settings, sku),
        "rail": rail,
        "platform": (platform or "").lower() or None,
        "state": "created",
        "refunds": [],
        "created_at": at,
        "updated_at": at,
        "expires_at": at + timedelta(seconds=settings.order_expire_s),
        "history": states.initial_history("created", f"user:{user['_id']}"),
    }
    if rail == rails.XPAY:
        order.update(xpay_product_id=product.get("xpay_product_id") or sku, xpay_env=settings.xpay_env)
    return order


def _place(services, user: dict, order: dict, product: dict) -> dict:
    """Write a new order and start its payment on its rail."""
    rail = order["rail"]
    try:
        services.db.orders.insert_one(order)
    except DuplicateKeyError:
        existing = services.db.orders.find_one({"open_avatar_id": order["avatar_id"]}, {"_id": 1})
        raise errors.Conflict("order_already_open", "There is already an unpaid order for this avatar.",
                              {"order_id": existing["_id"] if existing else None})
    if rail == rails.CREDIT:
        return _pay_with_credit(services, order)
    if rail == rails.XPAY:
        return order  # nothing to ask WeChat first: the client pays with the signed parameters of xpay_params
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


def _pay_with_credit(services, order: dict) -> dict:
    """Spend a free redo credit on the order just created, which pays it (a crash between the two steps is healed
    by reconciliation: the credit rail answers SUCCESS once the credit names this order)."""
    if not makegood.claim_credit(services, order["user_id"], order["sku"], order["_id"]):
        states.transition(services.db, "order", order["_id"], "closed", expect={"created"}, by="credit",
                          reason="no_make_good_credit", unset_fields=("open_avatar_id",))
        raise errors.PaymentRequired("no_make_good_credit", "You have no free redo credit for this product.",
                                     {"sku": order["sku"]})
    payments.apply_payment(services, rails.credit_transaction(order), source=f"credit:{order['user_id']}")
    return services.db.orders.find_one({"_id": order["_id"]})


def _expire_stale_open_order(services, avatar_id: str, by: str) -> None:
    stale = services.db.orders.find_one({"open_avatar_id": avatar_id, "state": "created",
                                         "expires_at": {"$lte": states.now()}}, {"_id": 1})
    if stale is not None:
        expire_order(services, stale["_id"], by=by)


def expire_order(services, order_id: str, by: str) -> str:
    """Close an unpaid order at its gateway, then here. Returns what happened (a stable word)."""
    order = services.db.orders.find_one({"_id": order_id})
    if order is None or order["state"] != "created":
        return "not_open"
    try:
        rails.gateway_for(services, order).close_order(order_id)
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


def close_unpaid(services, order_id: str, by: str, reason: str) -> str:
    """expire_order, so the user can no longer pay it; when WeChat Pay cannot be reached now the order is closed
    here and reconciliation closes it there later (`gateway_close_pending`: a payment landing meanwhile is taken and
    refunded). Returns expire_order's word."""
    outcome = expire_order(services, order_id, by=by)
    if outcome == "close_failed":
        states.transition(services.db, "order", order_id, "closed", expect={"created"}, by=by, reason=reason,
                          unset_fields=("open_avatar_id",), set_fields={"gateway_close_pending": True})
    return outcome


def close_at_gateway(services, order_id: str, by: str) -> str:
    """For orders closed here whose prepay failed: make sure WeChat Pay has them closed as well."""
    try:
        rails.gateway_of(services, order_id).close_order(order_id)
    except PaymentGatewayError as error:
        if error.code == "orderpaid":
            return payments.apply_queried_payment(services, order_id, source=by)
        if error.code != "order_not_exist":
            return "close_failed"
    services.db.orders.update_one({"_id": order_id}, {"$unset": {"gateway_close_pending": ""}})
    return "closed_at_gateway"


def pay_params(services, order: dict) -> dict | None:
    """What wx.requestPayment needs, for a JSAPI order that can still be paid."""
    if order["state"] != "created" or not order.get("prepay_id") or rails.rail_of(order) != rails.JSAPI:
        return None
    return services.payments.pay_params(order["prepay_id"])


def xpay_params(services, order: dict, user: dict) -> dict | None:
    """What wx.requestVirtualPayment needs, for a virtual-payment order that can still be paid, signed with the
    user's current session key (None when there is none: the user logs in again)."""
    if order["state"] != "created" or rails.rail_of(order) != rails.XPAY:
        return None
    key = users.session_key(services, user)
    if key is None:
        return None
    return services.xpay.client_params(order_id=order["_id"], product_id=order["xpay_product_id"],
                                       price_fen=order["amount"], quantity=1, attach=order["avatar_id"],
                                       session_key=key)



def fulfil(services, order_id: str) -> dict | None:
    with order_lock(services, order_id):
        return states.transition(services.db, "order", order_id, "fulfilled", expect={"paid"}, by="render")
