"""Readiness: can this process do its work now? MongoDB answers a ping, Redis answers a ping, the catalog is loaded.

The web process answers it at /readyz (miniapp_api.observability); a worker is checked by
`python -m jobs.worker <kind> --check`, which adds that a worker of that kind is registered from this host.
Liveness is only "the process answers" (/livez): a dependency that is down makes a process unready, never killed.
"""
from __future__ import annotations

import pymongo

OK = "ok"
# A probe must answer within the prober's own timeout (Kubernetes: 1 s by default, set it to a few seconds).
PING_TIMEOUT_S = 2.0


def outcome_of(check) -> str:
    """"ok" when `check()` returns, else what it raised."""
    try:
        check()
    except Exception as error:  # any failure makes the process unready; the message says which
        return f"{type(error).__name__}: {error}"[:300]
    return OK


def _ping_mongo(db) -> None:
    with pymongo.timeout(PING_TIMEOUT_S):
        db.command("ping")


def _catalog_loaded(catalog) -> None:
    if catalog is None or len(catalog) == 0:
        raise LookupError("no portrait templates loaded")


def readiness(db, redis, catalog) -> dict[str, str]:
    """{"mongodb": ..., "redis": ..., "catalog": ...}: "ok", or what failed."""
    return {"mongodb": outcome_of(lambda: _ping_mongo(db)),
            "redis": outcome_of(redis.ping),
            "catalog": outcome_of(lambda: _catalog_loaded(catalog))}


def is_ready(checks: dict[str, str]) -> bool:
    return all(state == OK for state in checks.values())
