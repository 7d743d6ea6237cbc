"""Every name the service writes under: blob keys (all under the user's prefix, so erasure is one prefix delete),
queue-tracker subjects and job ids, and Redis lock names. The queue tracker's own Redis keys (the line, tickets,
durations, workers) are named in portraits/queue/tracking.py, beside the Lua scripts that use them."""
from __future__ import annotations

import hashlib


def user_prefix(user_id: str) -> str:
    return f"users/{user_id}/"


def photo_base(user_id: str, avatar_id: str, photo_id: str) -> str:
    return f"users/{user_id}/avatars/{avatar_id}/photos/{photo_id}"


def photo_crop(user_id: str, avatar_id: str, photo_id: str) -> str:
    return photo_base(user_id, avatar_id, photo_id) + ".png"


def photo_upload(user_id: str, avatar_id: str, photo_id: str) -> str:
    """The upload as received, sealed, while it waits to be judged (deleted once its verdict is recorded)."""
    return photo_base(user_id, avatar_id, photo_id) + ".upload"


def photo_embedding(user_id: str, avatar_id: str, photo_id: str) -> str:
    return photo_base(user_id, avatar_id, photo_id) + ".emb"


def lora(avatar: dict) -> str:
    return f"users/{avatar['user_id']}/avatars/{avatar['_id']}/lora.safetensors"


def pivot(avatar: dict) -> str:
    return f"users/{avatar['user_id']}/avatars/{avatar['_id']}/pivot.f64"


def image(user_id: str, image_id: str) -> str:
    return f"users/{user_id}/images/{image_id}.png"


def share_code(user_id: str, image_id: str) -> str:
    """The mini-program code WeChat drew for an image's share poster (portraits.sharing)."""
    return f"users/{user_id}/share_codes/{image_id}.png"


def avatar_subject(avatar_id: str) -> str:
    """The queue tracker's name for an avatar waiting for or in training."""
    return f"avatar:{avatar_id}"


def render_subject(render_id: str) -> str:
    return f"render:{render_id}"


def train_job_id(avatar_id: str, attempt: int) -> str:
    return f"train-{avatar_id}-{attempt}"


def render_job_id(render_id: str, attempt: int) -> str:
    return f"render-{render_id}-{attempt}"


def preview_subject(avatar_id: str) -> str:
    """What a preview's image ids are derived from (portraits.previews): one preview per avatar."""
    return f"preview:{avatar_id}"


def preview_job_id(avatar_id: str, attempt: int) -> str:
    return f"preview-{avatar_id}-{attempt}"


def refund_job_id(out_refund_no: str) -> str:
    return f"refund-{out_refund_no}"


def image_ids(render_id: str, attempt: int, index: int) -> tuple[str, str]:
    """(image id, AIGC content id) of the index-th portrait kept by one attempt of a render: the same every time
    that step runs, and as unguessable as the render's own random id."""
    digest = hashlib.sha256(f"{render_id}:{attempt}:{index}".encode()).hexdigest()
    return "img_" + digest[:20], "AIGC-" + digest[20:44].upper()


def message_id(kind: str, about: str) -> str:
    """One subscribe message of `kind` about one avatar, render, order or refund (portraits.notifications)."""
    return f"{kind}-{about}"


def message_job_id(message_id: str) -> str:
    return f"msg-{message_id}"


def share_code_job_id(image_id: str) -> str:
    return f"share-code-{image_id}"


def order_lock(order_id: str) -> str:
    return f"order-lock:{order_id}"


def avatar_upload_lock(avatar_id: str) -> str:
    """Held while one upload to the avatar is counted and recorded (portraits.avatars.add_photo)."""
    return f"avatar-upload-lock:{avatar_id}"


def avatar_judging_lock(avatar_id: str) -> str:
    """Held while one photo of the avatar is judged and its verdict recorded (portraits.avatars.judge_upload)."""
    return f"avatar-judging-lock:{avatar_id}"


def judge_job_id(photo_id: str) -> str:
    return f"judge-{photo_id}"


# Flask-Limiter's counters (miniapp_api.throttle) live under this prefix.
RATE_LIMITS = "portraits:limits"


def content_check_id(kind: str, subject_id: str) -> str:
    """One content check per medium: a photo (`photo`) or a portrait (`image`), by its id."""
    return f"cc-{kind}-{subject_id}"


def content_check_job_id(check_id: str, attempt: int) -> str:
    return f"content-{check_id}-{attempt}"


def content_check_quota(window: str, period: int) -> str:
    """mediaCheckAsync calls counted in one minute or one day (portraits.content_checks.take_quota)."""
    return f"content-check-quota:{window}:{period}"


def push_nonce(timestamp: str, nonce: str, signature: str) -> str:
    """A message push already received (miniapp_api.api.message_push refuses it again as a replay)."""
    return f"wechat-push:{timestamp}:{nonce}:{signature}"
