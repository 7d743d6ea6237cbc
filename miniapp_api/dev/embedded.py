"""Pieces of the embedded development stack the tests share: the simulator's settings and a deferred WSGI app.

`make serve` and `make demo` run the Procfile's processes (miniapp_api.dev.supervisor); nothing runs the API and
the workers in one process any more.
"""
from __future__ import annotations

from miniapp_api.dev.simulator import DEFAULT_SUBSCRIBE_TEMPLATES, pointed_at_simulator, with_embedded_wechat

__all__ = ["DEFAULT_SUBSCRIBE_TEMPLATES", "pointed_at_simulator", "with_embedded_wechat"]


class _Deferred:
    """A WSGI app that forwards to the real one once it exists (the tests' HTTP server is bound first, so the
    payment notify_url can name its real port)."""

    target = None

    def __call__(self, environ, start_response):
        return self.target(environ, start_response)
