"""Embedded defaults: with no WeChat base URL configured, play WeChat's servers locally with generated keys."""
from __future__ import annotations

from miniapp_api.config import Settings


def with_embedded_wechat(settings: Settings):
    """Return (settings pointing at a running local simulator, the simulator) — or (settings, None) when real."""
    if not settings.embedded_wechat:
        return settings, None
    from wechat_sim.keys import load_or_create_credentials
    from wechat_sim.runner import start_simulator

    creds = load_or_create_credentials(settings.instance_dir / "wechat_sim")
    # Refunds settle a moment after they are asked for, as WeChat Pay's do.
    simulator = start_simulator(creds, refund_settle_delay_s=2.0)
    configured = pointed_at_simulator(settings, creds, simulator.base_url)
    if not configured.subscribe_templates:
        configured = configured.replace(subscribe_templates=dict(DEFAULT_SUBSCRIBE_TEMPLATES))
    return configured, simulator


def pointed_at_simulator(settings: Settings, creds, base_url: str) -> Settings:
    """Settings that talk to a WeChat simulator at base_url with its generated credentials."""
    return settings.replace(
        wechat_appid=creds.appid,
        wechat_secret=creds.app_secret,
        wechat_api_base=base_url,
        wechatpay_mchid=creds.mchid,
        wechatpay_private_key_pem=creds.merchant_private_key_pem,
        wechatpay_cert_serial_no=creds.merchant_cert_serial_no,
        wechatpay_apiv3_key=creds.apiv3_key,
        wechatpay_public_key_pem=creds.platform_public_key_pem,
        wechatpay_public_key_id=creds.platform_public_key_id,
        wechatpay_api_base=base_url,
    )


DEFAULT_SUBSCRIBE_TEMPLATES = {
    "training_started": "tmpl_training_started",
    "avatar_ready": "tmpl_avatar_ready",
    "portraits_ready": "tmpl_portraits_ready",
    "refund_made": "tmpl_refund_made",
}


class EmbeddedStack:
    """API server, workers and WeChat simulator in one process (demo, `make serve`, tests)."""

    def __init__(self, settings: Settings, host: str = "127.0.0.1", port: int = 0, workers: bool = True):
        import threading

        from werkzeug.serving import WSGIRequestHandler, make_server

        class QuietHandler(WSGIRequestHandler):
            def log_request(self, *args, **kwargs):
                pass

        from jobs.worker import run_embedded_workers
        from miniapp_api import create_app
        from miniapp_api.services import build_services

        # The server is bound first so the payment notify_url can name its real port.
        self._server = make_server(host, port, _Deferred(), threaded=True, request_handler=QuietHandler)
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
