"""The express tier's promise: an express order's training starts within the sku's `promised_wait_s` of payment.

The terms (the wait, the margin EXPRESS_PROMISE_MARGIN_S, the price difference to the standard sku) are fixed when
the order is created, the clock starts when it is paid: the same update that marks the order `paid` opens its
promise with its deadline and `breach_at` (deadline + margin). The promise is settled when the avatar's training
starts (kept, or broken when later than `breach_at`), or by the sweep once `breach_at` passes with the training
still waiting (broken). A broken promise is compensated once (states.py `express_promise`):

- the price difference is refunded through the refund machinery under a number derived from the order
  (`refunds.promise_refund_number`), which `request_refund` never adds twice; the promise moves to `compensated`
  only after the refund is recorded, so a crash in between is healed by the sweep asking again (and being told the
  refund exists);
- where money cannot be refunded (iOS virtual payment, a credit: `rails.refund_impossible`), a free redo credit
  for the standard sku instead, keyed by `<order id>-express` so it is given once (makegood.grant_credit);
- an order already refunded in full, or with nothing left to refund, needs nothing more: compensated as covered.

An order with another refund in flight (`refunding`, `refund_failed`) waits: the sweep comes back to it.
"""
from __future__ import annotations

import logging
from datetime import timedelta

from portraits import states
from portraits.billing import makegood, rails, refunds
from portraits.queue import lanes

log = logging.getLogger(__name__)

REASON = "express_promise_broken"
# Order states a partial refund can start from (refunds.request_refund moves them to `refunding` and back).
REFUNDABLE_NOW = ("paid", "fulfilled")


def terms(settings, product: dict) -> dict | None:
    """The promise an order for this product carries (None for a standard sku), as the buyer is told it."""
    if lanes.lane_of(product) != lanes.EXPRESS:
        return None
    standard_sku = product["standard_sku"]
    return {"wait_s": int(product["promised_wait_s"]), "margin_s": int(settings.express_promise_margin_s),
            "difference_fen": int(product["amount"]) - int(settings.skus[standard_sku]["amount"]),
            "standard_sku": standard_sku}


def opened_at_payment(order: dict, paid_at) -> dict:
    """Fields the payment's own update sets: the promise opens with its deadline (nothing for a standard order)."""
    promised = order.get("promise_terms")
    if not promised:
        return {}
    deadline = paid_at + timedelta(seconds=promised["wait_s"])
    return {"promise": {**promised, "state": "open", "paid_at": paid_at, "deadline": deadline,
                        "breach_at": deadline + timedelta(seconds=promised["margin_s"]),
                        "history": states.initial_history("open", "payment")}}


def training_started(services, order_id: str | None, started_at, by: str) -> str:
    """The avatar's training started: the promise is kept or broken now (and a broken one compensated)."""
    order = services.db.orders.find_one({"_id": order_id}, {"promise": 1}) if order_id else None
    promise = (order or {}).get("promise")
    if not promise or promise["state"] != "open":
        return "none"
    waited_s = round((started_at - promise["paid_at"]).total_seconds(), 3)
    if started_at <= promise["breach_at"]:
        states.transition_part(services.db, "express_promise", order_id, "kept", by=by,
                               set_fields={"started_at": started_at, "waited_s": waited_s})
        return "kept"
    states.transition_part(services.db, "express_promise", order_id, "broken", by=by, reason="started_late",
                           set_fields={"started_at": started_at, "waited_s": waited_s})
    return compensate(services, order_id, by)


def sweep(services, limit: int = 500) -> dict[str, int]:
    """Promises past their breach with the training still waiting are broken; broken ones are compensated."""
    done: dict[str, int] = {}
    now = states.now()
    for order in services.db.orders.find({"promise.state": "open", "promise.breach_at": {"$lte": now}},
                                         {"avatar_id": 1, "promise": 1}).limit(limit):
        avatar = services.db.avatars.find_one({"_id": order["avatar_id"], "order_id": order["_id"]},
                                              {"training_started_at": 1})
        started = (avatar or {}).get("training_started_at")
        if started is not None:  # the training started and a crash kept its start from settling the promise
            outcome = training_started(services, order["_id"], started, by="sweeper")
        elif states.transition_part(services.db, "express_promise", order["_id"], "broken", by="sweeper",
                                    reason="still_waiting",
                                    set_fields={"waited_s": round((now - order["promise"]["paid_at"])
                                                                  .total_seconds(), 3)}):
            outcome = compensate(services, order["_id"], by="sweeper")
        else:
            continue
        done[f"promise_{outcome}"] = done.get(f"promise_{outcome}", 0) + 1
    for order in services.db.orders.find({"promise.state": "broken"}, {"_id": 1}).limit(limit):
        outcome = compensate(services, order["_id"], by="sweeper")
        if outcome != "waiting":
            done[f"promise_{outcome}"] = done.get(f"promise_{outcome}", 0) + 1
    return done


def compensate(services, order_id: str, by: str) -> str:
    """Give a broken promise its compensation, once. Returns refunded, made_good, covered or waiting."""
    order = services.db.orders.find_one({"_id": order_id})
    promise = (order or {}).get("promise")
    if not promise or promise["state"] != "broken":
        return "none"
    number = refunds.promise_refund_number(order_id)
    if rails.refund_impossible(order):
        makegood.grant_credit(services, {"_id": f"{order_id}-express", "sku": promise["standard_sku"],
                                         "user_id": order["user_id"], "make_good": {"reason": REASON}})
        return _compensated(services, order_id, by, {"kind": "make_good_credit", "sku": promise["standard_sku"]})
    if any(r["out_refund_no"] == number for r in order.get("refunds", [])):
        return _compensated(services, order_id, by, {"kind": "refund", "out_refund_no": number})
    amount = min(promise["difference_fen"], refunds.refundable_amount(order))
    if order["state"] == "refunded" or amount <= 0:
        return _compensated(services, order_id, by, {"kind": "covered", "order_state": order["state"]})
    if order["state"] not in REFUNDABLE_NOW:
        return "waiting"
    if refunds.request_refund(services, order_id, reason=REASON, by=by, expect=REFUNDABLE_NOW, amount=amount,
                              out_refund_no=number) is None:
        return "waiting"  # moved meanwhile; the sweep asks again, and a refund recorded by then is found above
    return _compensated(services, order_id, by, {"kind": "refund", "out_refund_no": number, "amount": amount})


def _compensated(services, order_id: str, by: str, compensation: dict) -> str:
    moved = states.transition_part(services.db, "express_promise", order_id, "compensated", by=by,
                                   reason=compensation["kind"], set_fields={"compensation": compensation})
    if moved is not None:
        log.info("express promise of %s compensated: %s", order_id, compensation)
    return {"refund": "refunded", "make_good_credit": "made_good"}.get(compensation["kind"], compensation["kind"])
