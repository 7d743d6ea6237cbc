"""Console sessions, roles, CSRF tokens and login throttling.

CSRF: a random token lives in the (signed, HTTP-only) session cookie and every form carries it in a hidden field;
each POST to the console must echo it (constant-time compare). SameSite=Strict on the cookie is a second line.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import secrets

from flask import current_app, g, redirect, request, session, url_for

from portraits import operators, audit

CSRF_FIELD = "csrf_token"


class ConsoleRefusal(Exception):
    """Rendered as an HTML page by the console blueprint: status, a stable reason code and a message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def services():
    return current_app.extensions["portraits"]


def client_ip() -> str | None:
    # Behind a reverse proxy, wrap the app in werkzeug's ProxyFix so this is the client's address.
    return request.remote_addr


def record(action: str, *, target: dict | None = None, details: dict | None = None, outcome: str = "ok",
           operator: str | None = None, role: str | None = None) -> None:
    current = g.get("operator")
    audit.record(services().db, operator=operator or (current["_id"] if current else "anonymous"),
                 role=role if role is not None else (current["role"] if current else None), action=action,
                 ip=client_ip(), user_agent=request.headers.get("User-Agent"), target=target, details=details,
                 outcome=outcome)


# --- CSRF -------------------------------------------------------------------------------------------------------

def csrf_token() -> str:
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def check_csrf() -> None:
    sent = request.form.get(CSRF_FIELD, "")
    expected = session.get("csrf", "")
    if not sent or not expected or not hmac.compare_digest(sent, expected):
        record("csrf_rejected", details={"path": request.path}, outcome="refused")
        raise ConsoleRefusal(400, "csrf_failed", "表单已失效或来源不明，请刷新页面后重试 (CSRF token missing or wrong)")


# --- sessions ---------------------------------------------------------------------------------------------------

def start_session(operator: dict) -> None:
    session.clear()
    session.permanent = True
    session["op"] = operator["_id"]
    session["gen"] = operator.get("session_generation", 0)
    session["csrf"] = secrets.token_urlsafe(32)


def end_session() -> None:
    session.clear()


def load_operator() -> dict | None:
    """The logged-in operator, re-read on every request so a disabled account or a role change applies at once."""
    name = session.get("op")
    if not name:
        return None
    operator = operators.collection(services().db).find_one({"_id": name})
    if operator is None or operator.get("disabled") or operator.get("session_generation", 0) != session.get("gen"):
        session.clear()
        return None
    return operator


def role_required(role: str):
    def decorate(view):
        @functools.wraps(view)
        def wrapped(*args, **kwargs):
            operator = g.get("operator")
            if operator is None:
                return redirect(url_for("console.login", next=request.path))
            if not operators.at_least(operator["role"], role):
                record("forbidden", details={"path": request.path, "required": role}, outcome="refused")
                raise ConsoleRefusal(403, "forbidden_role",
                                     f"你的角色（{operator['role']}）无权执行此操作，需要 {role} (role {role} required)")
            return view(*args, **kwargs)

        return wrapped

    return decorate


# --- login throttling -------------------------------------------------------------------------------------------

def _throttle_key(name: str, ip: str | None) -> str:
    digest = hashlib.sha256(f"{name.lower()}|{ip}".encode()).hexdigest()[:32]
    return f"portraits:console:login_failures:{digest}"


def locked_out(name: str, ip: str | None) -> bool:
    settings = services().settings
    count = services().redis.get(_throttle_key(name, ip))
    return count is not None and int(count) >= settings.console_login_max_failures


def note_failure(name: str, ip: str | None) -> int:
    """Failures count per name and address; the window starts with the first failure and ends with the lockout."""
    key = _throttle_key(name, ip)
    pipe = services().redis.pipeline()
    pipe.set(key, 0, nx=True, ex=services().settings.console_login_lockout_s)
    pipe.incr(key)
    _, count = pipe.execute()
    return int(count)


def clear_failures(name: str, ip: str | None) -> None:
    services().redis.delete(_throttle_key(name, ip))
