"""Orders, payments and refunds. The order id is the idempotency key everywhere.

Payment callbacks, the reconciliation job and the refund job all end in the same functions, `apply_payment` and
`apply_refund_result`, whose effects happen only when a compare-and-set on the order (or on one refund entry of it)
wins. That is what holds on a real MongoDB; a per-order Redis lock additionally serialises the money paths of one
order, because in-process mongomock does not make find-and-modify atomic across threads.

Rules decided here:
- An unpaid order expires `order_expire_s` after creation: it is closed at WeChat Pay first, then here, which frees
  the avatar for a new order. If WeChat Pay says it was paid meanwhile, the payment is applied instead.
- Refunds: at most one refund is in flight per order (state `refunding`). A refund that settles SUCCESS ends the
  order `refunded` when everything paid has been refunded, else (a partial refund) returns it to `paid`/`fulfilled`.
  A refund that ends ABNORMAL, CLOSED or `rejected` (refused by WeChat Pay outright) moves the order to
  `refund_failed` and raises a payment alert; a CLOSED one is retried automatically under the next refund number
  (up to `refund_closed_retries` times). ABNORMAL and rejected ones wait for an operator, who requests again with
  expect=("refund_failed",). If WeChat Pay's record later shows a `rejected` refund succeeded after all, the order
  settles from `refund_failed` as it would have from `refunding`.
- Undeliverable: a paid order that was never fulfilled and whose renders failed (after their retries)
  `undeliverable_failed_renders` times is refunded in full.
"""
from __future__ import annotations

import logging
import secrets
import threading
from contextlib import contextmanager
from datetime import timedelta

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError
from redis.exceptions import LockError

from miniapp_api import states
from miniapp_api.errors import ApiError
from miniapp_api.payments import PaymentGatewayError

log = logging.getLogger(__name__)

REFUND_SUCCESS = "SUCCESS"
REFUND_PROCESSING = "PROCESSING"
REFUND_REQUESTED = "requested"
REFUND_REJECTED = "rejected"  # WeChat Pay refused the request itself; no refund exists there
REFUND_PENDING = (REFUND_REQUESTED, REFUND_PROCESSING)
REFUND_FINAL_FAILURES = ("ABNORMAL", "CLOSED", REFUND_REJECTED)
REFUND_STATUSES = (REFUND_PROCESSING, REFUND_SUCCESS, *REFUND_FINAL_FAILURES)
PAID_STATES = ("paid", "fulfilled", "refunding", "refund_failed", "refunded")
# Checked in this order; the first field that differs names the rejection.
MISMATCH_CODES = (("appid", "appid_mismatch"), ("mchid", "mchid_mismatch"), ("amount", "amount_mismatch"),
                  ("openid", "payer_mismatch"))

ORDER_LOCK_TIMEOUT_S = 30
ORDER_LOCK_WAIT_S = 20


class OrderBusy(RuntimeError):
    """Another process holds this order's lock for longer than we wait: try again later (callbacks answer 503)."""


class RefundRefused(ValueError):
    def __init__(self, code: str, details: dict):
        super().__init__(code)
        self.code = code
        self.details = details


class PaymentMismatch(ValueError):
    def __init__(self, code: str, details: dict):
        super().__init__(code)
        self.code = code
        self.details = details


def new_order_id() -> str:
    return "P" + states.now().strftime("%Y%m%d") + secrets.token_hex(6).upper()


def refund_number(order_id: str, sequence: int = 1) -> str:
    """Deterministic: asking WeChat Pay twice for the same refund can never move money twice."""
    return f"R{order_id}-{sequence}"


_held = threading.local()


@contextmanager
def order_lock(services, order_id: str):
    """Per-order Redis lock, re-entrant within a thread (apply_payment may request a refund)."""
    held = getattr(_held, "ids", None)
    if held is None:
        held = _held.ids = set()
    if order_id in held:
        yield
        return
    lock = services.redis.lock(f"order-lock:{order_id}", timeout=ORDER_LOCK_TIMEOUT_S,
                               blocking_timeout=ORDER_LOCK_WAIT_S)
    if not lock.acquire():
        raise OrderBusy(order_id)
    held.add(order_id)
    try:
        yield
    finally:
        held.discard(order_id)
        try:
            lock.release()
        except LockError:  # expired meanwhile; the compare-and-set updates still kept us right
            log.warning("order lock for %s expired before release", order_id)


def alert(services, order_id: str, kind: str, key: str, source: str, details: dict | None = None) -> None:
    """Something operators must look at. One alert per (kind, order, key) however often it is seen again."""
    at = states.now()
    services.db.payment_alerts.update_one(
        {"_id": f"{kind}:{order_id}:{key}"},
        {"$setOnInsert": {"order_id": order_id, "kind": kind, "key": key, "source": source,
                          "details": details or {}, "first_at": at, "resolved": False},
         "$set": {"last_at": at}, "$inc": {"seen": 1}},
        upsert=True,
    )


# ---------------------------------------------------------------------------------------------------- orders


def create_order(services, user: dict, avatar: dict, sku: str) -> dict:
    settings = services.settings
    product = settings.skus.get(sku)
    if product is None:
        raise ApiError(400, "unknown_sku", "No such product.", {"sku": sku, "known": sorted(settings.skus)})
    if avatar["state"] != "ready":
        raise ApiError(409, "avatar_not_ready", "This avatar cannot be paid for now.",
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
        raise ApiError(409, "order_already_open", "There is already an unpaid order for this avatar.",
                       {"order_id": existing["_id"] if existing else None})
    try:
        prepay_id = services.payments.prepay(order["_id"], order["amount"], product["description"], user["openid"])
    except PaymentGatewayError as error:
        # Closed here at once so the user can retry; a timed-out prepay may still have created the order at
        # WeChat Pay, so the reconciliation job closes it there too, after the grace period.
        states.transition(services.db, "order", order["_id"], "closed", by=f"user:{user['_id']}",
                          reason=f"prepay_failed:{error.code}", unset_fields=("open_avatar_id",),
                          set_fields={"gateway_close_pending": True})
        raise ApiError(502, "payment_unavailable", "WeChat Pay did not answer; nothing was charged. Try again.",
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
            return _apply_queried_payment(services, order_id, source=by)
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
            return _apply_queried_payment(services, order_id, source=by)
        if error.code != "order_not_exist":
            return "close_failed"
    services.db.orders.update_one({"_id": order_id}, {"$unset": {"gateway_close_pending": ""}})
    return "closed_at_gateway"


def _apply_queried_payment(services, order_id: str, source: str) -> str:
    try:
        transaction = services.payments.query_order(order_id)
    except PaymentGatewayError:
        return "query_failed"
    if transaction is None:
        return "unknown_at_gateway"
    try:
        apply_payment(services, transaction, source=source)
    except PaymentMismatch as mismatch:
        return mismatch.code
    return "paid"


def pay_params(services, order: dict) -> dict | None:
    if order["state"] != "created" or not order.get("prepay_id"):
        return None
    return services.payments.pay_params(order["prepay_id"])


def apply_payment(services, transaction: dict, source: str) -> dict | None:
    """Apply a transaction (from a verified callback or an order query). Returns the order, or None if unknown.
    Raises PaymentMismatch, changing nothing but an alert, when the transaction is not what the order asked for."""
    order_id = transaction.get("out_trade_no")
    if not isinstance(order_id, str) or services.db.orders.find_one({"_id": order_id}, {"_id": 1}) is None:
        return None
    with order_lock(services, order_id):
        order = services.db.orders.find_one({"_id": order_id})
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
        if transaction.get("trade_state") == "SUCCESS" and observed != expected:
            code = next(code for field, code in MISMATCH_CODES if observed[field] != expected[field])
            details = {"expected": expected, "observed": observed}
            alert(services, order_id, code, key=source, source=source, details=details)
            raise PaymentMismatch(code, details)
        if transaction.get("trade_state") != "SUCCESS":
            return order
        # Only an unpaid order becomes paid: `refunding -> paid` exists for settled partial refunds, and a late copy
        # of the payment must never take an order back there.
        paid = states.transition(
            services.db, "order", order_id, "paid", expect={"created", "closed"}, by=source,
            set_fields={"transaction_id": transaction.get("transaction_id"), "paid_at": states.now()},
            unset_fields=("open_avatar_id",),
        )
        if paid is None:
            return services.db.orders.find_one({"_id": order_id})
        if paid["history"][-2]["to"] == "closed":
            request_refund(services, order_id, reason="paid_after_close", by=source)
            return services.db.orders.find_one({"_id": order_id})
        from jobs.training import start_training

        start_training(services, paid)
        return paid


def fulfil(services, order_id: str) -> dict | None:
    with order_lock(services, order_id):
        return states.transition(services.db, "order", order_id, "fulfilled", expect={"paid"}, by="render")


# ---------------------------------------------------------------------------------------------------- refunds


def committed_refunds(order: dict) -> int:
    """Refunded or on its way: everything but refunds that ended in failure."""
    return sum(r["amount"] for r in order.get("refunds", []) if r["state"] not in REFUND_FINAL_FAILURES)


refunded_amount = committed_refunds  # the skeleton's name


def refundable_amount(order: dict) -> int:
    if order.get("state") not in PAID_STATES:
        return 0
    return max(order["amount"] - committed_refunds(order), 0)


def request_refund(services, order_id: str, reason: str, by: str = "system", expect=("paid",),
                   amount: int | None = None) -> dict | None:
    """Refund `amount` fen of an order (None: all that is still refundable), at most once per call site.

    Returns the order, moved to `refunding`, or None when nothing was started: the order is not in an expected
    state, nothing is left to refund, or a concurrent request won. Raises RefundRefused for an amount that is not
    a positive integer or exceeds what is refundable. The refund job does the talking to WeChat Pay."""
    if amount is not None and (not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0):
        raise RefundRefused("refund_amount_invalid", {"amount": amount})
    expect = set(expect)
    with order_lock(services, order_id):
        order = services.db.orders.find_one({"_id": order_id})
        if order is None or order["state"] not in expect:
            return None
        refundable = refundable_amount(order)
        if amount is not None and amount > refundable:
            raise RefundRefused("refund_exceeds_refundable", {"amount": amount, "refundable": refundable})
        to_refund = refundable if amount is None else amount
        if to_refund <= 0:
            return None
        sequence = len(order.get("refunds", [])) + 1
        at = states.now()
        refund = {
            "out_refund_no": refund_number(order_id, sequence),
            "amount": to_refund,
            "reason": reason,
            "state": REFUND_REQUESTED,
            "requested_by": by,
            "requested_at": at,
            "history": [{"to": REFUND_REQUESTED, "at": at, "by": by, "reason": reason}],
        }
        before = order.get("state_before_refund") if order["state"] == "refund_failed" else order["state"]
        # The $size condition makes the amount check and the append one atomic step even without the lock.
        moved = states.transition(services.db, "order", order_id, "refunding", expect=expect, by=by, reason=reason,
                                  push={"refunds": refund}, extra_filter={"refunds": {"$size": sequence - 1}},
                                  set_fields={"state_before_refund": before})
        if moved is None:
            return None
        from jobs.refunds import enqueue_refund

        enqueue_refund(services, order_id, refund["out_refund_no"])
        return moved


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
            _move_refund(services, order_id, out_refund_no, (*REFUND_PENDING, REFUND_REJECTED), status, by=source,
                         extra={"refund_id": result.get("refund_id"), "succeeded_at": states.now()})
        elif status in REFUND_FINAL_FAILURES:
            _move_refund(services, order_id, out_refund_no, REFUND_PENDING, status, by=source,
                         reason=result.get("error"), extra={"refund_id": result.get("refund_id"),
                                                            "error": result.get("error")})
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
                from jobs.notifications import notify

                notify(services, order["user_id"], "refund_made", {"order_id": order_id, "amount": latest["amount"]})
        return services.db.orders.find_one({"_id": order_id})


def _on_refund_failed(services, order: dict, failed: dict, source: str) -> None:
    status = failed["state"]
    kind = f"refund_{status.lower()}"
    alert(services, order["_id"], kind, key=failed["out_refund_no"], source=source,
          details={"out_refund_no": failed["out_refund_no"], "amount": failed["amount"], "error": failed.get("error")})
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
        alert(services, order["_id"], "refund_retries_exhausted", key=failed["out_refund_no"], source=source,
              details={"closed_refunds": closed})


def on_refunded(services, order: dict) -> None:
    from jobs.notifications import notify
    from miniapp_api.privacy import purge_failed_avatar_photos

    purge_failed_avatar_photos(services, order["avatar_id"])
    notify(services, order["user_id"], "refund_made", {"order_id": order["_id"], "amount": order["amount"]})


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


# ---------------------------------------------------------------------------------------------------- views


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
