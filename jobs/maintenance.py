"""Periodic upkeep tasks of the domain, run on the default queue (RQ imports them here by their dotted names).

They live apart from `jobs.periodic` because that module runs as `__main__` in the `clock` process, and RQ refuses
to enqueue a function of `__main__` (a worker could never import it).
"""
from __future__ import annotations

from jobs import context
from portraits import privacy, sweeper


def purge_stale_avatars() -> int:
    return privacy.purge_stale_collecting(context.services())


def sweep_owed_work() -> dict:
    return sweeper.sweep(context.services())
