"""Refunds: requested here, submitted to WeChat Pay by a job, settled from whatever reports their status.

The refund number is fixed when the refund is requested, so every retry of the refund job (and the reconciliation
job, which picks up refunds whose job was lost) asks for the same refund: WeChat Pay answers a repeated number with
the refund it has. Asking WeChat Pay is retried with backoff while it is unreachable or answers 5xx.

This module imports neither payments, orders, avatars nor privacy: they all call it.
"""
from __future__ import annotations

import logging

from rq import Retry

from portraits import keys, metrics, notifications, photos, states, tasks
from portraits.billing import alerts, makegood, rails
from portraits.billing.locks import order_lock
from portraits.gateways.wechatpay import PaymentGatewayError

log = logging.getLogger(__name__)

REFUND_SUCCESS = "SUCCESS"
REFUND_PROCESSING = "PROCESSING"
REFUND_REQUESTED = "requested"
REFUND_REJECTED = "rejected"  # WeChat Pay refused the request itself; no refund exists there
REFUND_PENDING = (REFUND_REQUESTED, REFUND_PROCESSING)
REFUND_FINAL_FAILURES = ("ABNORMAL", "CLOSED", REFUND_REJECTED)
REFUND_STATUSES = (REFUND_PROCESSING, REFUND_SUCCESS, *REFUND_FINAL_FAILURES)
# The order states in which money was taken (and so may be refunded).
PAID_STATES = ("paid", "fulfilled", "refunding", "refund_failed", "refunded", "made_good")


class RefundRefused(ValueError):
    def __init__(self, code: str, details: dict):
        super().__init__(code)
        self.code = code
        self.details = details


def refund_number(order_id: str, sequence: int = 1) -> str:
    """Deterministic: asking WeChat Pay twice for the same refund can never move money twice."""
    return f"R{order_id}-{sequence}"


def promise_refund_number(order_id: str) -> str:
    """The one refund of an express order's broken promise (portraits.billing.promises): never two."""
    return f"R{order_id}-express"


def batch_refund_number(order_id: str, batch_id: str) -> str:
    """The one refund of what a pack's batch could not deliver (portraits.renders, packs): never two."""
    return f"R{order_id}-{batch_id}"


def album_refund_number(order_id: str, album_id: str) -> str:
    """The one refund an album owes when it ends undelivered (expired, declined, withdrawn: portraits.albums)."""
    return f"R{order_id}-{album_id}"


def committed_refunds(order: dict) -> int:
    """Refunded or on its way: everything but refunds that ended in failure."""
    return sum(r["amount"] for r in order.get("refunds", []) if r["state"] not in REFUND_FINAL_FAILURES)




def refundable_amount(order: dict) -> int:
    if order.get("state") not in PAID_STATES:
        return 0
    return max(order["amount"] - committed_refunds(order), 0)


def has_refund(order: dict, out_refund_no: str) -> bool:
    return any(r["out_refund_no"] == out_refund_no for r in order.get("refunds", []))


def request_refund(services, order_id: str, reason: str, by: str = "system", expect=("paid",),
                   amount: int | None = None, out_refund_no: str | None = None,
                   unless_field: str | None = None) -> dict | None:
    """Refund `amount` fen of an order (None: all that is still refundable), at most once per call site.

    Returns the order, moved to `refunding`, or None when nothing was started: the order is not in an expected
    state, nothing is left to refund, or a concurrent request won. Raises RefundRefused for an amount that is not
    a positive integer or exceeds what is refundable. The refund job does the talking to WeChat Pay.

    An order whose money cannot be refunded (rails.refund_impossible: iOS virtual payment, a credit) is made good
    instead while still `paid` (the order, moved to `made_good`, is returned); later, RefundRefused
    `refund_impossible`.

    out_refund_no: a number derived from what the refund is for (`promise_refund_number`, `batch_refund_number`),
    so that refund exists at most once on the order, and at WeChat Pay, however often and from wherever it is asked
    for (None when it already does).

    unless_field: a field of the order whose presence means this refund is no longer owed (another refund covers
    it: `album_withdrawn_at`); checked in the same write that records the refund (None when it is set)."""
    if amount is not None and (not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0):
        raise RefundRefused("refund_amount_invalid", {"amount": amount})
    expect = set(expect)
    with order_lock(services, order_id):
        order = services.db.orders.find_one({"_id": order_id})
        if order is None or order["state"] not in expect:
            return None
        if rails.refund_impossible(order):
            if order["state"] != "paid":
                raise RefundRefused("refund_impossible", {"rail": rails.rail_of(order), "platform": order.get("platform")})
            return makegood.make_good(services, order_id, reason, by)
        refundable = refundable_amount(order)
        if amount is not None and amount > refundable:
            raise RefundRefused("refund_exceeds_refundable", {"amount": amount, "refundable": refundable})
        to_refund = refundable if amount is None else amount
        if to_refund <= 0:
            return None
        if out_refund_no is not None and has_refund(order, out_refund_no):
            return None
        sequence = len(order.get("refunds", [])) + 1
        at = states.now()
        refund = {
            "out_refund_no": out_refund_no or refund_number(order_id, sequence),
            "amount": to_refund,
            "reason": reason,
            "state": REFUND_REQUESTED,
            "requested_by": by,
            "requested_at": at,
            "history": [{"to": REFUND_REQUESTED, "at": at, "by": by, "reason": reason}],
        }
        before = order.get("state_before_refund") if order["state"] == "refund_failed" else order["state"]
        # The $size condition makes the amount check and the append one atomic step even without the lock.
        condition = {"refunds": {"$size": sequence - 1}}
        if unless_field is not None:
            condition[unless_field] = {"$exists": False}
        moved = states.transition(services.db, "order", order_id, "refunding", expect=expect, by=by, reason=reason,
                                  push={"refunds": refund}, extra_filter=condition,
                                  set_fields={"state_before_refund": before})
        if moved is None:
            return None
        enqueue_refund(services, order_id, refund["out_refund_no"])
        return moved


def enqueue_refund(services, order_id: str, out_refund_no: str) -> None:
    backoff = list(services.settings.refund_backoff_s)
    tasks.enqueue(services, tasks.DEFAULT, tasks.SUBMIT_REFUND, order_id, out_refund_no,
                  job_id=keys.refund_job_id(out_refund_no),
                  retry=Retry(max=len(backoff), interval=backoff) if backoff else None)


def submit(services, order_id: str, out_refund_no: str) -> str:
    """Ask WeChat Pay for one requested refund and apply its answer. Raises PaymentGatewayError when the answer
    should be waited for (retryable), leaving the refund `requested`."""
    order = services.db.orders.find_one({"_id": order_id})
    refund = next((r for r in (order or {}).get("refunds", []) if r["out_refund_no"] == out_refund_no), None)
    if refund is None:
        return "gone"
    if refund["state"] not in REFUND_PENDING:
        return refund["state"]
    gateway = rails.gateway_for(services, order)
    try:
        result = gateway.refund(order_id, out_refund_no, refund["amount"], order["amount"], refund["reason"])
    except PaymentGatewayError as error:
        if error.retryable:
            services.db.orders.update_one({"_id": order_id, "refunds.out_refund_no": out_refund_no},
                                          {"$set": {"refunds.$.last_error": error.code}})
            raise
        # Refused outright, but an unreadable answer may hide an accepted refund: believe only WeChat Pay's record.
        try:
            result = gateway.query_refund(out_refund_no)
        except PaymentGatewayError as query_error:
            if query_error.code != "resource_not_exists":
                raise
            result = {"status": REFUND_REJECTED, "error": error.code}
    apply_refund_result(services, {**result, "out_refund_no": out_refund_no}, source=f"refund-api:{out_refund_no}")
    return str(result.get("status", "unknown"))


def apply_refund_result(services, result: dict, source: str) -> dict | None:
    """Apply a refund's status (from the refund API answer, a verified callback, or a query)."""
    out_refund_no = result.get("out_refund_no")
    if not isinstance(out_refund_no, str):
        return None
    order = services.db.orders.find_one({"refunds.out_refund_no": out_refund_no}, {"_id": 1})
    if order is None:
        return None
    order_id = order["_id"]
    status = result.get("status") or result.get("refund_status")
    with order_lock(services, order_id):
        if status == REFUND_PROCESSING:
            _move_refund(services, order_id, out_refund_no, (REFUND_REQUESTED,), status, by=source,
                         extra={"refund_id": result.get("refund_id")})
        elif status == REFUND_SUCCESS:
            # `rejected` is only our reading of an error answer; WeChat Pay's SUCCESS overrides it.
            if _move_refund(services, order_id, out_refund_no, (*REFUND_PENDING, REFUND_REJECTED), status,
                            by=source, extra={"refund_id": result.get("refund_id"), "succeeded_at": states.now()}):
                metrics.REFUNDS_FINISHED.labels(state=status).inc()
        elif status in REFUND_FINAL_FAILURES:
            if _move_refund(services, order_id, out_refund_no, REFUND_PENDING, status, by=source,
                            reason=result.get("error"), extra={"refund_id": result.get("refund_id"),
                                                               "error": result.get("error")}):
                metrics.REFUNDS_FINISHED.labels(state=status).inc()
        else:
            log.warning("refund %s: unknown status %r from %s", out_refund_no, status, source)
        return settle_refunds(services, order_id, source)


def _move_refund(services, order_id: str, out_refund_no: str, from_states, to: str, by: str,
                 reason: str | None = None, extra: dict | None = None) -> bool:
    """Compare-and-set on one refund entry, with its own history entry. True when this call made the change.
    Refund entries are only ever appended, so an entry's index is stable and addresses it exactly."""
    order = services.db.orders.find_one({"_id": order_id}, {"refunds.out_refund_no": 1})
    numbers = [r["out_refund_no"] for r in (order or {}).get("refunds", [])]
    if out_refund_no not in numbers:
        return False
    path = f"refunds.{numbers.index(out_refund_no)}"
    at = states.now()
    fields = {f"{path}.state": to, f"{path}.updated_at": at}
    fields.update({f"{path}.{key}": value for key, value in (extra or {}).items() if value is not None})
    result = services.db.orders.update_one(
        {"_id": order_id, f"{path}.out_refund_no": out_refund_no, f"{path}.state": {"$in": list(from_states)}},
        {"$set": fields, "$push": {f"{path}.history": {"to": to, "at": at, "by": by, "reason": reason}}},
    )
    return result.modified_count == 1


def settle_refunds(services, order_id: str, source: str) -> dict | None:
    """Bring the order's state in line with its refund entries. Idempotent: the callback, the refund job and the
    reconciliation job all call it, and a crash between a refund entry's update and this step heals on the next."""
    with order_lock(services, order_id):
        order = services.db.orders.find_one({"_id": order_id})
        if order is None or order["state"] not in ("refunding", "refund_failed"):
            return order
        refunds = order.get("refunds", [])
        if not refunds or any(r["state"] in REFUND_PENDING for r in refunds):
            return order
        succeeded = sum(r["amount"] for r in refunds if r["state"] == REFUND_SUCCESS)
        latest = refunds[-1]
        if succeeded >= order["amount"]:
            settled = states.transition(services.db, "order", order_id, "refunded", by=source,
                                        reason=f"refund_success:{latest['out_refund_no']}",
                                        set_fields={"refunded_at": states.now()})
            if settled is not None:
                on_refunded(services, settled)
        elif latest["state"] in REFUND_FINAL_FAILURES:
            _on_refund_failed(services, order, latest, source)
        else:
            has_done_render = services.db.renders.find_one({"order_id": order_id, "state": "done"}, {"_id": 1})
            target = "fulfilled" if order.get("state_before_refund") == "fulfilled" or has_done_render else "paid"
            back = states.transition(services.db, "order", order_id, target, expect={order["state"]}, by=source,
                                     reason=f"partial_refund:{latest['out_refund_no']}")
            if back is not None:
                notifications.notify(services, order["user_id"], "refund_made", latest["out_refund_no"],
                                     {"order_id": order_id, "amount": latest["amount"]})
        return services.db.orders.find_one({"_id": order_id})


def _on_refund_failed(services, order: dict, failed: dict, source: str) -> None:
    status = failed["state"]
    kind = f"refund_{status.lower()}"
    alerts.alert(services, order["_id"], kind, key=failed["out_refund_no"], source=source,
                 details={"out_refund_no": failed["out_refund_no"], "amount": failed["amount"],
                          "error": failed.get("error")})
    if order["state"] == "refunding":
        states.transition(services.db, "order", order["_id"], "refund_failed", expect={"refunding"}, by=source,
                          reason=f"{kind}:{failed['out_refund_no']}")
    closed = sum(1 for r in order.get("refunds", []) if r["state"] == "CLOSED")
    # WeChat Pay lets a closed refund be asked for again under a new number; ABNORMAL and rejected wait for people.
    if status == "CLOSED" and closed <= services.settings.refund_closed_retries:
        current = services.db.orders.find_one({"_id": order["_id"]})
        amount = min(failed["amount"], refundable_amount(current))
        if amount > 0:
            request_refund(services, order["_id"], reason=f"retry_after_closed:{failed['out_refund_no']}",
                           by=source, expect=("refund_failed",), amount=amount)
    elif status == "CLOSED":
        alerts.alert(services, order["_id"], "refund_retries_exhausted", key=failed["out_refund_no"], source=source,
                     details={"closed_refunds": closed})


def on_refunded(services, order: dict) -> None:
    photos.purge_failed_avatar_photos(services, order["avatar_id"])
    notifications.notify(services, order["user_id"], "refund_made", notifications.refund_message_about(order),
                         {"order_id": order["_id"], "amount": order["amount"]})


def refund_if_undeliverable(services, order_id: str, by: str) -> dict | None:
    """A paid order never fulfilled whose renders failed `undeliverable_failed_renders` times is refunded in full."""
    limit = services.settings.undeliverable_failed_renders
    with order_lock(services, order_id):
        order = services.db.orders.find_one({"_id": order_id}, {"state": 1})
        if order is None or order["state"] != "paid" or limit <= 0:
            return None
        if services.db.renders.count_documents({"order_id": order_id, "state": "failed"}) < limit:
            return None
        return request_refund(services, order_id, reason="undeliverable", by=by, expect=("paid",))
