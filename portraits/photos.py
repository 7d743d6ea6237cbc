"""The promise in the consent text: photos are used only to build the avatar and deleted once it exists.

Photos (aligned crops and per-photo embeddings) go when the avatar is trained, and when it failed and its refund is
settled; the LoRA and the identity pivot stay as the avatar itself until the user deletes it.
"""
from __future__ import annotations

from portraits import keys, states


def photo_blob_keys(avatar: dict) -> list[str]:
    found = []
    for photo in avatar.get("photos", []):
        found += [photo[k] for k in ("crop_key", "embedding_key", "upload_key") if photo.get(k)]
    return found


def purge_avatar_photos(services, avatar: dict) -> int:
    """Photos, crops and per-photo embeddings go; the verdicts stay so the user still sees what was judged."""
    blob_keys = photo_blob_keys(avatar)
    for key in blob_keys:
        services.blobs.delete(key)
    services.db.avatars.update_one(
        {"_id": avatar["_id"]},
        {"$set": {"photos": [{"id": p["id"], "role": p.get("role"), "accepted": p["accepted"],
                              "reasons": p.get("reasons", []), **({"state": p["state"]} if p.get("state") else {}),
                              **({"content_check": p["content_check"]} if p.get("content_check") else {})}
                             for p in avatar.get("photos", [])],
                  "photos_purged_at": states.now()}},
    )
    return len(blob_keys)


def purge_failed_avatar_photos(services, avatar_id: str) -> int:
    """A failed avatar is of no further use: its photos, and whatever training left behind, go."""
    avatar = services.db.avatars.find_one({"_id": avatar_id})
    if avatar is None or avatar["state"] != "failed":
        return 0
    services.blobs.delete(keys.lora(avatar))
    services.blobs.delete(keys.pivot(avatar))
    return purge_avatar_photos(services, avatar)
