"""What the service promises to delete, deleted from every store it was written to.

Photos go once the avatar is trained (or failed and refunded; portraits.photos); everything of a user goes on DELETE /me or on
withdrawal of face-processing consent. Payment records stay for accounting with the user replaced by a one-way hash.
"""
from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta

from portraits import albums, identity, keys, photos, states, tasks
from portraits.billing import orders, refunds
from portraits.queue.tracking import QueueTracker


def user_ref(services, user_id: str) -> str:
    return one_way_ref(services.settings.secret_key, user_id)


def one_way_ref(secret_key: str, user_id: str) -> str:
    """What stands for a user where their id must not (payment records kept after erasure, rate-limit counters):
    the same for the same user, and no way back to the id without SECRET_KEY."""
    return hmac.new(secret_key.encode(), user_id.encode(), hashlib.sha256).hexdigest()[:32]


def label_log_entry(services, content_id: str, user_id: str, at) -> dict:
    return {"content_id": content_id, "user_ref": user_ref(services, user_id), "created_at": at,
            "provider": services.settings.provider_name}


def purge_stale_collecting(services) -> int:
    """Avatars left collecting (or ready but never paid) past COLLECTING_TTL_S lose their photos and are removed."""
    cutoff = states.now() - timedelta(seconds=services.settings.collecting_ttl_s)
    removed = 0
    for avatar in services.db.avatars.find({"state": {"$in": ["collecting", "ready"]}, "updated_at": {"$lt": cutoff}}):
        if services.db.orders.find_one({"avatar_id": avatar["_id"], "state": {"$nin": ["closed"]}}):
            continue
        _delete_avatar(services, avatar)
        removed += 1
    return removed


def _delete_avatar(services, avatar: dict) -> None:
    """The avatar's blobs, queue entry and document. Its RQ jobs are the caller's to delete (erase_user_data does,
    in one pass over every queue); an avatar that was never paid for has none."""
    for key in photos.photo_blob_keys(avatar) + [keys.lora(avatar), keys.pivot(avatar)]:
        services.blobs.delete(key)
    QueueTracker(services.redis).forget_subject(keys.avatar_subject(avatar["_id"]))
    services.db.content_checks.delete_many({"avatar_id": avatar["_id"]})  # nothing of it is left to check
    services.db.previews.delete_one({"_id": avatar["_id"]})
    services.db.avatars.delete_one({"_id": avatar["_id"]})


def erase_user_data(services, user: dict, reason: str) -> dict:
    """Everything personal of a user, from MongoDB, the blob store and Redis; undelivered paid orders refunded."""
    user_id = user["_id"]
    # First: a withdrawal refunds only what an album did not deliver, and deletes its joint images for everyone.
    albums.withdraw_albums_of(services, user_id, reason=reason)
    for order in services.db.orders.find({"user_id": user_id, "state": "paid"}):
        refunds.request_refund(services, order["_id"], reason=reason, by=f"user:{user_id}")
    for order in services.db.orders.find({"user_id": user_id, "state": "created"}):
        # Closed at WeChat Pay too, so the user can no longer pay it; if WeChat Pay cannot be reached now, it is
        # closed here and reconciliation closes it there later.
        orders.close_unpaid(services, order["_id"], by=f"user:{user_id}", reason=reason)
    avatars = list(services.db.avatars.find({"user_id": user_id}))
    renders = list(services.db.renders.find({"user_id": user_id}))
    # Jobs first, so that no worker takes one of them up after its avatar or render is gone.
    image_ids = set(services.db.images.distinct("_id", {"user_id": user_id}))  # share-code jobs name the image
    jobs = tasks.delete_jobs_of(services, {user_id} | {a["_id"] for a in avatars} | {r["_id"] for r in renders}
                                | image_ids)
    for avatar in avatars:
        _delete_avatar(services, avatar)
    for render in renders:
        QueueTracker(services.redis).forget_subject(keys.render_subject(render["_id"]))
    services.db.renders.delete_many({"user_id": user_id})
    services.db.images.delete_many({"user_id": user_id})
    services.db.messages.delete_many({"user_id": user_id})
    services.db.content_checks.delete_many({"user_id": user_id})
    services.db.previews.delete_many({"user_id": user_id})
    services.blobs.delete_prefix(keys.user_prefix(user_id))
    # Crypto-shredding: whatever copy of a sealed blob survives elsewhere (a backup, a replica) is unreadable now.
    services.vault.shred(user_id)
    return {"avatars": len(avatars), "renders": len(renders), "jobs": jobs}


def _scrub(value, replacements: dict[str, str]):
    if isinstance(value, str):
        for old, new in replacements.items():
            value = value.replace(old, new)
        return value
    if isinstance(value, dict):
        return {k: _scrub(v, replacements) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, replacements) for v in value]
    return value


def pseudonymise_orders(services, user: dict) -> int:
    """Payment records stay for accounting; every mention of the user in them (owner, openid, who requested a
    refund, state history, payment alerts) becomes the one-way reference."""
    ref = user_ref(services, user["_id"])
    replacements = {user["_id"]: ref}
    if user.get("openid"):
        replacements[user["openid"]] = ref
    kept_orders = list(services.db.orders.find({"user_id": user["_id"]}))
    for order in kept_orders:
        # Only the values that name the user are written: a refund callback or a reconciliation landing on the order
        # between this read and this write keeps what it wrote.
        fields = scrubbed_fields({k: v for k, v in order.items() if k != "openid"}, replacements)
        services.db.orders.update_one({"_id": order["_id"]},
                                      {"$set": {**fields, "user_erased": True}, "$unset": {"openid": ""}})
    for alert in services.db.payment_alerts.find({"order_id": {"$in": [o["_id"] for o in kept_orders]}}):
        fields = scrubbed_fields(alert, replacements)
        if fields:
            services.db.payment_alerts.update_one({"_id": alert["_id"]}, {"$set": fields})
    return len(kept_orders)


def scrubbed_fields(value, replacements: dict[str, str], path: str = "") -> dict:
    """The dotted path of every string in a document that mentions one of `replacements`, with its scrubbed value:
    a $set of just these leaves what others write on the document meanwhile as they wrote it."""
    if isinstance(value, str):
        scrubbed = _scrub(value, replacements)
        return {path: scrubbed} if scrubbed != value else {}
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {}
    found = {}
    for key, item in items:
        found.update(scrubbed_fields(item, replacements, f"{path}.{key}" if path else str(key)))
    return found


# What an erased member's entry in an album keeps of them besides their id: their name, and their avatar (deleted
# with them) and its gender.
ERASED_MEMBER_FIELDS = ("nickname", "avatar_id", "gender")


def pseudonymise_albums(services, user: dict) -> int:
    """The albums the user was in stay for the other members (withdrawn by the erasure): the user becomes the
    one-way reference there, and their member entry loses their nickname, avatar and gender. Only those values are
    written (an album's arrays only grow at their end, so the index read is still the entry's), so what the sweep
    writes on the album meanwhile stays."""
    ref = user_ref(services, user["_id"])
    kept = list(services.db.albums.find({"member_ids": user["_id"]}))
    for album in kept:
        fields = scrubbed_fields(album, {user["_id"]: ref})
        for index, member in enumerate(album["members"]):
            if member["user_id"] == user["_id"]:
                fields.update({f"members.{index}.{field}": None for field in ERASED_MEMBER_FIELDS})
        services.db.albums.update_one({"_id": album["_id"]}, {"$set": fields})
    return len(kept)


def delete_user(services, user: dict) -> None:
    erase_user_data(services, user, reason="user_deleted")
    pseudonymise_orders(services, user)
    pseudonymise_albums(services, user)
    # With the user document gone every token of theirs is refused (auth looks the user up on each request).
    services.db.users.delete_one({"_id": user["_id"]})


def withdraw_face_consent(services, user: dict) -> dict:
    """The account stays (orders, the right to consent again); everything face-related goes, and so do the
    user's sessions: every token issued so far is revoked, and the client logs in again."""
    if not (user.get("consents") or {}).get("face_processing"):
        # Never given: nothing was processed under it, so there is nothing to erase and no session to end.
        return {"avatars": 0, "renders": 0, "jobs": 0, "tokens_revoked": False}
    phone = identity.phone_of(services, user)
    erased = erase_user_data(services, user, reason="consent_withdrawn")
    services.db.users.update_one(
        {"_id": user["_id"]},
        {"$set": {"consents.face_processing.withdrawn_at": states.now()}, "$unset": {"subscriptions": ""},
         "$inc": {"token_generation": 1}},
    )
    services.vault.create_key(user["_id"])
    if phone is not None:  # the identity is the account's, not the face data's: sealed again under the new key
        identity.store_phone(services, user["_id"], {k: v for k, v in phone.items() if k != "bound_at"},
                             phone["bound_at"])
    return {**erased, "tokens_revoked": True}
