"""What operations need of the web process: request ids and access lines, probes, /metrics, error reporting.

- Every request gets an id: the caller's `X-Request-ID` when it is plain and short (portraits.logs), else a new one.
  It is bound to every log line of the request, copied into the meta of any job the request enqueues, answered in
  the `X-Request-ID` response header and in every error envelope (`error.request_id`).
- One access line per request (logger `miniapp_api.access`: method, path without the query, status, duration_ms);
  gunicorn's own access log is off (gunicorn.conf.py), it cannot know the request id.
- `/livez`: the process answers. `/readyz`: MongoDB, Redis and the catalog (portraits.health), 503 naming what failed.
- `/metrics`: Prometheus text format, only with `Authorization: Bearer <METRICS_TOKEN>` (404 otherwise, and while no
  token is set): the counters of every process sharing PROMETHEUS_MULTIPROC_DIR plus the queue gauges from Redis.
- Sentry's Flask integration when SENTRY_DSN is set (portraits.reporting scrubs every event).
"""
from __future__ import annotations

import logging
import time

from flask import Blueprint, Flask, Response, abort, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sentry_sdk.integrations.flask import FlaskIntegration

from portraits import health, logs, metrics, reporting, tasks

REQUEST_ID_HEADER = "X-Request-ID"
access_log = logging.getLogger("miniapp_api.access")

bp = Blueprint("operations", __name__)


def _services():
    return current_app.extensions["portraits"]


@bp.get("/livez")
def livez():
    return {"ok": True}


@bp.get("/readyz")
def readyz():
    services = _services()
    checks = health.readiness(services.db, services.redis, services.catalog)
    ready = health.is_ready(checks)
    return {"ok": ready, "checks": checks}, 200 if ready else 503


@bp.get("/metrics")
def metrics_exposition():
    services = _services()
    if not metrics.scrape_allowed(services.settings.metrics_token, request.headers.get("Authorization")):
        abort(404)
    registry = metrics.scrape_registry(lambda: tasks.gpu_queue_counts(services))
    return Response(generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _bind_request_id():
    g.request_started = time.monotonic()
    g.request_id = logs.accepted_request_id(request.headers.get(REQUEST_ID_HEADER))
    g.log_context = logs.bind(request_id=g.request_id)


def _answer_request_id(response):
    request_id = g.get("request_id")
    if request_id:
        response.headers[REQUEST_ID_HEADER] = request_id
    started = g.get("request_started")
    duration_ms = round((time.monotonic() - started) * 1000, 1) if started is not None else None
    access_log.info("%s %s %s", request.method, request.path, response.status_code,
                    extra={"method": request.method, "path": request.path, "status": response.status_code,
                           "duration_ms": duration_ms})
    return response


def _unbind_request_id(_error):
    token = g.pop("log_context", None)
    if token is not None:
        logs.unbind(token)


def init_app(app: Flask, services) -> None:
    # First of all before_request functions, so that an answer given by an earlier one (a rate limit) has its id.
    app.before_request_funcs.setdefault(None, []).insert(0, _bind_request_id)
    app.after_request(_answer_request_id)
    app.teardown_request(_unbind_request_id)
    app.register_blueprint(bp)
    reporting.init_error_reporting(services.settings.sentry_dsn, services.settings.sentry_environment,
                                   [FlaskIntegration()])
