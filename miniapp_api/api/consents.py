"""Separate, explicit consent for face processing (PIPL arts. 28-29, 31), recorded with version and time."""
from __future__ import annotations

from flask import Blueprint, g, request

from miniapp_api import states
from miniapp_api.auth import consents_json, login_required
from miniapp_api.errors import ApiError
from miniapp_api.privacy import withdraw_face_consent
from miniapp_api.requests import json_body, services

bp = Blueprint("consents", __name__, url_prefix="/api/v1/consents")

FACE_PROCESSING_TEXT = (
    "人脸信息处理单独同意：您上传的照片仅用于生成您的数字分身，不用于身份识别；"
    "数字分身生成后照片将被自动删除；您可随时撤回同意，撤回后照片与数字分身将被删除。"
    "您确认已年满14周岁，且照片中的人脸为您本人或已取得被拍摄者同意。"
)


def consent_texts() -> list[dict]:
    return [{"kind": "face_processing", "version": services().settings.consent_version, "text": FACE_PROCESSING_TEXT}]


def has_face_consent(user: dict) -> bool:
    return consents_json(user)["face_processing"] is not None and consents_json(user)["face_processing"]["current"]


@bp.get("")
@login_required
def list_consents():
    return consent_texts()


@bp.post("")
@login_required
def give_consent():
    body = json_body({"kind": str, "version": str, "age_14_or_over": bool, "own_face": bool})
    settings = services().settings
    if body["kind"] != "face_processing":
        raise ApiError(400, "unknown_consent_kind", "Only face_processing consent exists.", {"kind": body["kind"]})
    if body["version"] != settings.consent_version:
        raise ApiError(409, "consent_version_outdated", "Show the current consent text and ask again.",
                       {"current_version": settings.consent_version})
    if not body["age_14_or_over"]:
        raise ApiError(403, "guardian_consent_required",
                       "Users under 14 need a guardian's consent; this service does not process their faces.")
    if not body["own_face"]:
        raise ApiError(400, "own_face_confirmation_required",
                       "Confirm the face is yours or that the pictured person agreed.")
    record = {"version": body["version"], "given_at": states.now(), "withdrawn_at": None,
              "age_14_or_over": True, "own_face": True, "ip": request.remote_addr}
    services().db.users.update_one({"_id": g.user["_id"]}, {"$set": {"consents.face_processing": record}})
    user = services().db.users.find_one({"_id": g.user["_id"]})
    return consents_json(user), 201


@bp.delete("/face_processing")
@login_required
def withdraw():
    erased = withdraw_face_consent(services(), g.user)
    user = services().db.users.find_one({"_id": g.user["_id"]})
    return {"consents": consents_json(user), "deleted": erased}
