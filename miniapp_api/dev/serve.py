"""Serve the API on a port in embedded mode (EMBEDDED on): WeChat simulator and workers in the same process.

    python -m miniapp_api.dev.serve --port 8000
"""
from __future__ import annotations

import argparse
import getpass
import os
import signal
import threading

from portraits import operators
from portraits.config import Settings
from miniapp_api.dev.embedded import EmbeddedStack


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--operator", metavar="NAME",
                        help="create this admin for /console at start (password from CONSOLE_OPERATOR_PASSWORD); "
                             "the embedded database lives only as long as this process")
    args = parser.parse_args(argv)
    stack = EmbeddedStack(Settings.from_env(embedded=True), host=args.host, port=args.port)
    if args.operator:
        password = os.environ.get("CONSOLE_OPERATOR_PASSWORD") or getpass.getpass(f"password for {args.operator}: ")
        operators.create(stack.services.db, args.operator, password, "admin", by="cli:serve")
        print(f"console    {stack.base_url}/console   (admin {args.operator})")
    sim = stack.simulator.base_url if stack.simulator else "(real WeChat)"
    print(f"API        {stack.base_url}/api/v1   (spec: {stack.base_url}/api/v1/openapi.json)")
    print(f"simulator  {sim}")
    print(f"  login code:  curl -X POST {sim}/sim/login -H 'Content-Type: application/json' -d '{{\"user\":\"alice\"}}'")
    print(f"  pay order:   curl -X POST {sim}/sim/pay -H 'Content-Type: application/json' -d '{{\"out_trade_no\":\"ORDER_ID\"}}'")
    done = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: done.set())
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    stack.stop()


if __name__ == "__main__":
    main()
