"""Log in and out; every console request loads its operator and checks the CSRF token of every POST."""
from __future__ import annotations

from flask import abort, g, redirect, render_template, request, url_for

from miniapp_api.console import bp, present

from portraits import operators
from miniapp_api.console.security import (ConsoleRefusal, check_csrf, clear_failures, client_ip, csrf_token,
                                          end_session, load_operator, locked_out, note_failure, record, services,
                                          start_session)


@bp.before_request
def _only_on_the_console_host():
    """With CONSOLE_HOST set, the console is not there on any other host (the public API's, for one)."""
    console_host = services().settings.console_host
    if console_host and request.host.lower() != console_host.lower():
        abort(404)


@bp.before_request
def _load_operator_and_check_csrf():
    g.operator = load_operator()
    if request.method == "POST":
        check_csrf()


@bp.after_request
def _security_headers(response):
    response.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self'; style-src 'self'; "
                                                   "script-src 'none'; form-action 'self'; frame-ancestors 'none'")
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.context_processor
def _template_helpers():
    settings = services().settings
    return {"operator": g.get("operator"), "csrf_token": csrf_token, "money": present.money,
            "when": present.make_time_formatter(settings.console_timezone), "duration": present.duration,
            "role_labels": operators.ROLE_LABELS, "at_least": operators.at_least,
            "support_limit": settings.support_refund_limit_fen}


@bp.errorhandler(ConsoleRefusal)
def _refusal(error: ConsoleRefusal):
    return render_template("console/refusal.html", error=error), error.status


@bp.get("/login")
def login():
    if g.operator is not None:
        return redirect(url_for("console.dashboard"))
    return render_template("console/login.html", error=None, name="", next=_safe_next(request.args.get("next")))


@bp.post("/login")
def login_submit():
    name = request.form.get("name", "").strip().lower()
    password = request.form.get("password", "")
    ip = client_ip()
    next_path = _safe_next(request.form.get("next"))
    if locked_out(name, ip):
        record("login_locked", operator=name or "anonymous", role=None, outcome="refused")
        raise ConsoleRefusal(429, "login_locked", "登录失败次数过多，请稍后再试 (too many failed logins; try later)")
    operator = operators.authenticate(services().db, name, password)
    if operator is None:
        failures = note_failure(name, ip)
        record("login_failed", operator=name or "anonymous", role=None, details={"failures": failures},
               outcome="refused")
        return render_template("console/login.html", error="用户名或密码错误 (wrong name or password)", name=name,
                               next=next_path), 401
    clear_failures(name, ip)
    start_session(operator)
    g.operator = operator
    record("login")
    return redirect(next_path or url_for("console.dashboard"))


@bp.post("/logout")
def logout():
    if g.operator is not None:
        record("logout")
    end_session()
    return redirect(url_for("console.login"))


def _safe_next(value: str | None) -> str | None:
    """Only paths inside the console: never an open redirect."""
    if value and value.startswith(url_for("console.dashboard")) and not value.startswith("//") and "\\" not in value:
        return value
    return None
