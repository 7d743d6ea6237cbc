"""The mini-program's HTTP API: an app factory with one blueprint per concern."""
from __future__ import annotations

from flask import Flask

from miniapp_api.config import Settings


def create_app(settings: Settings | None = None, services=None) -> Flask:
    """Build the app. With no WeChat base URL configured, the local WeChat simulator is started in-process."""
    from miniapp_api.embedded import with_embedded_wechat
    from miniapp_api.errors import register_error_handlers
    from miniapp_api.services import build_services

    if services is None:
        settings, simulator = with_embedded_wechat(settings or Settings.from_env())
        services = build_services(settings)
        services.simulator = simulator
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = services.settings.max_upload_bytes + 256 * 1024
    app.config["JSON_AS_ASCII"] = False
    app.json.ensure_ascii = False
    app.extensions["portraits"] = services

    from miniapp_api import (auth, avatars, catalog_api, consents, images, me, openapi, orders, pay_callbacks,
                             renders, share, subscriptions)

    for module in (auth, consents, avatars, orders, pay_callbacks, subscriptions, catalog_api, renders, images, me,
                   openapi, share):
        app.register_blueprint(module.bp)
    register_error_handlers(app)

    from miniapp_api import console

    console.init_app(app)

    @app.get("/healthz")
    def healthz():
        services.redis.ping()
        return {"ok": True}

    return app
