"""Serve the Procfile's topology on this machine in embedded mode: separate processes, as in production.

    python -m miniapp_api.dev.serve --port 8000

gunicorn (`web`, WEB_WORKERS workers), one `gpu` worker, the default `worker`, the `clock`, and the WeChat
simulator, each its own process, sharing the embedded Redis over TCP and the instance's SecantusDB server. Their
output is copied here, prefixed by their names (and kept in INSTANCE_DIR/logs/). One Ctrl-C (SIGINT or SIGTERM to
this process) stops them all, then the servers; this process also stops them all when any of them exits.
"""
from __future__ import annotations

import argparse
import getpass
import os
import signal
import threading

from miniapp_api.dev.supervisor import Topology
from portraits import operators
from portraits.config import Settings
from portraits.store import db as db_module


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--web-workers", type=int, default=2, help="gunicorn workers (WEB_WORKERS)")
    parser.add_argument("--operator", metavar="NAME",
                        help="create this admin for /console at start (password from CONSOLE_OPERATOR_PASSWORD)")
    args = parser.parse_args(argv)
    topology = Topology(Settings.from_env(embedded=True).instance_dir, port=args.port, web_workers=args.web_workers,
                        echo=True)
    topology.start()
    done = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: done.set())
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        if args.operator:
            password = os.environ.get("CONSOLE_OPERATOR_PASSWORD") or getpass.getpass(f"password for {args.operator}: ")
            operators.create(db_module.connect(topology.settings), args.operator, password, "admin", by="cli:serve")
            console_base = (f"http://{topology.settings.console_host}:{args.port}" if topology.settings.console_host
                            else topology.base_url)
            print(f"console    {console_base}{topology.settings.console_url_prefix}/   (admin {args.operator})")
        sim = topology.simulator_url or "(real WeChat)"
        print(f"supervisor pid {os.getpid()}; its processes (see them with `ps -f --ppid {os.getpid()}`):")
        print(topology.describe())
        print(f"API        {topology.base_url}/api/v1   (spec: {topology.base_url}/api/v1/openapi.json)")
        print(f"database   {topology.env['MONGO_URI']}   redis {topology.env['REDIS_URL']}")
        print(f"simulator  {sim}")
        print(f"  login code:  curl -X POST {sim}/sim/login -H 'Content-Type: application/json' -d '{{\"user\":\"alice\"}}'")
        print(f"  pay order:   curl -X POST {sim}/sim/pay -H 'Content-Type: application/json' -d '{{\"out_trade_no\":\"ORDER_ID\"}}'",
              flush=True)
        while not done.wait(1.0):
            exited = topology.exited()
            if exited:
                print(f"{', '.join(exited)} exited: stopping everything", flush=True)
                break
    finally:
        print("stopping ...", flush=True)
        topology.stop()
        print("stopped", flush=True)


if __name__ == "__main__":
    main()
