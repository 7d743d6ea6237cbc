"""gunicorn's settings for the `web` process (Procfile: `gunicorn --config gunicorn.conf.py ...`).

Logs: JSON lines on stderr through portraits.logs, gunicorn's own lines included. gunicorn's access log is off:
the app writes one access line per request itself (miniapp_api.observability), with the request id gunicorn
cannot see.

Metrics: with PROMETHEUS_MULTIPROC_DIR set, every gunicorn worker writes its metrics to files of its own in that
directory and /metrics adds them up. When a worker exits, `child_exit` tells prometheus_client, which drops the
worker's files of gauges that only count live processes (`multiprocess_mode="live*"`); its counters and histograms
stay, so nothing already counted goes backwards. The directory must be empty when gunicorn starts (a tmpfs, or
emptied by the process manager): it is never emptied here, since RQ workers of the same machine share it.
"""
from prometheus_client import multiprocess

from portraits.config import Settings
from portraits.logs import DOCUMENT_QUOTING_LOGGERS
from portraits.metrics import multiprocess_dir

_settings = Settings.from_env()  # also refuses to start the master on a bad or missing setting
_level = _settings.log_level

# Threads, so that a queue poll is not stuck behind an upload in its worker (bench/bench_upload_storm.py).
worker_class = "gthread"
threads = _settings.web_threads

logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "portraits.logs.JsonFormatter"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
    "root": {"level": _level, "handlers": ["stderr"]},
    "loggers": {
        "gunicorn.error": {"level": _level, "handlers": [], "propagate": True},
        "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
        **{name: {"level": held_at} for name, held_at in DOCUMENT_QUOTING_LOGGERS.items()},
    },
}


def child_exit(server, worker):
    if multiprocess_dir():
        multiprocess.mark_process_dead(worker.pid)
