"""The app factory: one blueprint per concern, the error envelope, the console."""
from __future__ import annotations

from flask import Flask

from miniapp_api import bodies, console, headers, observability, throttle
from miniapp_api.api import (album_invites, albums, auth, avatars, catalog as catalog_api, consents, disclosure,
                             images, me, media, message_push, openapi, orders, packs, pay_callbacks, products,
                             renders, subscriptions)
from miniapp_api.dev.simulator import with_embedded_wechat
from miniapp_api.errors import register_error_handlers
from portraits.config import Settings
from portraits.services import build_services

BLUEPRINTS = (auth, consents, avatars, orders, products, pay_callbacks, message_push, media, subscriptions,
              catalog_api, renders, packs, albums, album_invites, images, me, openapi, disclosure)


def create_app(settings: Settings | None = None, services=None) -> Flask:
    """Build the app, with settings from the environment unless given. Without EMBEDDED every setting a real
    deployment needs must be set (a ConfigError names the missing ones); with EMBEDDED and no WeChat base URL the
    local WeChat simulator is started in-process."""
    if services is None:
        settings, simulator = with_embedded_wechat(settings or Settings.from_env())
        services = build_services(settings)
        services.simulator = simulator
    app = Flask(__name__)
    app.config["JSON_AS_ASCII"] = False
    app.json.ensure_ascii = False
    app.extensions["portraits"] = services

    for module in BLUEPRINTS:
        app.register_blueprint(module.bp)
    register_error_handlers(app)
    bodies.init_app(app)
    headers.init_app(app)
    throttle.init_app(app)
    console.init_app(app)
    observability.init_app(app, services)  # request ids, access log, /livez /readyz /metrics, Sentry

    @app.get("/healthz")
    def healthz():
        services.redis.ping()
        return {"ok": True}

    return app
