"""The operator console: server-rendered pages for support staff (orders, refunds, queues, audit), under
CONSOLE_URL_PREFIX (/console), on every host or only on CONSOLE_HOST.

    init_app(app) registers the blueprint, the console's session cookie settings and the create-operator command.
"""
from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta

from flask import Blueprint

from miniapp_api.cli import create_operator_command
from portraits import audit

bp = Blueprint("console", __name__, url_prefix="/console", template_folder="templates", static_folder="static",
               static_url_path="/static")


def init_app(app) -> None:
    settings = app.extensions["portraits"].settings
    # The console's session cookie is signed with its own key, derived so it differs from the API token key.
    app.secret_key = hmac.new(settings.secret_key.encode(), b"console-session", hashlib.sha256).hexdigest()
    app.config.update(
        SESSION_COOKIE_NAME="portraits_console",
        SESSION_COOKIE_PATH=settings.console_url_prefix or "/",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SECURE=settings.console_secure_cookies,
        SESSION_COOKIE_SAMESITE="Strict",
        PERMANENT_SESSION_LIFETIME=timedelta(seconds=settings.console_session_ttl_s),
    )
    app.register_blueprint(bp, url_prefix=settings.console_url_prefix)
    audit.ensure_indexes(app.extensions["portraits"].db)
    app.cli.add_command(create_operator_command)


from miniapp_api.console import actions, admin, pages, session_views  # noqa: E402,F401  (routes on bp)
