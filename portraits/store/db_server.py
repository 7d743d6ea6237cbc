"""The embedded database server: SecantusDB run as a separate process, shared by an instance's processes over TCP.

SecantusDB is GPL-2.0-only, so it is never imported into our processes: its `secantusd-py` command runs as a server
on a local port and everyone talks MongoDB's wire protocol to it through plain pymongo, as to a MongoDB server.
Modelled on the embedded Redis (redis_client.py):

- the first process of an instance starts it, data in `INSTANCE_DIR/secantus/data`, its log in `server.log`, and
  records its pid and port in `server.json`; the instance's other processes find it there and connect;
- every process using it leaves a file named by its pid in `users/`; at exit it removes its own and forgets those
  of dead processes, and the last one stops the server (SIGTERM: WiredTiger closes its files cleanly);
- a server that died (SIGKILL, a reboot) is started again on the same data and the same port, so the clients the
  other processes hold reconnect to it by themselves.

Every decision is taken under one file lock, so two processes starting at once start one server.
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

SERVER_COMMAND = "secantusd-py"
HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
_LISTENING = re.compile(r"secantus listening on \S+?:(\d+)")
_joined: set[Path] = set()  # instances this process counts as a user of (one exit hook each)


@dataclass(frozen=True)
class ServerFiles:
    """Where one instance's server keeps its state."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    @property
    def registry(self) -> Path:
        return self.root / "server.json"

    @property
    def config(self) -> Path:
        return self.root / "secantusd.toml"

    @property
    def users(self) -> Path:
        return self.root / "users"


def server_files(instance_dir: Path) -> ServerFiles:
    return ServerFiles(Path(instance_dir) / "secantus")


def uri(port: int) -> str:
    return f"mongodb://{HOST}:{port}/?directConnection=true"


def join(instance_dir: Path) -> str:
    """The URI of the instance's server, started if none is running; this process uses it until it exits."""
    files = server_files(instance_dir)
    with _locked(files):
        port = _running_port(files) or _start(files)
        files.users.mkdir(exist_ok=True)
        (files.users / str(os.getpid())).touch()
    if files.root not in _joined:
        _joined.add(files.root)
        atexit.register(leave, instance_dir)
    return uri(port)


def leave(instance_dir: Path) -> None:
    """This process no longer uses the server; the last user stops it."""
    files = server_files(instance_dir)
    _joined.discard(files.root)
    with _locked(files):
        (files.users / str(os.getpid())).unlink(missing_ok=True)
        if not _live_users(files):
            _stop(files)


def server_pid(instance_dir: Path) -> int | None:
    """The pid of the instance's running server, if one runs."""
    files = server_files(instance_dir)
    with _locked(files):
        return _read_registry(files).get("pid") if _running_port(files) else None


def restart(instance_dir: Path, kill: bool = False) -> str:
    """Stop the server (SIGKILL with `kill`, as a crash would) and start it again on the same data and port."""
    files = server_files(instance_dir)
    with _locked(files):
        _stop(files, sig=signal.SIGKILL if kill else signal.SIGTERM, forget=False)
        return uri(_start(files))


def stop(instance_dir: Path) -> None:
    """Stop the instance's server, whoever still uses it (a test that owns it outright)."""
    files = server_files(instance_dir)
    with _locked(files):
        _stop(files)
        shutil.rmtree(files.users, ignore_errors=True)


@contextlib.contextmanager
def _locked(files: ServerFiles):
    files.root.mkdir(parents=True, exist_ok=True)
    with open(files.root / "lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_registry(files: ServerFiles) -> dict:
    try:
        return json.loads(files.registry.read_text())
    except (OSError, ValueError):
        return {}


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=2):
            return True
    except OSError:
        return False


def _running_port(files: ServerFiles) -> int | None:
    """The port of the recorded server if it is alive and accepts connections; a hung one is stopped."""
    recorded = _read_registry(files)
    if not _alive(recorded.get("pid")):
        return None
    if _accepts(recorded["port"]):
        return recorded["port"]
    _stop(files, forget=False)
    return None


def _live_users(files: ServerFiles) -> list[int]:
    live = []
    for entry in files.users.glob("*") if files.users.is_dir() else ():
        if entry.name.isdigit() and _alive(int(entry.name)):
            live.append(int(entry.name))
        else:
            entry.unlink(missing_ok=True)
    return live


def _server_command() -> str:
    beside_python = Path(sys.executable).parent / SERVER_COMMAND  # the virtualenv's, when run from one
    found = str(beside_python) if beside_python.exists() else shutil.which(SERVER_COMMAND)
    if not found:
        raise RuntimeError(f"{SERVER_COMMAND} not found: install SecantusDB (requirements.txt), or set MONGO_URI")
    return found


def _start(files: ServerFiles) -> int:
    """Start a server on the recorded port (so other processes' clients find it again), else on a free one."""
    files.data.mkdir(parents=True, exist_ok=True)
    files.config.write_text("# empty on purpose: no secantusd.toml of the machine or the user is picked up\n")
    wanted = _read_registry(files).get("port", 0)
    try:
        return _launch(files, wanted)
    except RuntimeError:
        if not wanted:
            raise
        return _launch(files, 0)  # the old port was taken meanwhile


def _launch(files: ServerFiles, port: int) -> int:
    offset = files.log.stat().st_size if files.log.exists() else 0
    with open(files.log, "ab") as log:
        process = subprocess.Popen(
            [_server_command(), "--config", str(files.config), "--host", HOST, "--port", str(port),
             "--storage-path", str(files.data), "--log-level", "INFO", "--standalone"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)  # a Ctrl-C to the terminal reaches our processes; the last of them stops it
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        with open(files.log, "rb") as log:
            log.seek(offset)
            found = _LISTENING.search(log.read().decode(errors="replace"))
        if found and _accepts(int(found.group(1))):
            files.registry.write_text(json.dumps({"pid": process.pid, "port": int(found.group(1))}))
            return int(found.group(1))
        if process.poll() is not None:
            raise RuntimeError(f"{SERVER_COMMAND} exited with {process.returncode}; see {files.log}")
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"{SERVER_COMMAND} did not start within {START_TIMEOUT_S:.0f}s; see {files.log}")


def _stop(files: ServerFiles, sig: int = signal.SIGTERM, forget: bool = True) -> None:
    """Stop the recorded server and wait for it; `forget` also drops its port (a restart keeps it)."""
    recorded = _read_registry(files)
    if _alive(recorded.get("pid")):
        try:
            process = psutil.Process(recorded["pid"])
            process.send_signal(sig)
            # waiting reaps it too when this process started it (no zombie left behind)
            _, still = psutil.wait_procs([process], timeout=STOP_TIMEOUT_S)
            for left in still:
                left.kill()
            psutil.wait_procs(still, timeout=STOP_TIMEOUT_S)
        except psutil.NoSuchProcess:
            pass
    if forget:
        files.registry.unlink(missing_ok=True)
    elif recorded:
        files.registry.write_text(json.dumps({"port": recorded.get("port", 0)}))
