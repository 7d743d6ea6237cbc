"""The Services a job runs with. Jobs carry ids only; the worker process installs its Services at start-up."""
from __future__ import annotations

_services = None


def install(services) -> None:
    global _services
    _services = services


def services():
    if _services is None:
        raise RuntimeError("no Services installed in this process: start workers through jobs.worker")
    return _services
