"""Reconciliation with WeChat Pay and virtual payment (each order asks its own rail): what callbacks and pushes missed, found by asking, and applied through the very functions a
callback uses (payments.apply_payment, refunds.apply_refund_result). Periodic; every step is idempotent.

- Unpaid orders past their expiry are closed at WeChat Pay, then here (orders.expire_order).
- Orders still `created` past the grace period are queried: a SUCCESS is applied as a payment.
- Orders closed here after a failed prepay are closed at WeChat Pay too (a timed-out prepay may have created it).
- Refunds still `requested`/PROCESSING past the grace period are queried: a final status is applied; one WeChat Pay
  has never seen (its job lost, or out of retries) is submitted again under the same number.
- Orders in `refunding`/`refund_failed` are settled against their refund entries (heals a crash between steps).
- Orders made good whose free redo credit a crash kept back get it (makegood.heal_credits).
"""
from __future__ import annotations

import logging
from collections import Counter
from datetime import timedelta

from portraits import states
from portraits.billing import makegood, orders, payments, rails, refunds
from portraits.billing.locks import order_lock
from portraits.gateways.wechatpay import PaymentGatewayError

log = logging.getLogger(__name__)

BATCH = 500
SOURCE = "reconcile"


def expire_unpaid_orders(services, now=None) -> dict:
    now = now or states.now()
    outcomes = Counter()
    for order in services.db.orders.find({"state": "created", "expires_at": {"$lte": now}}, {"_id": 1}).limit(BATCH):
        outcomes[orders.expire_order(services, order["_id"], by="job:expire_orders")] += 1
    return dict(outcomes)


def reconcile_with_gateway(services, now=None) -> dict:
    now = now or states.now()
    cutoff = now - timedelta(seconds=services.settings.reconcile_grace_s)
    outcomes = Counter()
    collection = services.db.orders
    for order in collection.find({"state": "created", "created_at": {"$lte": cutoff}}).limit(BATCH):
        outcomes["payment:" + _reconcile_payment(services, order)] += 1
    for order in collection.find({"state": "closed", "gateway_close_pending": True,
                                  "updated_at": {"$lte": cutoff}}, {"_id": 1}).limit(BATCH):
        outcomes["close:" + orders.close_at_gateway(services, order["_id"], by=SOURCE)] += 1
    pending = {"$elemMatch": {"state": {"$in": list(refunds.REFUND_PENDING)}, "requested_at": {"$lte": cutoff}}}
    for order in collection.find({"refunds": pending}).limit(BATCH):
        for refund in order["refunds"]:
            if refund["state"] in refunds.REFUND_PENDING and refund["requested_at"] <= cutoff:
                outcomes["refund:" + _reconcile_refund(services, order["_id"], refund["out_refund_no"])] += 1
    for order in collection.find({"state": {"$in": ["refunding", "refund_failed"]}}, {"_id": 1}).limit(BATCH):
        refunds.settle_refunds(services, order["_id"], SOURCE)
    healed = makegood.heal_credits(services, BATCH)
    if healed:
        outcomes["make_good:credit_granted"] += healed
    return dict(outcomes)


def _reconcile_payment(services, order: dict) -> str:
    try:
        transaction = rails.gateway_for(services, order).query_order(order["_id"])
    except PaymentGatewayError as error:
        log.warning("query of %s failed, retried next run: %s", order["_id"], error)
        return "query_failed"
    if transaction is None:
        return "unknown_at_gateway"  # prepay never reached WeChat Pay; expiry closes it here
    trade_state = transaction.get("trade_state")
    if trade_state == "SUCCESS":
        try:
            payments.apply_payment(services, transaction, source=SOURCE)
        except payments.PaymentMismatch as mismatch:
            return mismatch.code
        return "paid"
    if trade_state == "CLOSED":
        with order_lock(services, order["_id"]):
            states.transition(services.db, "order", order["_id"], "closed", expect={"created"}, by=SOURCE,
                              reason="closed_at_gateway", unset_fields=("open_avatar_id",))
        return "closed"
    return trade_state.lower() if isinstance(trade_state, str) else "unknown"


def _reconcile_refund(services, order_id: str, out_refund_no: str) -> str:
    try:
        result = rails.gateway_of(services, order_id).query_refund(out_refund_no)
    except PaymentGatewayError as error:
        if error.code != "resource_not_exists":
            return "query_failed"
        try:
            return "resubmitted:" + refunds.submit(services, order_id, out_refund_no).lower()
        except PaymentGatewayError:
            return "resubmit_failed"
    refunds.apply_refund_result(services, {**result, "out_refund_no": out_refund_no}, source=SOURCE)
    return str(result.get("status", "unknown")).lower()
