"""Subscribe messages through WeChat. Sending never blocks or fails the GPU job: it is a job of its own.

One-time grants are counted per user and template (POST /api/v1/subscriptions) and one is consumed per message.
WeChat refusing (43101: no grant left on its side) zeroes our count; a transient error gives the grant back and the
job is retried with backoff.

Each message is owed once: `messages` holds one document per (kind, what it is about), so a replayed step (a
retried job, the sweep after a crash) never sends it twice. Its states:

    owed -> sending -> sent | no_grant | refused        (sending -> owed again when WeChat is down: retried)
    sending -> interrupted                               (the sender died mid-send: never sent again, see below)
    owed -> expired                                      (still unsent after MISSING_MESSAGE_WINDOW: no longer news)

A message whose job Redis lost is queued again by the sweep, and one a crash kept from being owed at all (between
the state change and `notify`) is owed by the sweep from the state itself (`owe_missing`). A sender that died
between taking the grant and recording the answer may or may not have reached WeChat; such a message is marked
`interrupted` and not sent again: a user may miss one message, but is never sent one twice.
"""
from __future__ import annotations

import logging
from datetime import timedelta
from typing import NamedTuple

from pymongo.errors import DuplicateKeyError

from portraits import keys, states, tasks
from portraits.gateways.wechat import SubscribeRefused, WeChatUnavailable

MESSAGES = {
    "training_started": ("pages/avatar/index", "数字分身开始训练"),
    "avatar_ready": ("pages/avatar/index", "数字分身已生成"),
    "portraits_ready": ("pages/render/index", "写真已生成"),
    "refund_made": ("pages/order/index", "退款已原路退回"),
}
# Where an album's portraits are seen by the members who did not pay for it (the render is the payer's).
ALBUM_PAGE = "pages/album/index"
# Past this age a message missing for a state change is no longer news: the sweep does not owe it any more.
MISSING_MESSAGE_WINDOW = timedelta(days=1)

log = logging.getLogger(__name__)
RETRY_BACKOFF_S = [10, 60, 300]


class Owed(NamedTuple):
    """One message a state change owes: to whom, of what kind, about what (its id's part), its fields, and the page
    it opens when not its kind's own (MESSAGES)."""
    user_id: str
    kind: str
    about: str
    data: dict
    page: str | None = None


def notify(services, user_id: str, kind: str, about: str, data: dict, page: str | None = None) -> None:
    """Owe the `kind` message about `about` (an avatar, render or refund id) once and queue its sending; never
    raises, so a GPU job is not failed by the messaging side."""
    if not services.settings.subscribe_templates.get(kind):
        return
    message_id = keys.message_id(kind, about)
    try:
        services.db.messages.insert_one({"_id": message_id, "user_id": user_id, "kind": kind, "data": data,
                                         "state": "owed", "created_at": states.now(),
                                         **({"page": page} if page else {})})
    except DuplicateKeyError:
        return  # already owed, or sent: a replay sends nothing twice
    except Exception:
        log.exception("could not owe the %s message %s", kind, message_id)
        return
    _enqueue(services, message_id)


def _enqueue(services, message_id: str) -> None:
    try:
        tasks.enqueue_message(services, message_id, RETRY_BACKOFF_S)
    except Exception:
        log.exception("could not queue the message %s; the sweep will", message_id)


def send_message(services, message_id: str) -> str:
    message = services.db.messages.find_one_and_update(
        {"_id": message_id, "state": "owed"}, {"$set": {"state": "sending", "sending_at": states.now()}})
    if message is None:
        return "not_owed"  # sent, being sent by another job, or erased with its user
    try:
        outcome = _send(services, message)
    except WeChatUnavailable:
        services.db.messages.update_one({"_id": message_id, "state": "sending"}, {"$set": {"state": "owed"}})
        raise
    services.db.messages.update_one({"_id": message_id}, {"$set": {"state": outcome, "sent_at": states.now()}})
    return outcome


def _send(services, message: dict) -> str:
    kind, user_id = message["kind"], message["user_id"]
    template_id = services.settings.subscribe_templates[kind]
    # Consume one one-time grant first; a grant is only ever used once even if sending is retried after a crash.
    user = services.db.users.find_one_and_update(
        {"_id": user_id, f"subscriptions.{template_id}": {"$gt": 0}},
        {"$inc": {f"subscriptions.{template_id}": -1}},
    )
    if user is None:
        return "no_grant"
    page, title = MESSAGES[kind]
    page = message.get("page", page)
    fields = {"thing1": {"value": title}, **{f"character_string{i + 2}": {"value": str(v)[:32]}
                                             for i, v in enumerate(message["data"].values())}}
    try:
        services.wechat.send_subscribe_message(user["openid"], template_id, fields, page)
    except SubscribeRefused:
        services.db.users.update_one({"_id": user_id}, {"$set": {f"subscriptions.{template_id}": 0}})
        return "refused"
    except WeChatUnavailable:
        services.db.users.update_one({"_id": user_id}, {"$inc": {f"subscriptions.{template_id}": 1}})
        raise
    return "sent"


def heal(services, older_than) -> dict[str, int]:
    """The sweep's part: owed messages whose job Redis lost are queued again, senders that died are recorded as
    interrupted, and messages a crash kept from being owed are owed now."""
    done = {"message_requeued": 0, "message_interrupted": 0, "message_owed": owe_missing(services)}
    stale = services.db.messages.update_many(
        {"state": "owed", "created_at": {"$lt": states.now() - MISSING_MESSAGE_WINDOW}}, {"$set": {"state": "expired"}})
    done["message_expired"] = stale.modified_count
    owed = list(services.db.messages.find({"state": "owed", "created_at": {"$lt": older_than}}, {"_id": 1}))
    statuses = tasks.job_statuses(services, [keys.message_job_id(m["_id"]) for m in owed])
    for message, status in zip(owed, statuses):
        if status not in ("queued", "started", "scheduled", "deferred"):
            _enqueue(services, message["_id"])
            done["message_requeued"] += 1
    interrupted = services.db.messages.update_many({"state": "sending", "sending_at": {"$lt": older_than}},
                                                   {"$set": {"state": "interrupted"}})
    done["message_interrupted"] = interrupted.modified_count
    return done


# A finished render whose portraits are delivered: one passed the content check (renders from before the checks
# delivered all theirs; portraits.renders.render_delivered says the same of one document).
DELIVERED_RENDER = {"$or": [{"content_checked": {"$exists": False}}, {"delivered_image_ids.0": {"$exists": True}}]}


def owe_missing(services) -> int:
    """Messages of the last MISSING_MESSAGE_WINDOW that their state change owes but nobody owed (the process died
    between the two writes)."""
    since = states.now() - MISSING_MESSAGE_WINDOW
    due = [Owed(a["user_id"], "avatar_ready", a["_id"], {"avatar_id": a["_id"]})
           for a in services.db.avatars.find({"state": "trained", "trained_at": {"$gte": since}}, {"user_id": 1})]
    for render in services.db.renders.find({"state": "done", "finished_at": {"$gte": since}, **DELIVERED_RENDER},
                                           {"user_id": 1, "order_id": 1, "pack_slots": 1, "album_id": 1}):
        due += portraits_ready_due(services, render)
    for order in services.db.orders.find({"state": "refunded", "refunded_at": {"$gte": since},
                                          "user_erased": {"$ne": True}}, {"user_id": 1, "amount": 1, "refunds": 1}):
        due.append(Owed(order["user_id"], "refund_made", refund_message_about(order),
                        {"order_id": order["_id"], "amount": order["amount"]}))
    due = [d for d in due if services.settings.subscribe_templates.get(d.kind)]
    known = {m["_id"] for m in services.db.messages.find(
        {"_id": {"$in": [keys.message_id(d.kind, d.about) for d in due]}}, {"_id": 1})}
    missing: dict[str, Owed] = {}  # by message: a pack's (or an album's) batches each owe the same one
    for owed in due:
        message_id = keys.message_id(owed.kind, owed.about)
        if message_id not in known:
            missing.setdefault(message_id, owed)
    for owed in missing.values():
        notify(services, **owed._asdict())
    return len(missing)


def portraits_message_about(render: dict) -> str:
    """A render set's message is about the set; a pack's about its order: the first batch delivered tells the user,
    the others do not spend a one-time grant each on the same news."""
    return render["order_id"] if render.get("pack_slots") else render["_id"]


def portraits_ready_due(services, render: dict) -> list[Owed]:
    """The portraits_ready messages a delivered render owes: its user's, opening the render; an album batch's also
    every other member's while the album is accepted, each about the order and that member (so each member is told
    once) and opening the album, which they can see (the render is the payer's)."""
    about = portraits_message_about(render)
    due = [Owed(render["user_id"], "portraits_ready", about, {"render_id": render["_id"]})]
    if render.get("album_id"):
        album = services.db.albums.find_one({"_id": render["album_id"], "state": "accepted"}, {"member_ids": 1})
        others = [m for m in (album or {}).get("member_ids", []) if m != render["user_id"]]
        due += [Owed(member_id, "portraits_ready", f"{about}-{member_id}", {"album_id": render["album_id"]},
                     ALBUM_PAGE) for member_id in others]
    return due


def refund_message_about(order: dict) -> str:
    """A full refund's message is about the refund that settled the order (its last successful one)."""
    settled = [r["out_refund_no"] for r in order.get("refunds", []) if r.get("state") == "SUCCESS"]
    return settled[-1] if settled else order["_id"]
