"""Separate, explicit consent for face processing (PIPL arts. 28-29, 31), recorded with version and time.

Withdrawal erases what the consent covered: see portraits.privacy.withdraw_face_consent.
"""
from __future__ import annotations

from portraits import identity, states
from portraits.errors import Conflict, Forbidden, Invalid

FACE_PROCESSING = "face_processing"
FACE_PROCESSING_TEXT = (
    "人脸信息处理单独同意：您上传的照片仅用于生成您的数字分身，不用于身份识别；"
    "数字分身生成后照片将被自动删除；您可随时撤回同意，撤回后照片与数字分身将被删除。"
    "您确认已年满14周岁，且照片中的人脸为您本人或已取得被拍摄者同意。"
)


def consent_texts(settings) -> list[dict]:
    return [{"kind": FACE_PROCESSING, "version": settings.consent_version, "text": FACE_PROCESSING_TEXT}]


def face_consent(settings, user: dict) -> dict | None:
    """The user's face-processing consent as the client sees it, `current` when given for today's text and kept."""
    face = (user.get("consents") or {}).get(FACE_PROCESSING)
    if not face or "version" not in face:  # never given (a record without a version is no consent either)
        return None
    return {"version": face["version"], "given_at": face.get("given_at"), "withdrawn_at": face.get("withdrawn_at"),
            "current": face.get("withdrawn_at") is None and face["version"] == settings.consent_version}


def has_face_consent(settings, user: dict) -> bool:
    face = face_consent(settings, user)
    return bool(face and face["current"])


def require_face_consent(settings, user: dict) -> None:
    if not has_face_consent(settings, user):
        raise Forbidden("consent_required", "Give face-processing consent first.",
                        {"kind": FACE_PROCESSING, "version": settings.consent_version})


def give_consent(services, user: dict, *, kind: str, version: str, age_14_or_over: bool, own_face: bool,
                 ip: str | None) -> dict:
    """Record consent for today's text; returns the updated user."""
    settings = services.settings
    if kind != FACE_PROCESSING:
        raise Invalid("unknown_consent_kind", "Only face_processing consent exists.", {"kind": kind})
    identity.require_phone(services, user)  # real identity before any face processing
    if version != settings.consent_version:
        raise Conflict("consent_version_outdated", "Show the current consent text and ask again.",
                       {"current_version": settings.consent_version})
    if not age_14_or_over:
        raise Forbidden("guardian_consent_required",
                        "Users under 14 need a guardian's consent; this service does not process their faces.")
    if not own_face:
        raise Invalid("own_face_confirmation_required", "Confirm the face is yours or that the pictured person agreed.")
    record = {"version": version, "given_at": states.now(), "withdrawn_at": None, "age_14_or_over": True,
              "own_face": True, "ip": ip}
    services.db.users.update_one({"_id": user["_id"]}, {"$set": {f"consents.{FACE_PROCESSING}": record}})
    return services.db.users.find_one({"_id": user["_id"]})
