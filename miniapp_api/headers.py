"""Security headers on every response: never sniffed, and the API's answers never stored by a cache.

Every /api/v1 answer carries private data or a token unless its route says otherwise (the template previews are
public and cacheable: they set Cache-Control themselves). The console sets its own strict headers, CSP included
(miniapp_api.console.session_views).
"""
from __future__ import annotations

from flask import request

API_PREFIX = "/api/v1/"


def init_app(app) -> None:
    app.after_request(_security_headers)


def _security_headers(response):
    response.headers["X-Content-Type-Options"] = "nosniff"
    if request.path.startswith(API_PREFIX) and "Cache-Control" not in response.headers:
        response.headers["Cache-Control"] = "no-store"
    return response
