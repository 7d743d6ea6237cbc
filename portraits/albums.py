"""Couple and family albums: the rules of a product drawn from several people's own avatars.

A user with a trained avatar (and current face consent) buys an album sku (`album: {people}`, portraits.products):
the album is written with its order, `awaiting_payment`. Once the order is paid (portraits.billing.payments) the
album is `inviting`: each of its people - 1 seats has its own unguessable token, carried by the scene of the
mini-program code on the inviter's share card. An invitee opens the code and accepts a seat with their own trained
avatar and their own current consent (under-14s cannot give one: portraits.consents); a seat is taken by one
compare-and-set, so of two people accepting one seat exactly one gets it, and nobody holds two seats. Once every
seat is taken the album is `accepted` and its batches are written: the order's render plan, drawn as a pack's is
(portraits.packs: slots, batches, ids derived from the order, the redraw and refund rules per batch), over the
catalog's album templates for that many people. Each batch render document carries `album_id` and
`album_avatar_ids` (every member's avatar, in member order, the inviter's first; the render's own `avatar_id` is the
inviter's), and each image it stores carries `album_id`: members see and download those images, nobody else.

Money, exactly once: an invitation not accepted within ALBUM_INVITE_TTL_S expires, a declined seat declines the
album, and either refunds the whole price; a withdrawal refunds the share of the slots not delivered yet (each
slot's share as in packs.slots_amount). The refund's number is derived from the album
(refunds.album_refund_number); one that has to wait (the order is busy with another refund) is asked for again by
the sweep.

Privacy: any member can withdraw; so does a member's consent withdrawal or erasure (portraits.privacy). A withdrawn
album's joint images (documents, sealed blobs, share codes, content checks) are deleted for everyone; its queued
batches end without drawing (renders.begin_render), a batch finishing after the withdrawal deletes what it drew
(renders.complete_render checks again after its images are written), and the sweep deletes any image of a withdrawn
album still left.
"""
from __future__ import annotations

import logging
import secrets
from collections import Counter
from datetime import timedelta

from pymongo import ReturnDocument

from portraits import consents, content_checks, keys, packs, products, renders, states, tasks
from portraits.billing import orders, refunds
from portraits.billing.locks import OrderBusy
from portraits.errors import Conflict, Gone, Invalid, NotFound

log = logging.getLogger(__name__)

INVITER = "inviter"
INVITEE = "invitee"
OPEN, TAKEN, DECLINED = "open", "taken", "declined"
LIVE = ("awaiting_payment", "inviting", "accepted")
ENDED_UNDELIVERED = ("declined", "expired", "withdrawn")
ORDER_WITHDRAWN_FIELD = "album_withdrawn_at"  # on the order, before the withdrawal's refund: no batch refunds after
# An order in one of these states owes the album nothing more: made good (a credit for the whole sku), refunded in
# full, or its refund refused at WeChat Pay (listed for people by the order itself).
ORDER_ALREADY_SETTLED = {"made_good": "made_good", "refunded": "order_refunded",
                         "refund_failed": "order_refund_failed"}
SCENE_PREFIX = "a="  # the scene of an invite card's mini-program code: a=<seat token>
# The sweep's marks of work finished, so that it reads the album no more: a withdrawn album with nothing of its
# drawing left (mark_cleaned); an accepted album whose order is past `paid`, where no order ever comes back to it
# (fulfilled, or ended refunded or made good: portraits.states).
CLEANED_FIELD = "cleaned_at"
FULFILMENT_SETTLED_FIELD = "fulfilment_settled_at"
ORDER_BEYOND_PAID = ("fulfilled", "refunded", "made_good")


def new_album_id() -> str:
    return "al_" + secrets.token_hex(10)


def new_seat_token() -> str:
    return secrets.token_urlsafe(16)  # 22 characters: with SCENE_PREFIX within WeChat's 32 for a scene


def scene(token: str) -> str:
    return SCENE_PREFIX + token


# ----------------------------------------------------------------------------------------------- buying


def create_album(services, user: dict, avatar: dict, sku: str, nickname: str | None = None,
                 platform: str | None = None, use_credit: bool = False) -> tuple[dict, dict]:
    """An album sku bought by `user` with their trained `avatar`: the album and its order (paid as any order, or
    with a free redo credit for the sku: use_credit)."""
    settings = services.settings
    if sku not in settings.skus:
        raise Invalid("unknown_sku", "No such product.", {"sku": sku, "known": sorted(settings.skus)})
    people = products.album_people(settings, sku)
    if people is None:
        raise Invalid("not_an_album_sku", "This product is not an album.",
                      {"sku": sku, "albums": sorted(s for s in settings.skus if products.album_people(settings, s))})
    consents.require_face_consent(settings, user)
    require_trained(avatar)
    if not services.catalog.album_templates(people):
        raise Conflict("album_templates_missing", "The catalog has no template for an album of this size yet.",
                       {"people": people})
    album_id, order_id = new_album_id(), orders.new_order_id()
    at = states.now()
    album = {
        "_id": album_id, "order_id": order_id, "sku": sku, "people": people, "user_id": user["_id"], "member_ids": [user["_id"]],
        "members": [_member(user["_id"], avatar, INVITER, nickname, at)],
        "seats": [{"index": index, "token": new_seat_token(), "state": OPEN} for index in range(people - 1)],
        "state": "awaiting_payment", "created_at": at, "updated_at": at,
        "history": states.initial_history("awaiting_payment", f"user:{user['_id']}"),
    }
    services.db.albums.insert_one(album)
    try:
        order = orders.create_album_order(services, user, avatar, sku, album_id, order_id, platform=platform,
                                          use_credit=use_credit)
    except Exception:
        # No order: no album. An order written whose prepay failed is closed: so is its album.
        if services.db.orders.count_documents({"album_id": album_id}, limit=1):
            states.transition(services.db, "album", album_id, "closed", expect={"awaiting_payment"},
                              by=f"user:{user['_id']}", reason="order_not_placed")
        else:
            services.db.albums.delete_one({"_id": album_id})
        raise
    return services.db.albums.find_one({"_id": album_id}), order


def _member(user_id: str, avatar: dict, role: str, nickname: str | None, at) -> dict:
    return {"user_id": user_id, "avatar_id": avatar["_id"], "role": role, "nickname": nickname,
            "gender": avatar.get("gender"), "joined_at": at}


def require_trained(avatar: dict) -> None:
    if avatar["state"] != "trained":
        raise Conflict("avatar_not_trained", "An album is drawn from trained avatars: wait for yours to finish.",
                       {"state": avatar["state"]})


def open_invitation(services, order: dict, by: str) -> dict | None:
    """The album's order is paid: its seats can be accepted until ALBUM_INVITE_TTL_S from now. None when the album
    can no longer be opened (withdrawn or closed meanwhile): the caller refunds the payment."""
    at = states.now()
    return states.transition(services.db, "album", order["album_id"], "inviting", expect={"awaiting_payment"},
                             by=by, set_fields={"paid_at": at, "invite_expires_at": at + timedelta(
                                 seconds=services.settings.album_invite_ttl_s)})


# -------------------------------------------------------------------------------------------- invitations


def invitation(services, token: str) -> tuple[dict, dict]:
    """The album and seat of an invite token, while it can be answered: 404 invite_not_found, 410 invite_expired or
    invite_closed, 409 invite_not_open (its order is not paid yet)."""
    album, seat = _seat_of(services, token)
    _require_open(album, seat)
    return album, seat


def invitation_for(services, token: str, user_id: str) -> tuple[dict, dict, bool]:
    """The album and seat of an invite token as `user_id` opens its card, and whether they are in the album. A member
    (the seat's holder, the inviter, another invitee) is shown it as it stands, whatever its state, to open the album
    from; anyone else only while it can be answered, as `invitation`."""
    album, seat = _seat_of(services, token)
    joined = user_id in album["member_ids"]
    if not joined:
        _require_open(album, seat)
    return album, seat, joined


def _seat_of(services, token: str) -> tuple[dict, dict]:
    album = services.db.albums.find_one({"seats.token": token}) if isinstance(token, str) and token else None
    if album is None:
        raise NotFound("invite_not_found", "No such invitation.")
    return album, next(s for s in album["seats"] if s["token"] == token)


def _require_open(album: dict, seat: dict) -> None:
    if album["state"] == "expired" or (album["state"] == "inviting" and album["invite_expires_at"] <= states.now()):
        raise Gone("invite_expired", "This invitation has expired.", {"album_id": album["_id"]})
    if album["state"] == "awaiting_payment":
        raise Conflict("invite_not_open", "This invitation opens once the album is paid for.")
    if album["state"] != "inviting" or seat["state"] == DECLINED:
        raise Gone("invite_closed", "This invitation is closed.", {"state": album["state"]})


def accept(services, user: dict, token: str, avatar: dict, nickname: str | None = None) -> dict:
    """Take the token's seat with the user's own trained avatar; the last seat taken accepts the album and writes
    its batches. Returns the album; 410 invite_expired or 409 album_not_live when it ended as the seat was taken."""
    album, seat = invitation(services, token)
    consents.require_face_consent(services.settings, user)
    _require_not_member(album, seat, user)
    require_trained(avatar)
    if take_seat(services, album, seat, user, avatar, nickname) is None:  # something else moved first: say what
        album, seat = invitation(services, token)
        _require_not_member(album, seat, user)
        raise Conflict("invite_busy", "The invitation changed meanwhile; open it again.")
    accept_if_full(services, album["_id"], by=f"user:{user['_id']}")
    joined = services.db.albums.find_one({"_id": album["_id"]})
    # The seat was taken, but the album ended before it could be accepted (expired with another seat still open,
    # withdrawn by a member): say so rather than answer the ended album as a success.
    if joined["state"] == "expired":
        raise Gone("invite_expired", "This invitation has expired.", {"album_id": album["_id"]})
    if joined["state"] not in ("inviting", "accepted"):
        raise Conflict("album_not_live", "This album has ended already.", {"state": joined["state"]})
    return joined


def take_seat(services, album: dict, seat: dict, user: dict, avatar: dict, nickname: str | None) -> dict | None:
    """The seat taken by one compare-and-set (open, the album inviting and in time, the user not in it yet): the
    album after, or None when something else moved first."""
    at = states.now()
    index = seat["index"]
    return services.db.albums.find_one_and_update(
        {"_id": album["_id"], "state": "inviting", "invite_expires_at": {"$gt": at}, "member_ids": {"$ne": user["_id"]},
         f"seats.{index}.token": seat["token"], f"seats.{index}.state": OPEN},
        {"$set": {f"seats.{index}.state": TAKEN, f"seats.{index}.user_id": user["_id"], f"seats.{index}.taken_at": at,
                  "updated_at": at},
         "$push": {"members": _member(user["_id"], avatar, INVITEE, nickname, at), "member_ids": user["_id"]}},
        return_document=ReturnDocument.AFTER)


def accept_if_full(services, album_id: str, by: str) -> bool:
    """Once no seat is open the album is accepted and its batches are written (the last accept; the sweep, when a
    process died between taking the last seat and this)."""
    accepted = states.transition(services.db, "album", album_id, "accepted", expect={"inviting"}, by=by,
                                 set_fields={"accepted_at": states.now()},
                                 extra_filter={"seats.state": {"$ne": OPEN}})
    if accepted is None:
        return False
    write_batches(services, album_id)
    return True


def _require_not_member(album: dict, seat: dict, user: dict) -> None:
    if user["_id"] in album["member_ids"]:
        raise Conflict("already_member", "You are already in this album.", {"album_id": album["_id"]})
    if seat["state"] == TAKEN:
        raise Conflict("seat_taken", "Someone else accepted this invitation first.")


def decline(services, user: dict, token: str) -> dict:
    """An invitee says no: the album is declined for everyone and its price refunded."""
    album, seat = invitation(services, token)
    if user["_id"] in album["member_ids"]:
        raise Conflict("already_member", "You are in this album: withdraw from it instead.",
                       {"album_id": album["_id"]})
    if seat["state"] == TAKEN:
        raise Conflict("seat_taken", "Someone else accepted this invitation first.")
    at = states.now()
    declined = states.transition(
        services.db, "album", album["_id"], "declined", expect={"inviting"}, by=f"user:{user['_id']}",
        set_fields={f"seats.{seat['index']}.state": DECLINED, f"seats.{seat['index']}.declined_at": at,
                    "ended_at": at},
        extra_filter={f"seats.{seat['index']}.state": OPEN})
    if declined is None:
        invitation(services, token)
        raise Conflict("invite_busy", "The invitation changed meanwhile; open it again.")
    settle_refund(services, declined)
    return services.db.albums.find_one({"_id": album["_id"]})


def expire(services, album_id: str) -> bool:
    at = states.now()
    expired = states.transition(services.db, "album", album_id, "expired", expect={"inviting"}, by="sweeper",
                                reason="invite_ttl", set_fields={"ended_at": at},
                                extra_filter={"invite_expires_at": {"$lte": at}, "seats.state": OPEN})
    if expired is None:
        return False
    settle_refund(services, expired)
    return True


# ------------------------------------------------------------------------------------------------ batches


def batch_fields(album: dict) -> dict:
    """What marks a pack batch as an album's (the drawing reads these): the album and every member's avatar, the
    inviter's first."""
    return {"album_id": album["_id"], "album_avatar_ids": [member["avatar_id"] for member in album["members"]]}


def member_avatars(services, album: dict) -> list[dict] | None:
    """Every member's avatar, in member order, while all are trained; None once one is not."""
    found = {a["_id"]: a for a in services.db.avatars.find(
        {"_id": {"$in": [m["avatar_id"] for m in album["members"]]}})}
    avatars = [found.get(member["avatar_id"]) for member in album["members"]]
    return avatars if all(a is not None and a["state"] == "trained" for a in avatars) else None


def templates_for(services, people: int, images: int) -> list[str]:
    """The template of each slot: the album templates for that many people, in turn."""
    ids = sorted(t.id for t in services.catalog.album_templates(people))
    if not ids:
        raise ValueError(f"the catalog has no album template for {people} people")
    return packs.in_turn(ids, images)


def write_batches(services, album_id: str) -> int:
    """An accepted album owes its batches: each written once (ids derived from the order, as packs.batch_id does)
    and queued. Safe to run again at any time (the last accept, the sweep); returns how many this call wrote."""
    album = services.db.albums.find_one({"_id": album_id})
    if album is None or album["state"] != "accepted" or album.get("batches_written_at"):
        return 0
    order = services.db.orders.find_one({"_id": album["order_id"]})
    if order is None or order["state"] not in ("paid", "fulfilled"):
        return 0
    avatars = member_avatars(services, album)
    if avatars is None:  # a member's avatar is gone since they joined: nothing joint can be drawn
        withdraw(services, album_id, by="system", reason="avatar_unavailable")
        return 0
    plan = order["render_plan"]
    services.db.orders.update_one({"_id": order["_id"], "pack_templates": {"$exists": False}},
                                  {"$set": {"pack_templates": templates_for(services, album["people"],
                                                                            plan["images"])}})
    templates = services.db.orders.find_one({"_id": order["_id"]}, {"pack_templates": 1})["pack_templates"]
    written = 0
    for index, slots in enumerate(packs.batches(plan)):
        pack = {**packs.batch_fields(index, slots, [templates[slot] for slot in slots]), **batch_fields(album)}
        if renders._insert_batch(services, avatars[0], order["_id"], packs.batch_id(order["_id"], index),
                                 by=f"album:{album_id}", pack=pack):
            written += 1
    at = states.now()
    services.db.orders.update_one({"_id": order["_id"], "pack_started_at": {"$exists": False}},
                                  {"$set": {"pack_started_at": at}})
    services.db.albums.update_one({"_id": album_id, "batches_written_at": {"$exists": False}},
                                  {"$set": {"batches_written_at": at}})
    if withdrawn(services, album_id):  # withdrawn while they were written: none of them is drawn
        end_queued_batches(services, album_id)
    return written


def withdrawn(services, album_id: str | None) -> bool:
    if not album_id:
        return False
    album = services.db.albums.find_one({"_id": album_id}, {"state": 1})
    return album is None or album["state"] == "withdrawn"


def redraw_fields(services, render: dict) -> dict | None:
    """The album fields a redraw of this batch carries, while it can be redrawn: the album accepted and every
    member's avatar still trained (None otherwise: the slots are refunded instead)."""
    album = services.db.albums.find_one({"_id": render["album_id"]})
    if album is None or album["state"] != "accepted" or member_avatars(services, album) is None:
        return None
    return batch_fields(album)


def end_queued_batches(services, album_id: str) -> int:
    """A withdrawn album's batches still queued fail without drawing (settled: the withdrawal refunds them)."""
    ended = 0
    for render in services.db.renders.find({"album_id": album_id, "state": "queued"}, {"_id": 1}):
        if states.transition(services.db, "render", render["_id"], "failed", expect={"queued"}, by="album",
                             reason="album_withdrawn", set_fields={"settled_at": states.now()}) is not None:
            ended += 1
    return ended


def discard_if_withdrawn(services, render: dict) -> bool:
    """A batch just drawn (its images written): if its album was withdrawn meanwhile, what it drew is deleted.
    Checked after the images are written, so a withdrawal either sees them or is seen here."""
    if not withdrawn(services, render.get("album_id")):
        return False
    delete_joint_images(services, render["album_id"])
    services.db.renders.update_one({"_id": render["_id"]},
                                   {"$set": {"settled_at": states.now()}, "$unset": {"image_checks_owed": ""}})
    return True


# --------------------------------------------------------------------------------------------- withdrawal


def withdraw(services, album_id: str, by: str, reason: str) -> dict | None:
    """End a live album for every member: the joint images deleted, queued batches ended, the undelivered share
    refunded (an unpaid order closed). Returns the withdrawn album, or None when it was not live."""
    album = services.db.albums.find_one({"_id": album_id})
    if album is None or album["state"] not in LIVE:
        return None
    at = states.now()
    moved = states.transition(services.db, "album", album_id, "withdrawn", expect=set(LIVE), by=by, reason=reason,
                              set_fields={"withdrawn_at": at, "withdrawn_by": by, "ended_at": at,
                                          "delivered_slots": delivered_slots(services, album_id)})
    if moved is None:
        return None
    if album.get("order_id"):  # before the refund reads the order: a batch's refund of its slots is refused now
        services.db.orders.update_one({"_id": album["order_id"], ORDER_WITHDRAWN_FIELD: {"$exists": False}},
                                      {"$set": {ORDER_WITHDRAWN_FIELD: at}})
    end_queued_batches(services, album_id)
    delete_joint_images(services, album_id)
    if album["state"] == "awaiting_payment" and album.get("order_id"):
        try:  # a payment landing later is refunded (payments: the album no longer opens; settle_refund waits)
            orders.close_unpaid(services, album["order_id"], by=by, reason=f"album_withdrawn:{reason}")
        except OrderBusy:
            log.info("album %s: its unpaid order is busy; it expires unpaid as any order", album_id)
    settle_refund(services, moved)
    return services.db.albums.find_one({"_id": album_id})


def withdraw_albums_of(services, user_id: str, reason: str) -> int:
    """A member's consent withdrawal or erasure ends every live album they are in."""
    return sum(1 for album in services.db.albums.find({"member_ids": user_id, "state": {"$in": list(LIVE)}},
                                                      {"_id": 1})
               if withdraw(services, album["_id"], by=f"user:{user_id}", reason=reason) is not None)


def delivered_slots(services, album_id: str) -> list[int]:
    """The slots whose image passed the content check (what the members have had)."""
    return sorted({i["pack_slot"] for i in services.db.images.find(
        {"album_id": album_id, "pack_slot": {"$exists": True}, **content_checks.DELIVERED_IMAGE},
        {"pack_slot": 1})})


def delete_joint_images(services, album_id: str) -> int:
    """Every image of the album, for everyone: its queued jobs first (share codes, content checks: none is taken up
    once the image is gone), then its document, its sealed file, its share code, its content check."""
    images = list(services.db.images.find({"album_id": album_id}, {"user_id": 1}))
    if images:
        image_ids = {image["_id"] for image in images}
        check_ids = set(services.db.content_checks.distinct(
            "_id", {"kind": "image", "subject_id": {"$in": list(image_ids)}}))
        tasks.delete_jobs_of(services, image_ids | check_ids)
    for image in images:
        services.blobs.delete(keys.image(image["user_id"], image["_id"]))
        services.blobs.delete(keys.share_code(image["user_id"], image["_id"]))
    ids = [image["_id"] for image in images]
    services.db.content_checks.delete_many({"kind": "image", "subject_id": {"$in": ids}})
    services.db.images.delete_many({"_id": {"$in": ids}})
    return len(ids)


def settle_refund(services, album: dict) -> str:
    """What an album that ended undelivered owes back, once (the refund's number is the album's): the whole price
    when nothing was drawn, the share of the undelivered slots after a withdrawal. Returns a stable word;
    'refund_owed' (the order is busy with another refund) and 'order_open' (the order can still be paid: not closed
    yet, or closed here but not yet at WeChat Pay) leave it for the sweep."""
    if album.get("refund_settled_at") or album["state"] not in ENDED_UNDELIVERED:
        return "already_settled"
    order = services.db.orders.find_one({"_id": album.get("order_id")}) if album.get("order_id") else None
    if order is not None and (order["state"] == "created"
                              or (order["state"] == "closed" and order.get("gateway_close_pending"))):
        return "order_open"
    outcome = "nothing_paid"
    if order is not None and order["state"] in refunds.PAID_STATES:
        outcome = _refund_undelivered(services, album, order)
    if outcome == "refund_owed":
        return outcome
    services.db.albums.update_one({"_id": album["_id"], "refund_settled_at": {"$exists": False}},
                                  {"$set": {"refund_settled_at": states.now(), "refund_outcome": outcome}})
    return outcome


def _refund_undelivered(services, album: dict, order: dict) -> str:
    number = refunds.album_refund_number(order["_id"], album["_id"])
    if refunds.has_refund(order, number):
        return "refunded"
    if order["state"] in ORDER_ALREADY_SETTLED:
        return ORDER_ALREADY_SETTLED[order["state"]]
    delivered = packs.slots_amount(order["amount"], order["render_plan"]["images"], album.get("delivered_slots", []))
    amount = refunds.refundable_amount(order) - delivered
    if amount <= 0:
        return "nothing_owed"
    try:
        moved = refunds.request_refund(services, order["_id"], reason=f"album_{album['state']}",
                                       by=f"album:{album['_id']}", expect=("paid", "fulfilled"), amount=amount,
                                       out_refund_no=number)
    except refunds.RefundRefused as refused:
        if refused.code == "refund_exceeds_refundable":
            return "refund_owed"  # another refund landed since the order was read: recomputed by the sweep
        log.warning("album %s: its refund cannot be made: %s", album["_id"], refused.code)
        services.db.albums.update_one({"_id": album["_id"]}, {"$set": {"refund_refused_code": refused.code}})
        return "refund_refused"  # needs people (sweeper.needs_people)
    except OrderBusy:
        return "refund_owed"  # the sweep asks again
    if moved is not None and moved["state"] == "made_good":
        return "made_good"
    if moved is None and not refunds.has_refund(services.db.orders.find_one({"_id": order["_id"]}) or {}, number):
        return "refund_owed"
    return "refunded"


# -------------------------------------------------------------------------------------------- who sees what


def member(album: dict, user_id: str) -> dict | None:
    return next((m for m in album["members"] if m["user_id"] == user_id), None)


def of_member(services, album_id: str, user_id: str) -> dict:
    """An album the user is (or was) a member of; anyone else's answers 404 album_not_found."""
    album = services.db.albums.find_one({"_id": album_id, "member_ids": user_id})
    if album is None:
        raise NotFound("album_not_found", "No such album.")
    return album


def accepted_ids_of(services, user_id: str) -> list[str]:
    """The accepted albums the user is in: their joint images (stored under the inviter) are the user's too."""
    return [a["_id"] for a in services.db.albums.find({"member_ids": user_id, "state": "accepted"}, {"_id": 1})]


def can_view_image(services, image: dict, user_id: str) -> bool:
    """A joint image is every member's while the album lives."""
    if image.get("user_id") == user_id:
        return True
    if not image.get("album_id"):
        return False
    return services.db.albums.count_documents({"_id": image["album_id"], "member_ids": user_id,
                                               "state": "accepted"}, limit=1) == 1


def progress(services, album: dict) -> dict | None:
    """The album's drawing, as a pack's (packs.progress), once its order is paid."""
    order = services.db.orders.find_one({"_id": album.get("order_id")}) if album.get("order_id") else None
    if order is None:
        return None
    return packs.progress(services, order)


def image_count(services, album_id: str) -> int:
    return services.db.images.count_documents({"album_id": album_id})


# ------------------------------------------------------------------------------------------------- sweep


def sweep(services, older_than) -> Counter:
    """What albums owe, healed through the functions above (each idempotent): an album whose order closed unpaid
    closes; one whose order is paid opens its invitation (a process died between the two); an invitation whose
    every seat is taken is accepted (a process died between the last seat and the acceptance), one past its time
    with a seat still open expires; an accepted album without its batches gets them; a refund owed is asked for again; a withdrawn
    album's images (a batch that finished after the withdrawal) go, and a delivered album's order is fulfilled. A
    withdrawn album with nothing left to end or delete, and an accepted one whose order is past paid, are marked
    (CLEANED_FIELD, FULFILMENT_SETTLED_FIELD) and not read again."""
    done = Counter()
    for album in services.db.albums.find({"state": "awaiting_payment", "order_id": {"$exists": True},
                                          "updated_at": {"$lt": older_than}}):
        order = services.db.orders.find_one({"_id": album["order_id"]}) or {"state": "closed"}
        if order["state"] == "paid" and not order.get("refunds"):
            done["album_opened"] += bool(open_invitation(services, order, by="sweeper"))
        elif order["state"] != "created":
            done["album_closed"] += bool(states.transition(services.db, "album", album["_id"], "closed",
                                                           expect={"awaiting_payment"}, by="sweeper",
                                                           reason=f"order_{order['state']}"))
    for album in services.db.albums.find({"state": "inviting", "seats.state": {"$ne": OPEN}}, {"_id": 1}):
        done["album_accepted"] += accept_if_full(services, album["_id"], by="sweeper")
    for album in services.db.albums.find({"state": "inviting", "invite_expires_at": {"$lte": states.now()}}):
        done["album_expired"] += expire(services, album["_id"])
    for album in services.db.albums.find({"state": "accepted", "batches_written_at": {"$exists": False},
                                          "updated_at": {"$lt": older_than}}):
        done["album_batches_written"] += bool(write_batches(services, album["_id"]))
    for album in services.db.albums.find({"state": {"$in": list(ENDED_UNDELIVERED)},
                                          "refund_settled_at": {"$exists": False}}):
        done[f"album_refund_{settle_refund(services, album)}"] += 1
    to_clean = withdrawn_to_clean(services)
    withdrawn_ids = [album["_id"] for album in to_clean]
    for album_id in services.db.images.distinct("album_id", {"album_id": {"$in": withdrawn_ids}}):
        done["album_images_deleted"] += delete_joint_images(services, album_id)
    for album_id in withdrawn_ids:
        done["album_batches_ended"] += end_queued_batches(services, album_id)
    for album in to_clean:
        # An album without its end time (a legacy or hand-edited document) ended long ago, as far as the sweep knows.
        if album.get("ended_at") is None or album["ended_at"] < older_than:
            done["album_cleaned"] += mark_cleaned(services, album["_id"])
    for album in accepted_owing_fulfilment(services):
        order = services.db.orders.find_one({"_id": album["order_id"]}, {"state": 1})
        state = order["state"] if order is not None else None
        if state == "paid" and _drawn_delivered(services, album["_id"]) and orders.fulfil(services, order["_id"]):
            done["order_fulfilled"] += 1
            state = "fulfilled"
        if state is None or state in ORDER_BEYOND_PAID:
            services.db.albums.update_one({"_id": album["_id"], FULFILMENT_SETTLED_FIELD: {"$exists": False}},
                                          {"$set": {FULFILMENT_SETTLED_FIELD: states.now()}})
    return done


def withdrawn_to_clean(services) -> list[dict]:
    """The withdrawn albums whose drawing may still leave a batch to end or an image to delete (not cleaned yet)."""
    return list(services.db.albums.find({"state": "withdrawn", CLEANED_FIELD: {"$exists": False}},
                                        {"_id": 1, "ended_at": 1}))


def mark_cleaned(services, album_id: str) -> bool:
    """A withdrawn album none of whose batches is queued or being drawn, and with no image left, is cleaned: the
    sweep reads it no more. Batches first: a batch writes its images while it is being drawn, so the images of one
    that ended before the first count are seen by the second. Called past the sweep's grace after the withdrawal, so
    no live process is still writing a batch of it (albums.write_batches ends what it wrote once it sees the
    withdrawal; renders.begin_render ends a batch of a withdrawn album)."""
    if services.db.renders.count_documents({"album_id": album_id, "state": {"$in": ["queued", "rendering"]}},
                                           limit=1):
        return False
    if services.db.images.count_documents({"album_id": album_id}, limit=1):
        return False
    return services.db.albums.update_one({"_id": album_id, "state": "withdrawn", CLEANED_FIELD: {"$exists": False}},
                                         {"$set": {CLEANED_FIELD: states.now()}}).modified_count == 1


def accepted_owing_fulfilment(services) -> list[dict]:
    """The accepted albums whose order may still be fulfilled by the sweep (not marked settled yet)."""
    return list(services.db.albums.find({"state": "accepted", FULFILMENT_SETTLED_FIELD: {"$exists": False}},
                                        {"order_id": 1}))


def _drawn_delivered(services, album_id: str) -> bool:
    return any(renders.render_delivered(r) for r in services.db.renders.find(
        {"album_id": album_id, "state": "done"}, {"state": 1, "content_checked": 1, "delivered_image_ids": 1}))
