"""API server, workers and WeChat simulator in one process: `make demo`, `make serve` and the tests.

The one place where the HTTP layer and the workers meet (import-linter's layers contract lists this import).
"""
from __future__ import annotations

import threading

from werkzeug.serving import WSGIRequestHandler, make_server

from jobs.worker import run_embedded_workers
from miniapp_api.app import create_app
from miniapp_api.dev.simulator import DEFAULT_SUBSCRIBE_TEMPLATES, pointed_at_simulator, with_embedded_wechat
from portraits.config import Settings
from portraits.services import build_services

__all__ = ["DEFAULT_SUBSCRIBE_TEMPLATES", "EmbeddedStack", "pointed_at_simulator", "with_embedded_wechat"]


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):
        pass


class EmbeddedStack:
    """API server, workers and WeChat simulator in one process (demo, `make serve`, tests)."""

    def __init__(self, settings: Settings, host: str = "127.0.0.1", port: int = 0, workers: bool = True):
        # The server is bound first so the payment notify_url can name its real port.
        self._server = make_server(host, port, _Deferred(), threaded=True, request_handler=_QuietHandler)
        self.base_url = f"http://{host}:{self._server.server_port}"
        configured, self.simulator = with_embedded_wechat(settings.replace(public_base_url=self.base_url))
        self.services = build_services(configured)
        self.services.simulator = self.simulator
        self.app = create_app(services=self.services)
        self._server.app.target = self.app
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._server.serve_forever, daemon=True, name="api")]
        if workers:
            self._threads.append(threading.Thread(target=run_embedded_workers, args=(self.services, self._stop),
                                                  daemon=True, name="workers"))
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        for thread in self._threads:
            thread.join(timeout=30)
        if self.simulator is not None:
            self.simulator.stop()


class _Deferred:
    """A WSGI app that forwards to the real one once it exists."""

    target = None

    def __call__(self, environ, start_response):
        return self.target(environ, start_response)
