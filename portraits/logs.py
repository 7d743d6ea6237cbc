"""Structured logs: one JSON object a line, and the request id that ties a request to the jobs it enqueued.

Every line has `time` (UTC, ISO 8601), `level`, `logger`, `message` and `request_id` (null when no request or job is
being handled), then the fields of the log context (`job_id` in a worker) and whatever the call passed as
`extra={...}`; a traceback comes as `exception`. The web process binds the request id for the length of a request
(miniapp_api.observability), `tasks.enqueue` copies it into the job's meta, and the worker binds it again while it
runs that job (jobs.worker), so one grep finds the request and everything it caused.
"""
from __future__ import annotations

import contextvars
import json
import logging
import re
import uuid
from datetime import datetime, timezone

REQUEST_ID_META = "request_id"  # the job-meta field that carries it into the worker
REQUEST_ID_MAX_LENGTH = 128
# What a caller's X-Request-ID may hold: enough for UUIDs and most tracing ids, nothing that could forge a log field.
_SAFE_REQUEST_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{REQUEST_ID_MAX_LENGTH}}}")

_context: contextvars.ContextVar[dict] = contextvars.ContextVar("log_context", default={})

# The attributes every LogRecord has; anything else on a record came from `extra=` and is written as a field.
_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def new_request_id() -> str:
    return uuid.uuid4().hex


def accepted_request_id(offered: str | None) -> str:
    """The caller's id when it is short and plain, else a new one (never an error: the id is ours to keep)."""
    if offered and _SAFE_REQUEST_ID.fullmatch(offered):
        return offered
    return new_request_id()


def bind(**fields) -> contextvars.Token:
    """Add fields to every log line of this context (thread or task) until `unbind(token)`."""
    return _context.set({**_context.get(), **fields})


def unbind(token: contextvars.Token) -> None:
    _context.reset(token)


def current_request_id() -> str | None:
    return _context.get().get("request_id")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": None,
            **_context.get(),
        }
        line.update({key: value for key, value in vars(record).items() if key not in _RECORD_FIELDS})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


# Libraries whose DEBUG lines quote our documents whole (pymongo's command log: user ids, openids, phone numbers in
# every filter and reply): held at these levels whatever LOG_LEVEL says (here and in gunicorn.conf.py).
DOCUMENT_QUOTING_LOGGERS = {"pymongo": "INFO"}


def configure_logging(level: str = "INFO") -> None:
    """JSON lines on stderr for every logger of the process (RQ's and gunicorn's propagate to the root)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name, held_at in DOCUMENT_QUOTING_LOGGERS.items():
        logging.getLogger(name).setLevel(held_at)
