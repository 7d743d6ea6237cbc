"""The state machine of every entity, in one place.

A transition is one atomic compare-and-set in MongoDB: the update only matches while the document is in a state
the machine allows to move to the target. Whoever loses a race gets None back and does nothing, which is what
makes callbacks, retries and failure handling exactly-once.
"""
from __future__ import annotations

from datetime import datetime, timezone

from pymongo import ReturnDocument

MACHINES: dict[str, dict[str, set[str]]] = {
    "avatar": {
        "collecting": {"ready"},
        "ready": {"collecting", "queued"},
        "queued": {"training", "failed"},
        "training": {"trained", "failed", "queued"},
        "trained": set(),
        "failed": set(),
    },
    "order": {
        "created": {"paid", "closed"},
        # A payment can land after we closed the order (the user paid at the last second): it is taken, then refunded.
        "closed": {"paid"},
        # made_good: money we cannot refund (iOS virtual payment, a free redo) is made good with a free redo credit.
        "paid": {"fulfilled", "refunding", "made_good"},
        "fulfilled": {"refunding"},
        # A partial refund that settles returns the order to where it was; a full one ends it `refunded`.
        "refunding": {"refunded", "refund_failed", "paid", "fulfilled"},
        # A refund read as refused can still turn out to have succeeded: partial, the order goes back where it was.
        "refund_failed": {"refunding", "refunded", "paid", "fulfilled"},
        "refunded": set(),
        "made_good": set(),
    },
    "render": {
        "queued": {"rendering", "failed"},
        "rendering": {"done", "failed", "queued"},
        "done": set(),
        "failed": set(),
    },
    # One photo of an avatar (an element of the avatar's `photos`, moved by portraits.avatars, not by transition()):
    # `judging` from the upload until the intake worker's verdict; an accepted photo can still be refused later
    # (another photo shows it is someone else, WeChat's content check refuses it). Photos recorded before judging
    # left the request have no `state`: their `accepted` says which of the two they are (avatars.photo_state).
    "photo": {
        "judging": {"accepted", "refused"},
        "accepted": {"refused"},
        "refused": set(),
    },
    # One medium (a photo's crop, a portrait) checked by WeChat's mediaCheckAsync (portraits.content_checks): queued
    # until the quota allows a call, `submitting` while the call is made (back to queued when WeChat refuses it for
    # quota or cannot be reached), `submitted` until the verdict is pushed (back to queued when the verdict is an
    # error, e.g. WeChat could not fetch the medium), then decided; `timeout` when no verdict came in time.
    "content_check": {
        "queued": {"submitting", "timeout"},
        "submitting": {"queued", "submitted"},
        "submitted": {"pass", "risky", "review", "timeout", "queued"},
        "pass": set(),
        "risky": set(),
        "review": set(),
        "timeout": set(),
    },
    # An express order's promised wait (portraits.billing.promises), the order's `promise` field: open from payment
    # until its training starts; kept when it started by the deadline plus the margin, broken when it started later
    # or is still waiting past that; a broken promise is compensated once (the price difference refunded, or made
    # good where money cannot be refunded).
    "express_promise": {
        "open": {"kept", "broken"},
        "broken": {"compensated"},
        "kept": set(),
        "compensated": set(),
    },
    # The free preview of a paid avatar (portraits.previews): drawn on the GPU's preview queue, `checking` while
    # WeChat's content check judges it, `shown` once passed; `superseded` once the trained portraits are delivered
    # (from any state: a preview that comes too late is not drawn or not shown); `failed` is just absent (the draw
    # failed, the check refused it, or the sweep gave up after PREVIEW_TIMEOUT_S). Nothing paid depends on it.
    "preview": {
        "queued": {"rendering", "failed", "superseded"},
        "rendering": {"checking", "queued", "failed", "superseded"},
        "checking": {"shown", "failed", "superseded"},
        "shown": {"superseded"},
        "failed": set(),
        "superseded": set(),
    },
    # A couple or family album (portraits.albums): written with its order, `inviting` once the order is paid (its
    # seats' share codes can be accepted), `accepted` once every seat is taken (its batches are written and drawn).
    # Ends declined (an invitee declined a seat: refunded), expired (not accepted within ALBUM_INVITE_TTL_S:
    # refunded), closed (its order closed unpaid) or withdrawn (by any member, or by a member's consent withdrawal or
    # erasure: the joint images deleted for everyone, what was not delivered refunded).
    "album": {
        "awaiting_payment": {"inviting", "closed", "withdrawn"},
        "inviting": {"accepted", "declined", "expired", "withdrawn"},
        "accepted": {"withdrawn"},
        "declined": set(),
        "expired": set(),
        "withdrawn": set(),
        "closed": set(),
    },
}

# A pack's progress (portraits.packs.progress), read from its order and its batches (renders), never stored: training
# (its avatar is not trained yet, so no batch exists), rendering (some batch is not settled), done (every batch
# delivered, redrawn or refunded), refunded (the order was refunded before any batch was written).
PACK_PHASES = ("training", "rendering", "done", "refunded")

COLLECTIONS = {"avatar": "avatars", "order": "orders", "render": "renders", "content_check": "content_checks",
               "preview": "previews", "album": "albums"}
# Machines whose state lives in a field of another entity's document: machine -> (collection, field).
PARTS = {"express_promise": ("orders", "promise")}


class IllegalTransition(ValueError):
    pass


def now() -> datetime:
    return datetime.now(timezone.utc)


def sources(entity: str, target: str) -> set[str]:
    machine = MACHINES[entity]
    if target not in machine:
        raise IllegalTransition(f"{entity} has no state {target!r}")
    return {state for state, targets in machine.items() if target in targets}


def transition(db, entity: str, doc_id: str, target: str, *, expect: set[str] | None = None, by: str = "system",
               reason: str | None = None, set_fields: dict | None = None, unset_fields: tuple = (),
               extra_filter: dict | None = None, push: dict | None = None, inc: dict | None = None):
    """Move one document to `target`; return the updated document, or None when it is not in an allowed state."""
    allowed = sources(entity, target)
    if expect is not None:
        unknown = expect - set(MACHINES[entity])
        if unknown:
            raise IllegalTransition(f"{entity} has no state {sorted(unknown)}")
        allowed &= expect
    if not allowed:
        raise IllegalTransition(f"{entity} cannot reach {target!r} from {sorted(expect or [])}")
    at = now()
    query = {"_id": doc_id, "state": {"$in": sorted(allowed)}}
    query.update(extra_filter or {})
    update = {
        "$set": {"state": target, "updated_at": at, **(set_fields or {})},
        "$push": {"history": {"to": target, "at": at, "by": by, "reason": reason}, **(push or {})},
    }
    if inc:
        update["$inc"] = inc
    if unset_fields:
        update["$unset"] = {name: "" for name in unset_fields}
    return db[COLLECTIONS[entity]].find_one_and_update(query, update, return_document=ReturnDocument.AFTER)


def transition_part(db, machine: str, doc_id: str, target: str, *, by: str = "system", reason: str | None = None,
                    set_fields: dict | None = None):
    """transition() for a machine kept in a field of a document (PARTS): the compare-and-set is on `field.state`,
    the history is the field's own. Returns the whole document, or None when the field is not in an allowed state."""
    allowed = sources(machine, target)
    collection, field = PARTS[machine]
    at = now()
    update = {
        "$set": {f"{field}.state": target, f"{field}.updated_at": at,
                 **{f"{field}.{name}": value for name, value in (set_fields or {}).items()}},
        "$push": {f"{field}.history": {"to": target, "at": at, "by": by, "reason": reason}},
    }
    return db[collection].find_one_and_update({"_id": doc_id, f"{field}.state": {"$in": sorted(allowed)}}, update,
                                              return_document=ReturnDocument.AFTER)


def initial_history(state: str, by: str) -> list[dict]:
    return [{"to": state, "at": now(), "by": by, "reason": None}]
