"""What operations need of the worker processes and the clock: JSON logs, error reporting, readiness, /metrics.

- Logs: JSON lines (portraits.logs); while a job runs every line carries its `job_id` and the `request_id` of the
  request that enqueued it (JobLogContext, mixed into the workers of jobs.worker).
- Sentry's RQ integration when SENTRY_DSN is set (portraits.reporting scrubs every event).
- Readiness, for a Kubernetes exec probe: `python -m jobs.worker <kind> --check` exits 0 when MongoDB and Redis
  answer, the catalog loads, and a worker of that kind is registered in Redis from this host (RQ renews the
  registration on every heartbeat and lets it expire when the worker dies; a GPU worker registers only once its base
  pipeline is loaded). It prints the checks as JSON.
- WORKER_METRICS_PORT: the worker serves /metrics (same METRICS_TOKEN) for a worker in a container of its own.
"""
from __future__ import annotations

import socket
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from rq import Worker
from sentry_sdk.integrations.rq import RqIntegration

from portraits import health, logs, metrics, reporting, tasks
from portraits.catalog import load_catalog
from portraits.services import TEMPLATES_DIR
from portraits.store import db as db_module, redis_client

KIND_QUEUES = {"gpu": tasks.GPU_WORKER_QUEUES, "preview": (tasks.PREVIEW,), "default": (tasks.DEFAULT,),
               "intake": (tasks.INTAKE,)}


class JobLogContext:
    """Worker mixin: while a job runs, every log line names the job and the request that enqueued it."""

    def execute_job(self, job, queue):
        token = logs.bind(job_id=job.id, request_id=job.meta.get(logs.REQUEST_ID_META))
        try:
            return super().execute_job(job, queue)
        finally:
            logs.unbind(token)


def start(settings, serve_metrics: bool = True) -> None:
    """At the start of a worker or clock process."""
    logs.configure_logging(settings.log_level)
    reporting.init_error_reporting(settings.sentry_dsn, settings.sentry_environment, [RqIntegration()])
    if serve_metrics and settings.worker_metrics_port:
        serve_worker_metrics(settings.worker_metrics_port, settings.metrics_token)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):  # scrapes are not worth a log line each
        pass


def metrics_app(token: str):
    """The worker's /metrics as a WSGI app: the token checked as the web's is, 404 without it."""
    exposition = make_wsgi_app(metrics.scrape_registry())

    def app(environ, start_response):
        if not metrics.scrape_allowed(token, environ.get("HTTP_AUTHORIZATION")):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        return exposition(environ, start_response)

    return app


def serve_worker_metrics(port: int, token: str):
    server = make_server("0.0.0.0", port, metrics_app(token), handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    return server


def worker_registered_here(redis, kind: str, hostname: str | None = None) -> None:
    hostname = hostname or socket.gethostname()
    wanted = set(KIND_QUEUES[kind])
    for worker in Worker.all(connection=redis):
        if worker.hostname == hostname and wanted & set(worker.queue_names()):
            return
    raise LookupError(f"no {kind} worker of host {hostname} is registered in Redis")


def worker_readiness(db, redis, catalog, kind: str, hostname: str | None = None) -> dict[str, str]:
    checks = health.readiness(db, redis, catalog)
    checks["worker"] = health.outcome_of(lambda: worker_registered_here(redis, kind, hostname))
    return checks


def check_worker(settings, kind: str) -> dict[str, str]:
    """The probe's own connections: no indexes built, no sweep, nothing loaded but the catalog. Redis is given the
    probe's timeout, so an unreachable host fails the check instead of outlasting the prober."""
    db = db_module.connect(settings)
    redis = redis_client.connect(settings.redis_url, settings.instance_dir, timeout_s=health.PING_TIMEOUT_S)
    loaded = []
    catalog_outcome = health.outcome_of(lambda: loaded.append(load_catalog(TEMPLATES_DIR)))
    checks = worker_readiness(db, redis, loaded[0] if loaded else None, kind)
    if catalog_outcome != health.OK:
        checks["catalog"] = catalog_outcome
    return checks
