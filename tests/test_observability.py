"""Operations of the web and worker processes: request ids end to end, JSON log lines, probes, /metrics and the
events each metric counts."""
from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from rq.job import Job

from jobs import observability as job_observability
from jobs.worker import build_gpu_worker
from miniapp_api.dev.supervisor import free_port, simulator_environ
from portraits import logs, tasks
from portraits.billing import alerts, refunds
from portraits.queue.local_view import LocalView
from portraits.queue.tracking import QueueTracker
from portraits.store.redis_client import socket_path
from tests.money_support import paid_order, place_order, signed_notification, transaction_for

GENERATED = re.compile(r"[0-9a-f]{32}")
TOKEN = "scrape-me"


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def json_lines():
    """Every log line of the test, as the processes write them (portraits.logs.JsonFormatter)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(level)


# ------------------------------------------------------------------------------------------------ request ids

def test_a_plain_request_id_is_kept_and_answered_in_the_header_and_the_error_envelope(client):
    answer = client.get("/api/v1/no-such-route", headers={"X-Request-ID": "mp-7f3a:retry.2_x"})
    assert answer.status_code == 404
    assert answer.headers["X-Request-ID"] == "mp-7f3a:retry.2_x"
    assert answer.get_json()["error"]["request_id"] == "mp-7f3a:retry.2_x"


@pytest.mark.parametrize("offered", [None, "", "a" * 129, "two words", 'x"}, "level": "CRITICAL', "id\tforged", "请求"])
def test_a_missing_overlong_or_unsafe_request_id_is_replaced_by_a_generated_one(client, offered):
    headers = {} if offered is None else {"X-Request-ID": offered}
    answer = client.get("/api/v1/me/export", headers=headers)
    assert answer.status_code == 401
    request_id = answer.headers["X-Request-ID"]
    assert GENERATED.fullmatch(request_id)
    assert answer.get_json()["error"]["request_id"] == request_id


def test_every_answer_has_a_request_id_and_one_access_line_names_it(client, json_lines):
    answer = client.get("/livez", headers={"X-Request-ID": "probe-1"})
    assert answer.headers["X-Request-ID"] == "probe-1"
    access = [line for line in json_lines() if line["logger"] == "miniapp_api.access"]
    assert [(line["request_id"], line["method"], line["path"], line["status"]) for line in access] == [
        ("probe-1", "GET", "/livez", 200)]
    assert isinstance(access[0]["duration_ms"], float)


def test_a_payment_callback_carries_its_request_id_into_the_training_job_and_is_counted(app, client, services, sim,
                                                                                       simulator):
    _, avatar, order = place_order(services, sim, "carol")
    headers, body = signed_notification(simulator.creds, transaction_for(order, simulator.creds))
    applied = sample("portraits_payment_callbacks_total", kind="payment", outcome="applied")
    duplicate = sample("portraits_payment_callbacks_total", kind="payment", outcome="duplicate")
    assert client.post("/api/v1/pay/notify", data=body, headers={**headers, "X-Request-ID": "wxpay-1"}).status_code == 204
    assert client.post("/api/v1/pay/notify", data=body, headers=headers).status_code == 204

    job_id = QueueTracker(services.redis).subject(f"avatar:{avatar['_id']}")["job_id"]
    assert Job.fetch(job_id, connection=services.redis).meta[logs.REQUEST_ID_META] == "wxpay-1"
    assert sample("portraits_payment_callbacks_total", kind="payment", outcome="applied") == applied + 1
    assert sample("portraits_payment_callbacks_total", kind="payment", outcome="duplicate") == duplicate + 1


def test_a_refused_callback_is_counted_by_its_code_and_its_body_has_the_request_id(client, services, sim, simulator):
    _, _, order = place_order(services, sim, "dave")
    headers, body = signed_notification(simulator.creds, transaction_for(order, simulator.creds))
    before = sample("portraits_payment_callbacks_total", kind="payment", outcome="bad_signature")
    answer = client.post("/api/v1/pay/notify", data=body.replace(b"{", b"{ ", 1),
                         headers={**headers, "X-Request-ID": "forged-1"})
    assert answer.status_code == 401 and answer.get_json()["error"]["code"] == "bad_signature"
    assert answer.get_json()["error"]["request_id"] == "forged-1"
    assert sample("portraits_payment_callbacks_total", kind="payment", outcome="bad_signature") == before + 1


def test_a_worker_writes_json_lines_with_the_job_and_the_request_that_enqueued_it(services, drain, json_lines):
    token = logs.bind(request_id="req-42")
    try:
        tasks.enqueue(services, tasks.DEFAULT, "logging.warning", "the job speaks", job_id="logging-job")
    finally:
        logs.unbind(token)
    assert Job.fetch("logging-job", connection=services.redis).meta == {logs.REQUEST_ID_META: "req-42"}
    drain()
    spoken = [line for line in json_lines() if line["message"] == "the job speaks"]
    assert spoken and spoken[0]["request_id"] == "req-42" and spoken[0]["job_id"] == "logging-job"
    assert spoken[0]["level"] == "WARNING" and spoken[0]["logger"] == "root"
    assert logs.current_request_id() is None  # unbound again once the job is done


def test_a_json_line_has_time_level_logger_message_request_id_extra_fields_and_the_traceback():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("portraits.x").makeRecord("portraits.x", logging.ERROR, __file__, 1,
                                                              "failed %s", ("once",), exc_info=sys.exc_info(),
                                                              extra={"order_id": "o_1"})
    token = logs.bind(request_id="r-1")
    try:
        line = json.loads(logs.JsonFormatter().format(record))
    finally:
        logs.unbind(token)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", line.pop("time"))
    assert "ValueError: boom" in line.pop("exception")
    assert line == {"level": "ERROR", "logger": "portraits.x", "message": "failed once", "request_id": "r-1",
                    "order_id": "o_1"}


# ------------------------------------------------------------------------------------------------ probes

def test_livez_answers_and_readyz_checks_mongodb_redis_and_the_catalog(client, services, monkeypatch):
    assert client.get("/livez").get_json() == {"ok": True}
    assert client.get("/readyz").get_json() == {"ok": True, "checks": {"mongodb": "ok", "redis": "ok",
                                                                       "catalog": "ok"}}
    assert client.get("/healthz").get_json() == {"ok": True}

    def refused():
        raise ConnectionError("redis is away")

    monkeypatch.setattr(services.redis, "ping", refused)
    monkeypatch.setattr(services, "catalog", [])
    answer = client.get("/readyz")
    assert answer.status_code == 503
    checks = answer.get_json()["checks"]
    assert checks["mongodb"] == "ok" and "redis is away" in checks["redis"] and "no portrait templates" in checks["catalog"]
    assert client.get("/livez").status_code == 200


def test_a_worker_is_ready_only_while_a_worker_of_its_kind_is_registered_from_this_host(services):
    check = lambda kind: job_observability.worker_readiness(services.db, services.redis, services.catalog, kind)  # noqa: E731
    assert "no gpu worker" in check("gpu")["worker"]
    worker = build_gpu_worker(services.redis, services.settings)
    worker.register_birth()
    try:
        assert check("gpu") == {"mongodb": "ok", "redis": "ok", "catalog": "ok", "worker": "ok"}
        assert "no default worker" in check("default")["worker"]
        assert "no gpu worker" in job_observability.worker_readiness(
            services.db, services.redis, services.catalog, "gpu", hostname="another-host")["worker"]
    finally:
        worker.register_death()
    assert "no gpu worker" in check("gpu")["worker"]


# `python -m jobs.worker <kind> --check` as compose's healthcheck runs it: its own process, production's settings.
ROOT = Path(__file__).resolve().parent.parent
PROBE_TIMEOUT_S = 120


@pytest.fixture
def probe(tmp_path, simulator, redis_server, database_server):
    """Run the probe in a process of its own on the session's Redis, database server and WeChat (the simulator)."""
    environ = {**os.environ, "EMBEDDED": "1", "INSTANCE_DIR": str(tmp_path / "instance"), "HF_HUB_OFFLINE": "1",
               "MONGO_URI": database_server, "REDIS_URL": f"unix://{socket_path(redis_server)}",
               **simulator_environ(simulator.creds, simulator.base_url, tmp_path, {})}

    def run(kind: str, code_dir: Path = ROOT, **changes) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "jobs.worker", kind, "--check"], cwd=code_dir,
                              env={**environ, "PYTHONPATH": str(code_dir), **changes},
                              capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)

    return run


def test_the_worker_probe_process_exits_0_while_its_worker_is_registered_and_1_without(services, probe):
    worker = build_gpu_worker(services.redis, services.settings)
    worker.register_birth()
    try:
        ready = probe("gpu")
    finally:
        worker.register_death()
    assert ready.returncode == 0, ready.stderr
    assert json.loads(ready.stdout) == {"mongodb": "ok", "redis": "ok", "catalog": "ok", "worker": "ok"}
    unregistered = probe("default")
    assert unregistered.returncode == 1
    assert "default worker not ready: worker: LookupError: no default worker" in unregistered.stderr


def test_the_worker_probe_process_fails_naming_redis_when_redis_is_unreachable(services, probe):
    away = probe("gpu", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    assert away.returncode == 1
    checks = json.loads(away.stdout)
    assert checks["mongodb"] == "ok" and checks["catalog"] == "ok"
    assert checks["redis"].startswith("ConnectionError") and "Connection refused" in checks["redis"]
    assert "gpu worker not ready: redis: ConnectionError" in away.stderr
    assert "Traceback" not in away.stderr


def test_the_worker_probe_process_fails_naming_the_catalog_when_the_templates_are_missing(services, probe, tmp_path):
    image = tmp_path / "image"  # the code as an image built without templates/ would hold it
    for package in ("jobs", "portraits", "models"):
        shutil.copytree(ROOT / package, image / package, ignore=shutil.ignore_patterns("__pycache__"))
    missing = probe("default", code_dir=image)
    assert missing.returncode == 1, missing.stderr
    checks = json.loads(missing.stdout)
    assert checks["mongodb"] == "ok" and checks["redis"] == "ok"
    assert checks["catalog"] == f"CatalogError: {image / 'templates'}: catalog directory does not exist"
    assert "default worker not ready: catalog: CatalogError" in missing.stderr


def test_the_worker_probe_process_refuses_an_unset_redis_url_with_a_message(services, probe):
    unset = probe("gpu", REDIS_URL="")
    assert unset.returncode == 2
    assert "REDIS_URL is unset" in unset.stderr and "Traceback" not in unset.stderr


# ------------------------------------------------------------------------------------------------ /metrics

def test_metrics_answer_404_while_no_token_is_set(client):
    assert client.get("/metrics").status_code == 404
    assert client.get("/metrics", headers={"Authorization": "Bearer "}).status_code == 404


@pytest.mark.parametrize("settings_overrides", [{"metrics_token": TOKEN}])
def test_metrics_need_the_token_and_show_the_counters_and_the_queue_gauges(client, services):
    assert client.get("/metrics").status_code == 404
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 404
    tasks.enqueue(services, tasks.TRAIN, tasks.TRAIN_AVATAR, "av_x", job_id="train-av_x", subject="avatar:av_x")
    QueueTracker(services.redis).worker_alive(tasks.GPU_QUEUES, "gpu-1", ttl_s=60)

    answer = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200 and answer.content_type.startswith("text/plain; version=")
    text = answer.get_data(as_text=True)
    assert 'portraits_gpu_queue_waiting{queue="train"} 1.0' in text
    assert 'portraits_gpu_queue_waiting{queue="render"} 0.0' in text
    assert 'portraits_gpu_workers_live{queue="render"} 1.0' in text
    for name in ("portraits_payment_callbacks_total", "portraits_refunds_finished_total",
                 "portraits_payment_alerts_total", "portraits_training_duration_seconds",
                 "portraits_render_duration_seconds", "portraits_poll_cache_hits_total",
                 "portraits_poll_cache_misses_total", "portraits_gpu_queue_running"):
        assert f"# TYPE {name}" in text, name


@pytest.mark.parametrize("settings_overrides", [{"metrics_token": TOKEN}])
def test_a_worker_serves_the_same_metrics_behind_the_same_token(services):
    app = job_observability.metrics_app(TOKEN)
    statuses = []
    start = lambda status, headers: statuses.append(status)  # noqa: E731
    assert app({"HTTP_AUTHORIZATION": "Bearer wrong", "REQUEST_METHOD": "GET", "PATH_INFO": "/metrics"}, start) == [
        b"not found\n"]
    body = b"".join(app({"HTTP_AUTHORIZATION": f"Bearer {TOKEN}", "REQUEST_METHOD": "GET", "PATH_INFO": "/metrics",
                         "QUERY_STRING": ""}, start))
    assert statuses[0].startswith("404") and statuses[1].startswith("200")
    assert b"# TYPE portraits_training_duration_seconds histogram" in body


def test_a_refund_is_counted_once_by_its_final_state_and_an_alert_once_however_often_seen(app, services, sim):
    order = paid_order(services, sim, "erin")
    refund = refunds.request_refund(services, order["_id"], reason="training_failed")["refunds"][0]
    before = sample("portraits_refunds_finished_total", state="SUCCESS")
    for _ in range(2):  # the refund API's answer, then the callback: one refund
        refunds.apply_refund_result(services, {"out_refund_no": refund["out_refund_no"], "status": "SUCCESS"},
                                    source="test")
    assert sample("portraits_refunds_finished_total", state="SUCCESS") == before + 1

    alerted = sample("portraits_payment_alerts_total", kind="amount_mismatch")
    for _ in range(3):
        alerts.alert(services, order["_id"], "amount_mismatch", key="tx-1", source="test")
    assert sample("portraits_payment_alerts_total", kind="amount_mismatch") == alerted + 1


def test_poll_cache_hits_and_misses_are_counted(services):
    services.redis.set("poll-metric-key", "1")
    view = LocalView.of(services.redis)
    hits, misses = sample("portraits_poll_cache_hits_total"), sample("portraits_poll_cache_misses_total")
    view.read([("text", "poll-metric-key")])
    view.read([("text", "poll-metric-key")])
    assert sample("portraits_poll_cache_misses_total") == misses + 1
    assert sample("portraits_poll_cache_hits_total") == hits + 1


def test_a_training_and_a_render_are_timed_by_outcome(paid_avatar, drain):
    trained = sample("portraits_training_duration_seconds_count", outcome="done")
    api, avatar, _ = paid_avatar("frank")
    drain()
    assert api.get(f"/api/v1/avatars/{avatar['id']}").get_json()["state"] == "trained"
    assert sample("portraits_training_duration_seconds_count", outcome="done") == trained + 1
    assert sample("portraits_training_duration_seconds_sum", outcome="done") > 0
