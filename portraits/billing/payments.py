"""Applying a payment to its order: from a verified callback or push, the reconciliation job, or an expiry that
found the order paid (on any rail: portraits.billing.rails). Only an exact match of what the order asked for is applied; a paid order starts its avatar's training and its
free preview (portraits.previews), or, for an album's order, opens the album's invitation (portraits.albums)."""
from __future__ import annotations

from portraits import albums, avatars, previews, states
from portraits.billing import alerts, promises, rails, refunds
from portraits.billing.locks import order_lock
from portraits.gateways.wechatpay import PaymentGatewayError

# Checked in this order; the first field that differs names the rejection.
MISMATCH_CODES = (("rail", "rail_mismatch"), ("appid", "appid_mismatch"), ("mchid", "mchid_mismatch"),
                  ("env", "env_mismatch"), ("amount", "amount_mismatch"), ("openid", "payer_mismatch"),
                  ("product_id", "product_mismatch"))


class PaymentMismatch(ValueError):
    def __init__(self, code: str, details: dict):
        super().__init__(code)
        self.code = code
        self.details = details


def apply_payment(services, transaction: dict, source: str) -> dict | None:
    """Apply a transaction (from a verified callback or an order query). Returns the order, or None if unknown.
    Raises PaymentMismatch, changing nothing but an alert, when the transaction is not what the order asked for."""
    order_id = transaction.get("out_trade_no")
    if not isinstance(order_id, str) or services.db.orders.find_one({"_id": order_id}, {"_id": 1}) is None:
        return None
    with order_lock(services, order_id):
        order = services.db.orders.find_one({"_id": order_id})
        expected = expected_payment(services.settings, order, transaction)
        observed = {
            "rail": transaction.get("rail", rails.JSAPI),
            "appid": transaction.get("appid"),
            "mchid": transaction.get("mchid"),
            "env": transaction.get("env"),
            "amount": (transaction.get("amount") or {}).get("total"),
            "openid": (transaction.get("payer") or {}).get("openid"),
            "product_id": transaction.get("product_id"),
        }
        observed = {field: observed[field] for field in expected}
        if transaction.get("trade_state") == "SUCCESS" and observed != expected:
            code = next(code for field, code in MISMATCH_CODES if observed.get(field) != expected.get(field))
            details = {"expected": expected, "observed": observed}
            alerts.alert(services, order_id, code, key=source, source=source, details=details)
            raise PaymentMismatch(code, details)
        if transaction.get("trade_state") != "SUCCESS":
            return order
        # Only an unpaid order becomes paid: `refunding -> paid` exists for settled partial refunds, and a late copy
        # of the payment must never take an order back there.
        paid_at = states.now()
        paid = states.transition(
            services.db, "order", order_id, "paid", expect={"created", "closed"}, by=source,
            set_fields={"transaction_id": transaction.get("transaction_id"), "paid_at": paid_at,
                        **promises.opened_at_payment(order, paid_at)},
            unset_fields=("open_avatar_id",),
        )
        if paid is None:
            return services.db.orders.find_one({"_id": order_id})
        if paid["history"][-2]["to"] == "closed":
            refunds.request_refund(services, order_id, reason="paid_after_close", by=source)
            return services.db.orders.find_one({"_id": order_id})
        if paid.get("album_id"):
            # An album's avatars are trained already: its payment opens the invitation (portraits.albums).
            if albums.open_invitation(services, paid, by=source) is None:
                refunds.request_refund(services, order_id, reason="album_unavailable", by=source)
                return services.db.orders.find_one({"_id": order_id})
            return paid
        if not avatars.start_training(services, paid, before_enqueue=previews.requester(services, by=source)):
            # Whatever changed since the order was made (consent outdated, another order paid first), a payment
            # that cannot be trained is never kept.
            refunds.request_refund(services, order_id, reason="avatar_unavailable", by=source)
            return services.db.orders.find_one({"_id": order_id})
        return paid


def expected_payment(settings, order: dict, transaction: dict) -> dict:
    """What a transaction paying this order must say, by the order's rail. A virtual-payment query answer names
    neither payer nor product (the push does): those are checked when the transaction carries them."""
    rail = rails.rail_of(order)
    if rail == rails.JSAPI:
        return {"rail": rail, "appid": settings.wechat_appid, "mchid": settings.wechatpay_mchid,
                "amount": order["amount"], "openid": order["openid"]}
    if rail == rails.XPAY:
        expected = {"rail": rail, "env": order.get("xpay_env"), "amount": order["amount"], "openid": order["openid"],
                    "product_id": order.get("xpay_product_id")}
        if "payer" not in transaction:
            del expected["openid"]
        if "product_id" not in transaction:
            del expected["product_id"]
        return expected
    return {"rail": rail, "amount": order["amount"]}


def apply_queried_payment(services, order_id: str, source: str) -> str:
    """WeChat Pay says the order is paid (closing it failed with `orderpaid`): apply the payment its record shows.
    Returns what happened (a stable word)."""
    try:
        transaction = rails.gateway_of(services, order_id).query_order(order_id)
    except PaymentGatewayError:
        return "query_failed"
    if transaction is None:
        return "unknown_at_gateway"
    try:
        apply_payment(services, transaction, source=source)
    except PaymentMismatch as mismatch:
        return mismatch.code
    return "paid"
