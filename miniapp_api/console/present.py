"""What the console shows of a document: chosen fields only. Raw documents never reach a template, so photo and
blob keys (crop_key, embedding_key, lora_key, users/... paths) cannot leak into a page."""
from __future__ import annotations

import re
from datetime import datetime
from zoneinfo import ZoneInfo

from portraits import identity, keys, tasks
from portraits.queue import lanes
from portraits.queue.tracking import QueueTracker

_BLOB_PATH = re.compile(r"users/\S+")


def money(fen: int | None) -> str:
    if fen is None:
        return "—"
    sign = "-" if fen < 0 else ""
    return f"{sign}¥{abs(fen) // 100}.{abs(fen) % 100:02d}"


def make_time_formatter(timezone_name: str):
    zone = ZoneInfo(timezone_name)

    def when(value) -> str:
        if not isinstance(value, datetime):
            return "—" if value in (None, "") else str(value)
        return value.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S")

    return when


def duration(seconds: int | float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} 小时 {minutes} 分"
    if minutes:
        return f"{minutes} 分 {secs} 秒"
    return f"{secs} 秒"


def redact(text: str | None) -> str | None:
    """Failure messages can quote a storage path; operators see that a path was there, not which."""
    return _BLOB_PATH.sub("[stored file]", text) if text else text


def mask_openid(openid: str | None) -> str:
    if not openid:
        return "—"
    return openid[:4] + "…" + openid[-4:] if len(openid) > 10 else "…"


def history(entries: list[dict]) -> list[dict]:
    return [{"to": h.get("to"), "at": h.get("at"), "by": h.get("by"), "reason": redact(h.get("reason"))}
            for h in entries or []]


def order_view(order: dict) -> dict:
    return {
        "id": order["_id"], "user_id": order["user_id"], "openid": mask_openid(order.get("openid")),
        "avatar_id": order.get("avatar_id"), "sku": order.get("sku"), "amount": order.get("amount", 0),
        "lane": lanes.lane_of(order), "promise": promise_view(order),
        "state": order["state"], "render_credits": order.get("render_credits", 0),
        "transaction_id": order.get("transaction_id"), "prepay_id": order.get("prepay_id"),
        "created_at": order.get("created_at"), "paid_at": order.get("paid_at"),
        "refunded_at": order.get("refunded_at"), "expires_at": order.get("expires_at"),
        "history": history(order.get("history")),
        "refunds": [{"out_refund_no": r.get("out_refund_no"), "amount": r.get("amount", 0), "state": r.get("state"),
                     "reason": r.get("reason"), "requested_by": r.get("requested_by"),
                     "requested_at": r.get("requested_at"), "updated_at": r.get("updated_at"),
                     "refund_id": r.get("refund_id")}
                    for r in order.get("refunds", [])],
    }


def promise_view(order: dict) -> dict | None:
    """An express order's promised wait and what became of it."""
    promise = order.get("promise") or order.get("promise_terms")
    if not promise:
        return None
    return {"state": promise.get("state") or "unpaid", "wait_s": promise["wait_s"], "margin_s": promise["margin_s"],
            "difference": promise["difference_fen"], "deadline": promise.get("deadline"),
            "waited_s": promise.get("waited_s"), "compensation": (promise.get("compensation") or {}).get("kind"),
            "history": history(promise.get("history"))}


def job_view(services, subject: str) -> dict | None:
    tracked = QueueTracker(services.redis).subject(subject)
    if not tracked:
        return None
    view = {"job_id": tracked.get("job_id"), "queue": tracked.get("queue"), "state": tracked.get("state"),
            "progress": tracked.get("progress"), "rq_status": None}
    if view["job_id"]:
        view["rq_status"] = tasks.job_status(services, view["job_id"])
    return view


def avatar_view(services, avatar: dict | None) -> dict | None:
    if avatar is None:
        return None
    photos = avatar.get("photos", [])
    return {"id": avatar["_id"], "state": avatar["state"], "gender": avatar.get("gender"),
            "photos_total": len(photos), "photos_accepted": sum(1 for p in photos if p.get("accepted")),
            "photos_purged": bool(avatar.get("photos_purged_at")), "train_attempts": avatar.get("train_attempts", 0),
            "failure": redact(avatar.get("failure")), "created_at": avatar.get("created_at"),
            "trained_at": avatar.get("trained_at"), "training_seconds": avatar.get("training_seconds"),
            "history": history(avatar.get("history")), "job": job_view(services, keys.avatar_subject(avatar["_id"]))}


def render_view(services, render: dict) -> dict:
    template = services.catalog.get(render.get("template_id"))
    return {"id": render["_id"], "state": render["state"], "template_id": render.get("template_id"),
            "template_name": template.name.zh if template else "?", "charged": bool(render.get("charged")),
            "parent_id": render.get("parent_id"), "retry_of": render.get("retry_of"),
            "retried_by": render.get("retried_by"), "attempts": render.get("attempts", 0),
            "images": len(render.get("image_ids", [])), "likeness": render.get("likeness_best"),
            "failure": redact(render.get("failure")), "created_at": render.get("created_at"),
            "finished_at": render.get("finished_at"), "history": history(render.get("history")),
            "job": job_view(services, keys.render_subject(render["_id"]))}


def user_view(user: dict, phone: dict | None) -> dict:
    """phone: the user's opened phone record (portraits.identity.phone_of), shown masked only."""
    face = (user.get("consents") or {}).get("face_processing") or {}
    return {"id": user["_id"], "openid": mask_openid(user.get("openid")), "created_at": user.get("created_at"),
            "phone": identity.masked(phone) if phone else None, "phone_bound_at": phone["bound_at"] if phone else None,
            "deleted": bool(user.get("deleted_at")), "deleted_at": user.get("deleted_at"),
            "consent_version": face.get("version"), "consent_at": face.get("given_at"),
            "consent_withdrawn_at": face.get("withdrawn_at")}
