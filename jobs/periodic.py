"""Periodic work, enqueued by RQ's cron scheduler (Procfile `clock`) and run by the default worker.

    python -m jobs.periodic
"""
from __future__ import annotations

import logging

from rq.cron import CronScheduler

from jobs import observability
from jobs.maintenance import purge_stale_avatars, sweep_owed_work
from jobs.reconcile import expire_orders, reconcile
from jobs.recovery import REAP_INTERVAL_S, reap_lost_jobs
from portraits import sweeper, tasks
from portraits.config import ConfigError, Settings
from portraits.services import build_services

# (function, interval in seconds). Each runs on the default queue; every one of them is idempotent. RQ enqueues each
# by its dotted name, so none may be defined in this module, which runs as __main__ in the clock process.
PERIODIC = [
    (purge_stale_avatars, 3600),
    (expire_orders, 60),
    (reconcile, 120),
    (reap_lost_jobs, REAP_INTERVAL_S),
    (sweep_owed_work, sweeper.SWEEP_INTERVAL_S),
]


def build_scheduler(services) -> CronScheduler:
    scheduler = CronScheduler(connection=services.redis, logging_level=logging.WARNING)
    for func, interval in PERIODIC:
        if func.__module__ == "__main__":
            raise ValueError(f"{func.__name__}: a periodic task must live in a module workers can import")
        scheduler.register(func, tasks.DEFAULT, interval=interval, job_timeout=tasks.TIMEOUTS[tasks.DEFAULT])
    return scheduler


def main() -> None:
    try:
        settings = Settings.from_env()
    except ConfigError as error:
        raise SystemExit(f"jobs.periodic: {error}")
    observability.start(settings, serve_metrics=False)
    services = build_services(settings)
    build_scheduler(services).start()


if __name__ == "__main__":
    main()
