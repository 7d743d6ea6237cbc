"""Login with the chat app's code, and our own signed, expiring bearer tokens."""
from __future__ import annotations

import functools
import secrets

from flask import Blueprint, current_app, g, request
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from miniapp_api import states
from miniapp_api.errors import ApiError
from miniapp_api.requests import json_body, services
from miniapp_api.wechat import WeChatLoginError, WeChatUnavailable

bp = Blueprint("auth", __name__, url_prefix="/api/v1/auth")


@functools.lru_cache(maxsize=8)
def token_serializer(secret_key: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(secret_key, salt="api-token")


def issue_token(user: dict) -> str:
    return token_serializer(services().settings.secret_key).dumps(
        {"uid": user["_id"], "gen": user.get("token_generation", 0)})


def invalid_token() -> ApiError:
    return ApiError(401, "invalid_token", "The token is not valid.")


def token_claims(settings, token: str) -> dict:
    """The token's claims, checked by signature and age alone (no database)."""
    try:
        return token_serializer(settings.secret_key).loads(token, max_age=settings.token_ttl_s)
    except SignatureExpired:
        raise ApiError(401, "token_expired", "Your session expired; log in again.")
    except BadSignature:
        raise invalid_token()


def user_from_token(token: str) -> dict:
    claims = token_claims(services().settings, token)
    user = services().db.users.find_one({"_id": claims.get("uid")})
    if user is None or user.get("token_generation", 0) != claims.get("gen"):
        raise invalid_token()
    return user


def bearer_token(header: str | None = None) -> str:
    if header is None:
        header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing_token", "Send Authorization: Bearer <token>.")
    return token.strip()


def login_required(view):
    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        g.user = user_from_token(bearer_token())
        return view(*args, **kwargs)

    return wrapped


def consents_json(user: dict) -> dict:
    face = (user.get("consents") or {}).get("face_processing")
    if not face:
        return {"face_processing": None}
    return {"face_processing": {"version": face["version"], "given_at": _iso(face.get("given_at")),
                                "withdrawn_at": _iso(face.get("withdrawn_at")),
                                "current": face.get("withdrawn_at") is None
                                and face["version"] == services().settings.consent_version}}


def _iso(value):
    return value.isoformat().replace("+00:00", "Z") if value else None


@bp.post("/login")
def login():
    body = json_body({"code": str})
    svc = services()
    try:
        openid = svc.wechat.code_to_openid(body["code"])
    except WeChatLoginError:
        raise ApiError(401, "invalid_login_code", "The login code was refused by WeChat; call wx.login again.")
    except WeChatUnavailable:
        raise ApiError(503, "wechat_unavailable", "WeChat did not answer; try again in a moment.")
    at = states.now()
    user = svc.db.users.find_one_and_update(
        {"openid": openid},
        {"$setOnInsert": {"_id": "u_" + secrets.token_hex(10), "openid": openid, "created_at": at,
                          "consents": {}, "subscriptions": {}, "token_generation": 0},
         "$set": {"last_login_at": at}},
        upsert=True, return_document=True,
    )
    svc.vault.create_key(user["_id"])
    return {"token": issue_token(user), "expires_in": svc.settings.token_ttl_s,
            "user": {"id": user["_id"], "consents": consents_json(user)}}
