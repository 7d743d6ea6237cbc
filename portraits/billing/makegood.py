"""Make-good: what a paid order that failed gets where its money cannot be sent back.

On iOS the developer cannot refund a virtual payment (Apple decides refunds), and an order paid with a credit has
no money to refund. Where `refunds.request_refund` would refund such an order still `paid` (its training failed,
its renders failed for good, its avatar could not train, it was paid after it closed, its owner erased their
data), the order moves to `made_good` and its owner gets one free redo credit for the same product, exactly once
per order: the compare-and-set `paid -> made_good` decides, and the credit is keyed by the order id (granting it
again changes nothing, which is how reconciliation heals a crash between the two steps). The credit pays a new
order (`POST /api/v1/orders` with `use_credit`), whose avatar trains and renders like a bought one. What the user
is told before paying is the setting XPAY_IOS_MAKE_GOOD (`ios_make_good` in the order and product answers).

This module imports no other billing module: refunds and orders call it.
"""
from __future__ import annotations


from portraits import photos, states

MAKE_GOOD_CODE = "free_redo_credit"


def has_credit(user: dict, sku: str) -> bool:
    return any(c["sku"] == sku and c.get("used_by") is None for c in user.get("make_good_credits", []))


def unused_credits(user: dict) -> list[dict]:
    return [{"order_id": c["order_id"], "sku": c["sku"], "reason": c.get("reason")}
            for c in user.get("make_good_credits", []) if c.get("used_by") is None]


def make_good(services, order_id: str, reason: str, by: str) -> dict | None:
    """Make a paid order good with a free redo credit (the caller holds the order lock). The order, moved to
    `made_good`, or None when it was not `paid` any more."""
    made = states.transition(services.db, "order", order_id, "made_good", expect={"paid"}, by=by, reason=reason,
                             set_fields={"made_good_at": states.now(),
                                         "make_good": {"kind": MAKE_GOOD_CODE, "reason": reason}})
    if made is None:
        return None
    _give_credit(services, made)
    photos.purge_failed_avatar_photos(services, made["avatar_id"])
    return services.db.orders.find_one({"_id": order_id})


def _give_credit(services, order: dict) -> bool:
    given = grant_credit(services, order)
    services.db.orders.update_one({"_id": order["_id"]}, {"$set": {"credit_granted": True}})
    return given


def grant_credit(services, order: dict) -> bool:
    """The order's free redo credit, given once however often this is called. True when this call gave it."""
    credit = {"order_id": order["_id"], "sku": order["sku"], "reason": (order.get("make_good") or {}).get("reason"),
              "granted_at": states.now(), "used_by": None}
    result = services.db.users.update_one({"_id": order["user_id"], "make_good_credits.order_id": {"$ne": order["_id"]}},
                                          {"$push": {"make_good_credits": credit}})
    return result.modified_count == 1


def claim_credit(services, user_id: str, sku: str, order_id: str) -> bool:
    """Spend one unused credit for `sku` on `order_id`; False when none is left."""
    # update_one, not find_one_and_update: SecantusDB refuses the positional `$` in findAndModify (README)
    claimed = services.db.users.update_one(
        {"_id": user_id, "make_good_credits": {"$elemMatch": {"sku": sku, "used_by": None}}},
        {"$set": {"make_good_credits.$.used_by": order_id}})
    return claimed.modified_count == 1


def heal_credits(services, limit: int) -> int:
    """Orders made good whose credit a crash kept from being given: give it now."""
    healed = 0
    for order in services.db.orders.find({"state": "made_good", "credit_granted": {"$ne": True}}).limit(limit):
        healed += _give_credit(services, order)
    return healed
