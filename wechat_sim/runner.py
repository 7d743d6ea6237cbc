"""Run the simulator on a local port in a background thread (tests, embedded dev mode) or from the command line."""
from __future__ import annotations

import argparse
import pathlib
import threading
from dataclasses import dataclass, field

from flask import Flask
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from wechat_sim.keys import SimCredentials, load_or_create_credentials
from wechat_sim.server import create_sim_app
from wechat_sim.simulator import WeChatSimulator


class _QuietRequestHandler(WSGIRequestHandler):
    """Access logs would print app secrets and tokens, which WeChat's protocol puts in query strings."""

    def log_request(self, code="-", size="-"):
        pass


@dataclass
class RunningSimulator:
    base_url: str
    creds: SimCredentials
    app: Flask
    _server: BaseWSGIServer = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def simulator(self) -> WeChatSimulator:
        return self.app.extensions["wechat_sim"]

    def stop(self) -> None:
        self.simulator.stop()  # no automatic redelivery after this
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_simulator(creds: SimCredentials, host: str = "127.0.0.1", port: int = 0,
                    **app_options) -> RunningSimulator:
    """app_options go to create_sim_app (refund_settle_delay_s, callback_timeout_s, redelivery_scale: the factor
    on WeChat Pay's retry intervals, 1.0 for the real pace; None, the default, for no automatic redelivery;
    push_url, push_mode, push_format: the message push)."""
    app = create_sim_app(creds, **app_options)
    server = make_server(host, port, app, threaded=True, request_handler=_QuietRequestHandler)
    thread = threading.Thread(target=server.serve_forever, name="wechat-sim", daemon=True)
    thread.start()
    return RunningSimulator(base_url=f"http://{host}:{server.server_port}", creds=creds, app=app,
                            _server=server, _thread=thread)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Local WeChat + WeChat Pay v3 simulator")
    parser.add_argument("--dir", type=pathlib.Path, default=pathlib.Path("instance/wechat_sim"),
                        help="where the generated keys are kept")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--redelivery-scale", type=float, default=1.0,
                        help="factor on WeChat Pay's callback retry intervals (15 s ... 6 h); 1, the default, is "
                             "the real pace")
    parser.add_argument("--no-redelivery", action="store_true",
                        help="deliver each callback once; redeliver only on POST /sim/redeliver")
    parser.add_argument("--refund-settle-delay", type=float, default=None, metavar="SECONDS",
                        help="refunds settle by themselves this long after being requested, as WeChat Pay's do; "
                             "unset, they wait for POST /sim/refunds/settle")
    parser.add_argument("--push-url", default=None,
                        help="the mini-program's message-push URL (mediaCheckAsync verdicts and virtual-payment "
                             "pushes go there); POST /sim/push-url changes it")
    parser.add_argument("--push-mode", choices=("plaintext", "safe"), default="safe")
    parser.add_argument("--push-format", choices=("json", "xml"), default="json")
    args = parser.parse_args(argv)
    creds = load_or_create_credentials(args.dir)
    app = create_sim_app(creds, redelivery_scale=None if args.no_redelivery else args.redelivery_scale,
                         refund_settle_delay_s=args.refund_settle_delay, push_url=args.push_url,
                         push_mode=args.push_mode, push_format=args.push_format)
    print(f"WeChat simulator on http://{args.host}:{args.port} (appid {creds.appid}, mchid {creds.mchid}, "
          f"credentials in {args.dir})", flush=True)
    make_server(args.host, args.port, app, threaded=True, request_handler=_QuietRequestHandler).serve_forever()


if __name__ == "__main__":
    main()
