"""prometheus_client's multiprocess mode as the Procfile runs it: processes sharing PROMETHEUS_MULTIPROC_DIR are
added up by one scrape, and gunicorn's child_exit hook (gunicorn.conf.py) forgets a dead worker's live gauges."""
from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from prometheus_client import generate_latest

from portraits import metrics

ROOT = Path(__file__).resolve().parent.parent


def run_in_process(directory: Path, code: str) -> str:
    """`code` in a fresh interpreter that writes its metrics to `directory`, as a gunicorn or RQ worker does."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def scrape(monkeypatch, directory: Path) -> str:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    return generate_latest(metrics.scrape_registry()).decode()


def test_one_scrape_adds_up_every_process_sharing_the_directory(tmp_path, monkeypatch):
    web = ("from portraits import metrics\n"
           "metrics.PAYMENT_CALLBACKS.labels(kind='payment', outcome='applied').inc()\n"
           "metrics.POLL_CACHE_HITS.inc(5)\n")
    gpu = ("from portraits import metrics\n"
           "metrics.TRAINING_SECONDS.labels(outcome='done').observe(400)\n"
           "metrics.PAYMENT_CALLBACKS.labels(kind='payment', outcome='applied').inc()\n")
    for code in (web, web, gpu):
        run_in_process(tmp_path, code)
    text = scrape(monkeypatch, tmp_path)
    assert 'portraits_payment_callbacks_total{kind="payment",outcome="applied"} 3.0' in text
    assert "portraits_poll_cache_hits_total 10.0" in text
    assert 'portraits_training_duration_seconds_count{outcome="done"} 1.0' in text
    assert 'portraits_training_duration_seconds_bucket{le="600.0",outcome="done"} 1.0' in text


def test_child_exit_drops_a_dead_workers_live_gauges_and_keeps_its_counters(tmp_path, monkeypatch):
    pid = run_in_process(tmp_path, (
        "import os\n"
        "from prometheus_client import Gauge\n"
        "from portraits import metrics\n"
        "Gauge('portraits_test_live', 'live only', multiprocess_mode='livesum').set(1)\n"
        "metrics.POLL_CACHE_MISSES.inc()\n"
        "print(os.getpid())\n"))
    assert "portraits_test_live 1.0" in scrape(monkeypatch, tmp_path)

    monkeypatch.setenv("EMBEDDED", "1")
    monkeypatch.setenv("INSTANCE_DIR", str(tmp_path / "instance"))
    config = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    config["child_exit"](server=None, worker=SimpleNamespace(pid=int(pid)))

    text = scrape(monkeypatch, tmp_path)
    assert "portraits_test_live 1.0" not in text
    assert "portraits_poll_cache_misses_total 1.0" in text


def test_gunicorn_accepts_the_config_file_and_the_procfile_app(tmp_path):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "PYTHONPATH": str(ROOT),
           "HF_HUB_OFFLINE": "1", "EMBEDDED": "1", "INSTANCE_DIR": str(tmp_path / "instance")}
    done = subprocess.run([str(Path(sys.executable).parent / "gunicorn"), "--check-config",
                           "--config", str(ROOT / "gunicorn.conf.py"), "miniapp_api:create_app()"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_gunicorn_writes_its_own_lines_as_json_and_leaves_access_lines_to_the_app(tmp_path):
    code = ("import logging, logging.config, runpy\n"
            "config = runpy.run_path('gunicorn.conf.py')\n"
            "logging.config.dictConfig(config['logconfig_dict'])\n"
            "logging.getLogger('gunicorn.error').info('Booting worker with pid: %s', 7)\n"
            "logging.getLogger('gunicorn.access').info('GET / 200')\n")
    env = {**os.environ, "EMBEDDED": "1", "INSTANCE_DIR": str(tmp_path / "instance"), "PYTHONPATH": str(ROOT)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(line["logger"], line["level"], line["message"]) for line in lines] == [
        ("gunicorn.error", "INFO", "Booting worker with pid: 7")]
