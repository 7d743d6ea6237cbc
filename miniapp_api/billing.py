"""Orders, payments and refunds. The order id is the idempotency key everywhere.

Payment callbacks, the reconciliation job and the refund job all end in the same two functions,
`apply_payment` and `apply_refund_result`, whose effects happen only when the order's state transition wins.
"""
from __future__ import annotations

import secrets
from datetime import timedelta

from pymongo.errors import DuplicateKeyError

from miniapp_api import states
from miniapp_api.errors import ApiError
from miniapp_api.payments import PaymentGatewayError

REFUND_SUCCESS = "SUCCESS"
REFUND_FINAL_FAILURES = ("ABNORMAL", "CLOSED")


def new_order_id() -> str:
    return "P" + states.now().strftime("%Y%m%d") + secrets.token_hex(6).upper()


def refund_number(order_id: str, sequence: int = 1) -> str:
    """Deterministic: asking WeChat Pay twice for the same refund can never move money twice."""
    return f"R{order_id}-{sequence}"


def create_order(services, user: dict, avatar: dict, sku: str) -> dict:
    settings = services.settings
    product = settings.skus.get(sku)
    if product is None:
        raise ApiError(400, "unknown_sku", "No such product.", {"sku": sku, "known": sorted(settings.skus)})
    if avatar["state"] != "ready":
        raise ApiError(409, "avatar_not_ready", "This avatar cannot be paid for now.",
                       {"state": avatar["state"], "missing": avatar.get("missing", [])})
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
        raise ApiError(409, "order_already_open", "There is already an unpaid order for this avatar.",
                       {"order_id": existing["_id"] if existing else None})
    try:
        prepay_id = services.payments.prepay(order["_id"], order["amount"], product["description"], user["openid"])
    except PaymentGatewayError as error:
        states.transition(services.db, "order", order["_id"], "closed", reason=f"prepay_failed:{error.code}",
                          unset_fields=("open_avatar_id",))
        raise ApiError(502, "payment_unavailable", "WeChat Pay did not answer; nothing was charged. Try again.",
                       {"gateway_code": error.code})
    services.db.orders.update_one({"_id": order["_id"]}, {"$set": {"prepay_id": prepay_id}})
    order["prepay_id"] = prepay_id
    return order


def pay_params(services, order: dict) -> dict | None:
    if order["state"] != "created" or not order.get("prepay_id"):
        return None
    return services.payments.pay_params(order["prepay_id"])


class PaymentMismatch(ValueError):
    def __init__(self, code: str, details: dict):
        super().__init__(code)
        self.code = code
        self.details = details


def apply_payment(services, transaction: dict, source: str) -> dict | None:
    """Apply a SUCCESS transaction (from a verified callback or an order query). Returns the order, or None if unknown."""
    order = services.db.orders.find_one({"_id": transaction.get("out_trade_no")})
    if order is None:
        return None
    expected = {
        "appid": services.settings.wechat_appid,
        "mchid": services.settings.wechatpay_mchid,
        "amount": order["amount"],
        "openid": order["openid"],
    }
    observed = {
        "appid": transaction.get("appid"),
        "mchid": transaction.get("mchid"),
        "amount": (transaction.get("amount") or {}).get("total"),
        "openid": (transaction.get("payer") or {}).get("openid"),
    }
    if observed != expected:
        services.db.payment_alerts.insert_one({"order_id": order["_id"], "kind": "mismatch", "source": source,
                                               "expected": expected, "observed": observed, "at": states.now()})
        raise PaymentMismatch("payment_mismatch", {"expected": expected, "observed": observed})
    if transaction.get("trade_state") != "SUCCESS":
        return order
    paid = states.transition(
        services.db, "order", order["_id"], "paid", by=source,
        set_fields={"transaction_id": transaction.get("transaction_id"), "paid_at": states.now()},
        unset_fields=("open_avatar_id",),
    )
    if paid is None:
        return services.db.orders.find_one({"_id": order["_id"]})
    came_after_close = paid["history"][-2]["to"] == "closed"
    if came_after_close:
        request_refund(services, paid["_id"], reason="paid_after_close")
        return services.db.orders.find_one({"_id": order["_id"]})
    from jobs.training import start_training

    start_training(services, paid)
    return paid


def request_refund(services, order_id: str, reason: str, by: str = "system", expect=("paid",)) -> dict | None:
    """Full refund of an order, exactly once; the refund job does the talking to WeChat Pay."""
    order = services.db.orders.find_one({"_id": order_id})
    if order is None:
        return None
    sequence = len(order.get("refunds", [])) + 1
    refund = {
        "out_refund_no": refund_number(order_id, sequence),
        "amount": order["amount"] - refunded_amount(order),
        "reason": reason,
        "state": "requested",
        "requested_by": by,
        "requested_at": states.now(),
    }
    if refund["amount"] <= 0:
        return None
    moved = states.transition(services.db, "order", order_id, "refunding", expect=set(expect), by=by, reason=reason,
                              push={"refunds": refund}, extra_filter={"refunds": {"$size": sequence - 1}})
    if moved is not None:
        from jobs.refunds import enqueue_refund

        enqueue_refund(services, order_id, refund["out_refund_no"])
    return moved


def refunded_amount(order: dict) -> int:
    return sum(r["amount"] for r in order.get("refunds", []) if r["state"] not in REFUND_FINAL_FAILURES)


def apply_refund_result(services, result: dict, source: str) -> dict | None:
    """Apply a refund's status (from the refund API answer, a verified callback, or a query)."""
    out_refund_no = result.get("out_refund_no")
    order = services.db.orders.find_one({"refunds.out_refund_no": out_refund_no})
    if order is None:
        return None
    status = result.get("status") or result.get("refund_status")
    fields = {"refunds.$.state": status or "PROCESSING", "refunds.$.updated_at": states.now()}
    if result.get("refund_id"):
        fields["refunds.$.refund_id"] = result["refund_id"]
    services.db.orders.update_one(
        {"_id": order["_id"], "refunds": {"$elemMatch": {"out_refund_no": out_refund_no,
                                                          "state": {"$nin": [REFUND_SUCCESS]}}}},
        {"$set": fields},
    )
    if status == REFUND_SUCCESS:
        settled = states.transition(services.db, "order", order["_id"], "refunded", by=source,
                                    set_fields={"refunded_at": states.now()})
        if settled is not None:
            on_refunded(services, settled)
    elif status in REFUND_FINAL_FAILURES:
        states.transition(services.db, "order", order["_id"], "refund_failed", by=source,
                          reason=f"refund_{status.lower()}")
        services.db.payment_alerts.insert_one({"order_id": order["_id"], "kind": f"refund_{status.lower()}",
                                               "source": source, "at": states.now()})
    return services.db.orders.find_one({"_id": order["_id"]})


def on_refunded(services, order: dict) -> None:
    from jobs.notifications import notify
    from miniapp_api.privacy import purge_failed_avatar_photos

    purge_failed_avatar_photos(services, order["avatar_id"])
    notify(services, order["user_id"], "refund_made", {"order_id": order["_id"], "amount": order["amount"]})


def fulfil(services, order_id: str) -> dict | None:
    return states.transition(services.db, "order", order_id, "fulfilled", expect={"paid"}, by="render")


def order_json(order: dict, params: dict | None = None) -> dict:
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
