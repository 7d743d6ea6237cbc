"""The embedded redis-server lives as long as the processes using it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from portraits.store import redis_client
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent

# Starts the embedded server, uses it the way a worker does (RQ's scheduler opens a pool of its own), prints the
# server's pid and exits normally.
USER_SCRIPT = """
import sys
from portraits.store import redis_client
from rq import Queue, SimpleWorker

client = redis_client.start_embedded(__import__("pathlib").Path(sys.argv[1]))
client.set("k", "v")
SimpleWorker([Queue("default", connection=client)], connection=client).work(burst=True, with_scheduler=True,
                                                                    logging_level="ERROR")
print(redis_client._embedded_servers[redis_client.socket_path(client)].pid, flush=True)
if len(sys.argv) > 2:
    import time
    print("ready", flush=True)
    time.sleep(60)
"""


def run_user(db_path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", USER_SCRIPT, str(db_path), *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def running(pid: int) -> bool:  # the server daemonizes, so init reaps it: no zombie to tell apart
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_process_that_started_the_embedded_server_stops_it_at_exit(tmp_path):
    user = run_user(tmp_path / "redis.db")
    pid = int(user.stdout.readline())
    assert user.wait(timeout=60) == 0
    wait_for(lambda: not running(pid), 30, "the embedded server to stop")


def test_a_server_another_process_still_uses_is_left_running(tmp_path):
    holder = run_user(tmp_path / "redis.db", "hold")  # starts the server and keeps using it
    try:
        pid = int(holder.stdout.readline())
        assert holder.stdout.readline().strip() == "ready"
        # A second process finds the same server through the same database file, uses it and exits.
        visitor = run_user(tmp_path / "redis.db")
        assert int(visitor.stdout.readline()) == pid and visitor.wait(timeout=60) == 0
        assert running(pid)
    finally:
        holder.kill()
        holder.wait()
        if running(pid):
            os.kill(pid, 9)


def test_the_embedded_redis_keeps_its_data_across_a_clean_stop_and_a_sigkill(tmp_path):
    client = redis_client.start_embedded(tmp_path / "durable.db")
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
    client.rpush("rq:queue:train", "train-a-1")
    redis_client.stop_embedded(client)

    client = redis_client.start_embedded(tmp_path / "durable.db")
    assert client.lrange("rq:queue:train", 0, -1) == [b"train-a-1"]
    client.rpush("rq:queue:train", "train-b-1")
    server_pid = int(client.info()["process_id"])
    wait_for(lambda: _aof_holds(tmp_path, b"train-b-1"), 30, "the AOF to be fsynced")
    os.kill(server_pid, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(server_pid)
             or psutil.Process(server_pid).status() == psutil.STATUS_ZOMBIE, 30, "the server to die")
    redis_client._embedded_servers.clear()  # what a new process after the crash starts with

    client = redis_client.start_embedded(tmp_path / "durable.db")
    assert client.lrange("rq:queue:train", 0, -1) == [b"train-a-1", b"train-b-1"]
    redis_client.stop_embedded(client)


def _aof_holds(directory, needle: bytes) -> bool:
    return any(needle in path.read_bytes() for path in directory.rglob("*.aof*") if path.is_file())
