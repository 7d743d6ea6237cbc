"""Users: login with the chat app's code, and our own signed, expiring bearer tokens.

A token names the user and their token generation; withdrawing consent bumps the generation, which revokes every
token issued before. Signature and age are checked without the database (the queue poll relies on that).
"""
from __future__ import annotations

import functools
import secrets

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from portraits import states
from portraits.errors import Unauthenticated, Unavailable
from portraits.gateways.wechat import WeChatLoginError, WeChatUnavailable

SESSION_KEY_CONTEXT = "session_key"


@functools.lru_cache(maxsize=8)
def token_serializer(secret_key: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(secret_key, salt="api-token")


def issue_token(settings, user: dict) -> str:
    return token_serializer(settings.secret_key).dumps({"uid": user["_id"], "gen": user.get("token_generation", 0)})


def invalid_token() -> Unauthenticated:
    return Unauthenticated("invalid_token", "The token is not valid.")


def token_claims(settings, token: str) -> dict:
    """The token's claims, checked by signature and age alone (no database)."""
    try:
        return token_serializer(settings.secret_key).loads(token, max_age=settings.token_ttl_s)
    except SignatureExpired:
        raise Unauthenticated("token_expired", "Your session expired; log in again.")
    except BadSignature:
        raise invalid_token()


def user_from_token(services, token: str) -> dict:
    claims = token_claims(services.settings, token)
    user = services.db.users.find_one({"_id": claims.get("uid")})
    if user is None or user.get("token_generation", 0) != claims.get("gen"):
        raise invalid_token()
    return user


def login(services, code: str) -> dict:
    """The user behind a wx.login code, created on first sight (with their own vault key)."""
    try:
        session = services.wechat.code_to_session(code)
    except WeChatLoginError:
        raise Unauthenticated("invalid_login_code", "The login code was refused by WeChat; call wx.login again.")
    except WeChatUnavailable:
        raise Unavailable("wechat_unavailable", "WeChat did not answer; try again in a moment.")
    openid = session["openid"]
    at = states.now()
    user = services.db.users.find_one_and_update(
        {"openid": openid},
        {"$setOnInsert": {"_id": "u_" + secrets.token_hex(10), "openid": openid, "created_at": at,
                          "consents": {}, "subscriptions": {}, "token_generation": 0},
         "$set": {"last_login_at": at}},
        upsert=True, return_document=True,
    )
    services.vault.create_key(user["_id"])
    if session.get("session_key"):
        # Kept (sealed with the user's key) because virtual payment signs each order with it; each login brings a
        # new one, which replaces the last.
        sealed = services.vault.seal(user["_id"], session["session_key"].encode("utf-8"), SESSION_KEY_CONTEXT)
        user = services.db.users.find_one_and_update({"_id": user["_id"]}, {"$set": {"session_key_sealed": sealed}},
                                                     return_document=True)
    return user


def session_key(services, user: dict) -> str | None:
    """The session key of the user's latest login, or None (never logged in since keys were kept, or erased)."""
    sealed = user.get("session_key_sealed")
    if not sealed:
        return None
    return services.vault.open(user["_id"], bytes(sealed), SESSION_KEY_CONTEXT).decode("utf-8")
