"""POST /api/v1/auth/login, and the bearer-token check every other route runs (rules: portraits.users)."""
from __future__ import annotations

import functools

from flask import Blueprint, g, request

from miniapp_api.api.openapi import endpoint
from miniapp_api.api.requests import services
from miniapp_api.errors import ApiError
from miniapp_api.schemas import LoginRequest, Session
from portraits import consents, users

bp = Blueprint("auth", __name__, url_prefix="/api/v1/auth")


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
        g.user = users.user_from_token(services(), bearer_token())
        return view(*args, **kwargs)

    return wrapped


def consents_json(user: dict) -> dict:
    face = consents.face_consent(services().settings, user)
    if face is None:
        return {"face_processing": None}
    return {"face_processing": {**face, "given_at": _iso(face["given_at"]), "withdrawn_at": _iso(face["withdrawn_at"])}}


def _iso(value):
    return value.isoformat().replace("+00:00", "Z") if value else None


@bp.post("/login")
@endpoint(ok={200: Session}, errors=[401, 503], public=True, rate_limit="rate_limit_login")
def login(json: LoginRequest):
    """Exchange a wx.login code for a bearer token."""
    svc = services()
    user = users.login(svc, json.code)
    return {"token": users.issue_token(svc.settings, user), "expires_in": svc.settings.token_ttl_s,
            "user": {"id": user["_id"], "consents": consents_json(user)}}
