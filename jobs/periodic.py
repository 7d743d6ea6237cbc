"""Periodic work, enqueued by RQ's cron scheduler (Procfile `clock`) and run by the default worker.

    python -m jobs.periodic
"""
from __future__ import annotations

import logging

from rq.cron import CronScheduler

from jobs import context, queues
from jobs.reconcile import expire_orders, reconcile
from jobs.recovery import REAP_INTERVAL_S, reap_lost_jobs


def purge_stale_avatars() -> int:
    from miniapp_api.privacy import purge_stale_collecting

    return purge_stale_collecting(context.services())


# (function, interval in seconds). Each runs on the default queue; every one of them is idempotent.
PERIODIC = [
    (purge_stale_avatars, 3600),
    (expire_orders, 60),
    (reconcile, 120),
    (reap_lost_jobs, REAP_INTERVAL_S),
]


def build_scheduler(services) -> CronScheduler:
    scheduler = CronScheduler(connection=services.redis, logging_level=logging.WARNING)
    for func, interval in PERIODIC:
        scheduler.register(func, queues.DEFAULT, interval=interval, job_timeout=queues.TIMEOUTS[queues.DEFAULT])
    return scheduler


def main() -> None:
    from miniapp_api.config import Settings
    from miniapp_api.services import build_services

    logging.basicConfig(level=logging.INFO)
    services = build_services(Settings.from_env())
    build_scheduler(services).start()


if __name__ == "__main__":
    main()
