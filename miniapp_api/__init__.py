"""The mini-program's HTTP API. `gunicorn 'miniapp_api:create_app()'` serves it (see miniapp_api.app)."""
from __future__ import annotations

from miniapp_api.app import create_app

__all__ = ["create_app"]
