"""The preview while the LoRA waits: right after payment, one portrait drawn from the avatar's front photo through
an image-prompt adapter on the base model (models.preview), shown until the trained portraits are delivered.

It is free and best effort: nothing paid waits on it, its failure refunds and blocks nothing (a failed preview is
just absent), and it is never a deliverable. It is still an image of a person: content-checked by WeChat and
AIGC-labelled (as a preview) like every portrait, and erased with the avatar and the user.

- `start_training` marks the avatar `preview_owed_at` in the same update that queues its training; `request_preview`
  records the preview (`previews`, one per avatar, its state machine in portraits.states) and enqueues its job on
  the GPU's `preview` queue, which GPU workers serve before renders and trainings (a few seconds of GPU per paid
  order, so a user sees something within seconds of paying).
- The job (jobs.previews) draws it, `complete_preview` stores it labelled and asks for its content check; the
  verdict (`apply_preview_verdict`) shows it or drops it.
- The first delivered render of the avatar supersedes it (`supersede`): its image is deleted.
- The sweep (`sweep`) records a preview owed but never recorded, queues again one whose job Redis lost, and gives
  up on one not shown PREVIEW_TIMEOUT_S after it was asked for.
"""
from __future__ import annotations

import io
import logging
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta

from PIL import Image

from models.labels import PREVIEW_KIND, label_image
from portraits import avatars, content_checks, keys, privacy, states, tasks

log = logging.getLogger(__name__)

PROMPT = "a portrait photo of {subject}, soft studio light, detailed face, high quality"
NEGATIVE_PROMPT = "lowres, blurry, deformed face, bad anatomy, extra fingers, watermark, text"
GUIDANCE = 6.0
PENDING = ("queued", "rendering", "checking")
# RQ's words for a job that will still run.
LIVE = ("queued", "started", "scheduled", "deferred")


def front_photo(avatar: dict) -> dict | None:
    """The front photo training counts (accepted and passed by the content check), with its crop still stored."""
    return next((p for p in avatars.counted_photos(avatar) if p.get("role") == "front" and p.get("crop_key")), None)


def request_preview(services, avatar_id: str, by: str) -> dict | None:
    """Record the preview an avatar is owed, once, and enqueue its job; an avatar without a front photo gets a
    preview that is failed from the start (absent). None when previews are off or the avatar is gone."""
    avatar = services.db.avatars.find_one({"_id": avatar_id})
    if avatar is None:
        return None
    if not services.settings.previews_enabled:  # turned off since it was owed: owed no more
        services.db.avatars.update_one({"_id": avatar_id}, {"$unset": {"preview_owed_at": ""}})
        return None
    at = states.now()
    front = front_photo(avatar)
    state = "queued" if front is not None else "failed"
    services.db.previews.update_one(
        {"_id": avatar_id},
        {"$setOnInsert": {"user_id": avatar["user_id"], "avatar_id": avatar_id, "order_id": avatar.get("order_id"),
                          "state": state, "attempts": 0, "failure": None if front else "no_front_photo",
                          "requested_at": avatar.get("preview_owed_at") or at, "created_at": at, "updated_at": at,
                          "history": states.initial_history(state, by)}},
        upsert=True)
    services.db.avatars.update_one({"_id": avatar_id}, {"$unset": {"preview_owed_at": ""}})
    preview = services.db.previews.find_one({"_id": avatar_id})
    if preview is not None and preview["state"] == "queued":
        enqueue_preview(services, preview)
    return preview


def request_preview_quietly(services, avatar_id: str, by: str) -> None:
    """After a payment: a preview that cannot be asked for now (Redis down, say) must not fail the payment's
    callback; it stays owed on the avatar and the sweep asks for it."""
    try:
        request_preview(services, avatar_id, by)
    except Exception:
        log.exception("preview of %s not requested; the sweep will", avatar_id)


def requester(services, by: str):
    """What apply_payment hands start_training to run before the training's enqueue: the preview's job goes first."""
    return lambda avatar: request_preview_quietly(services, avatar["_id"], by)


def enqueue_preview(services, preview: dict) -> None:
    tasks.enqueue(services, tasks.PREVIEW, tasks.RENDER_PREVIEW, preview["_id"],
                  job_id=keys.preview_job_id(preview["_id"], preview.get("attempts", 0) + 1))


def begin_preview(services, avatar_id: str, job_id: str) -> dict | None:
    """Claim a queued preview for this job; None when it is not queued (superseded, given up, or erased)."""
    return states.transition(services.db, "preview", avatar_id, "rendering", expect={"queued"}, by=f"job:{job_id}",
                             inc={"attempts": 1})


@dataclass(frozen=True)
class PreviewPlan:
    face: Image.Image
    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    size: int
    seed: int


def plan_preview(services, preview: dict) -> PreviewPlan:
    """What the previewer draws: the front photo's aligned crop as the image prompt. Raises when the photo is gone
    (the avatar trained first and its photos were purged): the preview then fails, as it should."""
    avatar = services.db.avatars.find_one({"_id": preview["avatar_id"]}) or {"photos": []}
    front = front_photo(avatar)
    if front is None:
        raise LookupError("the front photo is gone")
    face = Image.open(io.BytesIO(services.sealed.get(avatar["user_id"], front["crop_key"]))).convert("RGB")
    settings = services.settings
    return PreviewPlan(face=face, prompt=PROMPT.format(subject=avatars.CLASS_WORDS[avatar["gender"]]),
                       negative_prompt=NEGATIVE_PROMPT, steps=settings.preview_steps, guidance=GUIDANCE,
                       size=settings.preview_size, seed=avatars.training_seed(avatar) + preview["attempts"])


def complete_preview(services, preview: dict, image: Image.Image) -> str:
    """Store the drawn preview labelled (visible mark and metadata both say preview) and ask for its content
    check. Ids are derived from (avatar, attempt), so a replay writes the same image and label-log row."""
    user_id, avatar_id = preview["user_id"], preview["_id"]
    image_id, content_id = keys.image_ids(keys.preview_subject(avatar_id), preview["attempts"], 0)
    data = label_image(image, content_id=content_id, provider=services.settings.provider_name,
                       font_path=services.settings.cjk_font_path, kind=PREVIEW_KIND)
    blob_key = keys.image(user_id, image_id)
    services.sealed.put(user_id, blob_key, data)
    at = states.now()
    services.db.images.update_one(
        {"_id": image_id},
        {"$setOnInsert": {"user_id": user_id, "render_id": None, "preview_of": avatar_id, "kind": PREVIEW_KIND,
                          "content_id": content_id, "likeness": None, "width": image.width, "height": image.height,
                          "created_at": at, "content_check": "pending"}},
        upsert=True)
    services.db.label_log.update_one({"content_id": content_id},
                                     {"$setOnInsert": privacy.label_log_entry(services, content_id, user_id, at)},
                                     upsert=True)
    checking = states.transition(services.db, "preview", avatar_id, "checking", expect={"rendering"},
                                 by="preview", set_fields={"image_id": image_id})
    user = services.db.users.find_one({"_id": user_id})
    if checking is None or user is None:
        # Superseded or erased while it was drawn: nothing of it stays.
        discard_image(services, user_id, image_id)
        return "superseded"
    content_checks.request_check(services, "preview", image_id, user=user, blob_key=blob_key, avatar_id=avatar_id)
    return "checking"


def fail_preview(services, avatar_id: str, reason: str) -> str:
    """The draw failed: the preview is absent, and nothing else changes."""
    failed = states.transition(services.db, "preview", avatar_id, "failed", expect={"queued", "rendering"},
                               reason=reason, set_fields={"failure": reason})
    return "failed" if failed is not None else "already_handled"


def apply_preview_verdict(services, check: dict, counted: bool, reason: str | None) -> None:
    """WeChat's verdict on a preview (portraits.moderation): shown, or dropped (its file deleted). Idempotent."""
    image_id, avatar_id = check["subject_id"], check["avatar_id"]
    verdict = check["state"] if counted else "refused"
    services.db.images.update_one({"_id": image_id, "content_check": "pending"},
                                  {"$set": {"content_check": verdict, "content_reason": reason}})
    if counted:
        shown = states.transition(services.db, "preview", avatar_id, "shown", expect={"checking"},
                                  by=f"content-check:{check['_id']}", extra_filter={"image_id": image_id},
                                  set_fields={"shown_at": states.now()})
        current = services.db.previews.find_one({"_id": avatar_id}, {"state": 1, "image_id": 1})
        if shown is None and (current is None or current.get("image_id") != image_id or
                              current["state"] == "superseded"):
            discard_image(services, check["user_id"], image_id)
        return
    services.blobs.delete(keys.image(check["user_id"], image_id))
    states.transition(services.db, "preview", avatar_id, "failed", expect={"checking"},
                      by=f"content-check:{check['_id']}", reason=reason, extra_filter={"image_id": image_id},
                      set_fields={"failure": reason})


def supersede(services, avatar_id: str) -> bool:
    """The avatar's trained portraits are delivered: its preview is replaced (its image deleted, a check still
    waiting in our queue dropped). Idempotent; True when this call superseded it."""
    moved = states.transition(services.db, "preview", avatar_id, "superseded", expect={*PENDING, "shown"},
                              by="delivered")
    if moved is None:
        return False
    if moved.get("image_id"):
        discard_image(services, moved["user_id"], moved["image_id"])
    return True


def discard_image(services, user_id: str, image_id: str) -> None:
    """A preview image no one will see: its file, its record and a check not yet sent to WeChat go (its label-log
    row stays, as for every labelled image)."""
    services.blobs.delete(keys.image(user_id, image_id))
    services.db.images.delete_one({"_id": image_id, "kind": PREVIEW_KIND})
    content_checks.forget_check(services, "preview", image_id)


def client_state(services, avatar: dict) -> dict | None:
    """What the client is shown: {state: pending | ready | superseded, image_id}; None when no preview is owed or
    it failed (a failed preview is just absent)."""
    if avatar.get("preview_owed_at"):
        return {"state": "pending", "image_id": None}
    preview = services.db.previews.find_one({"_id": avatar["_id"]}, {"state": 1, "image_id": 1})
    if preview is None or preview["state"] == "failed":
        return None
    if preview["state"] in PENDING:
        return {"state": "pending", "image_id": None}
    if preview["state"] == "shown":
        return {"state": "ready", "image_id": preview["image_id"]}
    return {"state": "superseded", "image_id": None}


# ------------------------------------------------------------------------------------------------- the sweep


def sweep(services, grace_cutoff) -> Counter:
    """Previews owed but never recorded are asked for; queued ones whose job Redis lost, and drawing ones whose
    worker died, are queued again; any not shown PREVIEW_TIMEOUT_S after they were asked for are given up; any
    whose order is fulfilled are superseded."""
    done = Counter()
    deadline = states.now() - timedelta(seconds=services.settings.preview_timeout_s)
    for avatar in services.db.avatars.find({"preview_owed_at": {"$exists": True}}, {"preview_owed_at": 1}):
        if request_preview(services, avatar["_id"], by="sweeper") is not None:
            done["preview_requested"] += 1
    overdue = services.db.previews.find({"state": {"$in": ["queued", "rendering"]}, "requested_at": {"$lt": deadline}},
                                        {"_id": 1})
    for preview in overdue:
        if states.transition(services.db, "preview", preview["_id"], "failed", expect={"queued", "rendering"},
                             by="sweeper", reason="timeout", set_fields={"failure": "timeout"}) is not None:
            done["preview_given_up"] += 1
    showing = list(services.db.previews.find({"state": {"$in": [*PENDING, "shown"]}}, {"order_id": 1}))
    fulfilled = {o["_id"] for o in services.db.orders.find(
        {"_id": {"$in": [p.get("order_id") for p in showing]}, "state": "fulfilled"}, {"_id": 1})}
    for preview in showing:
        # Delivered while the process died between fulfilling the order and replacing the preview.
        if preview.get("order_id") in fulfilled and supersede(services, preview["_id"]):
            done["preview_superseded"] += 1
    owed = list(services.db.previews.find({"$or": [{"state": "queued"},
                                                   {"state": "rendering", "updated_at": {"$lt": grace_cutoff}}]}))
    job_ids = [keys.preview_job_id(p["_id"], p["attempts"] + (p["state"] == "queued")) for p in owed]
    for preview, status in zip(owed, tasks.job_statuses(services, job_ids)):
        if status in LIVE:
            continue
        if preview["state"] == "rendering":
            preview = states.transition(services.db, "preview", preview["_id"], "queued", expect={"rendering"},
                                        by="sweeper", reason="job_lost")
        if preview is not None:
            enqueue_preview(services, preview)
            done["preview_requeued"] += 1
    return done
