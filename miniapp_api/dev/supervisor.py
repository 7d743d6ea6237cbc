"""The Procfile's processes on this machine, as in production: `make serve`, `make demo` and the topology tests.

Every Procfile line (`web`: gunicorn, `gpu`, `worker` and `intake`: RQ workers, `clock`: the cron scheduler) runs as its own
process, plus the WeChat simulator (`python -m wechat_sim.runner`). They share what production processes share,
handed to them as production's settings are: the embedded Redis over TCP (REDIS_URL), the instance's SecantusDB
server (MONGO_URI), the blob directory on this disk (BLOB_DIR) and the simulator's WeChat settings. This process
holds both servers; `stop()` (SIGINT or SIGTERM in `make serve`) ends every child, then the servers.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import redis
import requests
from rq import Worker, cron_scheduler_registry

from miniapp_api.dev.simulator import DEFAULT_SUBSCRIBE_TEMPLATES
from portraits.push_events import PUSH_PATH
from portraits.config import Settings
from portraits.store import db_server, redis_client
from wechat_sim.keys import load_or_create_credentials

ROOT = Path(__file__).resolve().parents[2]
PROCFILE = ROOT / "Procfile"
PROCESSES = ("web", "gpu", "worker", "intake", "clock")
START_TIMEOUT_S = 180.0
# Past the GPU worker's stop grace (a training finishing or handed back) before a child is SIGKILLed.
STOP_TIMEOUT_S = 60.0
_PR_SET_PDEATHSIG = 1


def read_procfile(path: Path = PROCFILE) -> dict[str, str]:
    """`name: command` lines, in order."""
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_-]+):\s*(.+)$", line.strip())
        if match:
            found[match.group(1)] = match.group(2)
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies, even by SIGKILL (Linux), so none is orphaned."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def simulator_environ(creds, simulator_url: str, key_dir: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """The WeChat and WeChat Pay settings, as a process is given them in production, of the simulator at
    `simulator_url` (its credentials `creds`; the keys are written to files in `key_dir`). `environ` may choose
    XPAY_ENV, WECHAT_PUSH_MODE and SUBSCRIBE_TEMPLATES."""
    private_key = key_dir / "merchant_private_key.pem"
    public_key = key_dir / "platform_public_key.pem"
    for path, pem in ((private_key, creds.merchant_private_key_pem), (public_key, creds.platform_public_key_pem)):
        path.write_text(pem)
        path.chmod(0o600)
    return {"WECHAT_APPID": creds.appid, "WECHAT_SECRET": creds.app_secret,
            "WECHAT_API_BASE": simulator_url, "WECHATPAY_API_BASE": simulator_url,
            "WECHATPAY_MCHID": creds.mchid, "WECHATPAY_PRIVATE_KEY_PATH": str(private_key),
            "WECHATPAY_CERT_SERIAL_NO": creds.merchant_cert_serial_no, "WECHATPAY_APIV3_KEY": creds.apiv3_key,
            "WECHATPAY_PUBLIC_KEY_PATH": str(public_key),
            "WECHATPAY_PUBLIC_KEY_ID": creds.platform_public_key_id,
            "XPAY_OFFER_ID": creds.xpay_offer_id,
            "XPAY_APP_KEY": creds.xpay_sandbox_app_key if environ.get("XPAY_ENV") == "1" else creds.xpay_app_key,
            "WECHAT_PUSH_TOKEN": creds.push_token, "WECHAT_PUSH_AES_KEY": creds.push_aes_key,
            "WECHAT_PUSH_MODE": environ.get("WECHAT_PUSH_MODE") or "safe",
            "SUBSCRIBE_TEMPLATES": environ.get("SUBSCRIBE_TEMPLATES") or json.dumps(DEFAULT_SUBSCRIBE_TEMPLATES)}


@dataclass
class Child:
    name: str
    command: str
    process: subprocess.Popen
    log_path: Path
    _pump: threading.Thread | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid


class Topology:
    """Start with `start()`, stop with `stop()`; `processes` names which Procfile lines run (all by default)."""

    def __init__(self, instance_dir: Path, port: int | None = None, web_workers: int = 2,
                 processes: tuple[str, ...] = PROCESSES, echo: bool = False, environ: dict | None = None):
        self.instance_dir = Path(instance_dir).resolve()
        self.port = port or free_port()
        self.web_workers = web_workers
        self.wanted = processes
        self.echo = echo  # copy every child's output to stdout, prefixed by its name (make serve)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_dir = self.instance_dir / "logs"
        self.children: dict[str, Child] = {}
        given = dict(os.environ if environ is None else environ)
        # The children run this virtualenv's python, gunicorn and secantusd-py, on this checkout's code.
        self._environ = {**given, "PYTHONPATH": str(ROOT),
                         "PATH": f"{Path(sys.executable).parent}{os.pathsep}{given.get('PATH', '/usr/bin:/bin')}"}
        self._redis = None
        self._joined_database = False
        self.settings: Settings | None = None
        self.env: dict[str, str] = {}
        self.simulator_url: str | None = None

    # ------------------------------------------------------------------------------------------------ start
    def start(self) -> "Topology":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        settings = Settings.from_env(self._environ, embedded=True, instance_dir=self.instance_dir)
        if not settings.database_is_shared:
            raise SystemExit("EMBEDDED_DATABASE=mongomock lives inside one process: separate processes need the "
                             "database server (unset it) or MONGO_URI")
        env = {**self._environ, "EMBEDDED": "1", "INSTANCE_DIR": str(self.instance_dir),
               "PUBLIC_BASE_URL": self.base_url, "PORT": str(self.port), "WEB_WORKERS": str(self.web_workers),
               "BLOB_DIR": str(settings.blob_root), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        env["MONGO_URI"] = settings.mongo_uri or self._join_database()
        env["REDIS_URL"] = settings.redis_url or self._start_redis()
        if settings.embedded_wechat:
            env.update(self._start_simulator())
        self.env = env
        self.settings = Settings.from_env(env)
        commands = read_procfile()
        for name in self.wanted:
            self._spawn(name, commands[name])
        self.wait_until_started(self.wanted)

    def _join_database(self) -> str:
        uri = db_server.join(self.instance_dir)
        self._joined_database = True
        return uri

    def _start_redis(self) -> str:
        self.instance_dir.mkdir(parents=True, exist_ok=True)
        self._redis = redis_client.start_embedded(self.instance_dir / "redis.db", tcp_port=free_port())
        return redis_client.tcp_url(self._redis) or f"unix://{redis_client.socket_path(self._redis)}"

    def _start_simulator(self) -> dict[str, str]:
        sim_dir = self.instance_dir / "wechat_sim"
        creds = load_or_create_credentials(sim_dir)  # the runner loads the same files
        port = free_port()
        push_mode = self._environ.get("WECHAT_PUSH_MODE") or "safe"
        self._spawn("wechat_sim", f"exec python -m wechat_sim.runner --dir {sim_dir} --port {port} "
                                  "--redelivery-scale 1 --refund-settle-delay 2 "
                                  f"--push-url {self.base_url}{PUSH_PATH} --push-mode {push_mode}")
        self.simulator_url = f"http://127.0.0.1:{port}"
        self._wait(lambda: _answers(self.simulator_url + "/sim/stats"), "the WeChat simulator")
        return simulator_environ(creds, self.simulator_url, sim_dir, {**self._environ, "WECHAT_PUSH_MODE": push_mode})

    def _spawn(self, name: str, command: str) -> Child:
        log_path = self.log_dir / f"{name}.log"
        process = subprocess.Popen(
            ["/bin/sh", "-c", command if command.startswith("exec ") else f"exec {command}"],
            cwd=ROOT, env=self.env or self._environ,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the supervisor alone, which sends each child one SIGTERM
            preexec_fn=_die_with_parent)
        child = Child(name, command, process, log_path)
        child._pump = threading.Thread(target=self._copy_output, args=(child,), daemon=True, name=f"log-{name}")
        child._pump.start()
        self.children[name] = child
        return child

    def _copy_output(self, child: Child) -> None:
        with open(child.log_path, "ab") as log:
            for line in child.process.stdout:
                log.write(line)
                log.flush()
                if self.echo:
                    sys.stdout.write(f"{child.name:>9} | {line.decode(errors='replace')}")
                    sys.stdout.flush()

    def restart(self, name: str) -> Child:
        """Start a Procfile process again (after it was killed)."""
        old = self.children.pop(name)
        if old.process.poll() is None:
            old.process.kill()
        old.process.wait()
        return self._spawn(name, old.command)

    # ------------------------------------------------------------------------------------------- readiness
    def wait_until_started(self, names) -> None:
        for name in names:
            self._wait(lambda name=name: self.has_started(name), f"the {name} process to start")

    def has_started(self, name: str) -> bool:
        """What each process does once it is up: the web answers, a worker registers with RQ for its queues, the
        clock registers its scheduler and enqueues its periodic jobs by name."""
        child = self.children[name]
        if child.process.poll() is not None:
            raise RuntimeError(f"{name} exited with {child.process.returncode}:\n{self.log_tail(name)}")
        if name == "web":
            return _answers(self.base_url + "/healthz")
        if name in ("gpu", "worker", "intake"):
            return any(worker.pid == child.pid for worker in Worker.all(connection=self.shared_redis()))
        if name == "clock":
            return bool(cron_scheduler_registry.get_keys(self.shared_redis()))
        return True

    def shared_redis(self) -> redis.Redis:
        """A client of the Redis every process shares."""
        return redis.Redis.from_url(self.env["REDIS_URL"])

    def _wait(self, predicate, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise RuntimeError(f"gave up waiting for {what} after {timeout_s:.0f}s")

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def exited(self) -> list[str]:
        """The children that are no longer running."""
        return [name for name, child in self.children.items() if child.process.poll() is not None]

    def describe(self) -> str:
        return "\n".join(f"  {child.name:<9} pid {child.pid:<7} {child.command}" for child in self.children.values())

    # ------------------------------------------------------------------------------------------------- stop
    def stop(self) -> None:
        """SIGTERM to every child (the GPU worker finishes or hands back its job), SIGKILL to any left after
        STOP_TIMEOUT_S; then the servers this process holds: nothing of the instance keeps running."""
        for child in reversed(list(self.children.values())):
            if child.process.poll() is None:
                child.process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in self.children.values():
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
            if child._pump is not None:
                child._pump.join(timeout=5)
        self.children.clear()
        if self._redis is not None:
            redis_client.stop_embedded(self._redis)
            self._redis = None
        if self._joined_database:
            db_server.leave(self.instance_dir)
            self._joined_database = False


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False
