"""Worker processes.

    python -m jobs.worker gpu       one per GPU (pin it with CUDA_VISIBLE_DEVICES); renders before trainings
    python -m jobs.worker default   refunds, notifications, periodic work; runs RQ's scheduler for retry backoff

The GPU worker never forks: a forked work horse deadlocks when the parent has used multi-threaded torch, and
forking would also throw away the resident base pipeline. A heartbeat thread keeps the worker and its job alive
while the main thread is busy in a long training.
"""
from __future__ import annotations

import argparse
import logging
import threading

from rq import SimpleWorker
from rq.timeouts import TimerDeathPenalty

from jobs import context, queues


class ResidentModelWorker(SimpleWorker):
    def execute_job(self, job, queue):
        stop = threading.Event()
        beat = threading.Thread(target=self._beat_while_running, args=(job, stop), daemon=True,
                                name="heartbeat")
        beat.start()
        try:
            super().execute_job(job, queue)
        finally:
            stop.set()
            beat.join()

    def _beat_while_running(self, job, stop: threading.Event) -> None:
        while not stop.wait(self.job_monitoring_interval):
            execution = self.execution
            if execution is None:
                continue
            try:
                self.maintain_heartbeats(job, execution)
            except Exception:  # a missed beat is retried on the next tick; never kill the job for it
                self.log.exception("heartbeat failed")


class EmbeddedWorker(ResidentModelWorker):
    """For the demo and the one-process server: runs in a thread, where signals (handlers, SIGALRM timeouts) do
    not work."""

    death_penalty_class = TimerDeathPenalty

    def _install_signal_handlers(self):
        pass


def run_embedded_workers(services, stop: threading.Event, poll_s: float = 0.2) -> None:
    """One thread working every queue in priority order until `stop` is set (demo, serve, tests)."""
    from jobs.periodic import build_scheduler

    context.install(services)
    worker = EmbeddedWorker([queues.queue(services, name) for name in queues.ALL_QUEUES],
                            connection=services.redis, job_monitoring_interval=5)
    cron = build_scheduler(services)
    while not stop.is_set():
        cron.enqueue_jobs()
        worked = worker.work(burst=True, with_scheduler=True, logging_level="WARNING")
        if not worked:
            stop.wait(poll_s)


def drain(services, max_rounds: int = 100) -> int:
    """Run every queued job (and the retries they enqueue) in this thread; returns how many rounds ran."""
    context.install(services)
    worker = EmbeddedWorker([queues.queue(services, name) for name in queues.ALL_QUEUES], connection=services.redis)
    rounds = 0
    while rounds < max_rounds and worker.work(burst=True, with_scheduler=True, logging_level="WARNING"):
        rounds += 1
    return rounds


def main(argv=None) -> None:
    from miniapp_api.config import Settings
    from miniapp_api.services import build_services

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["gpu", "default"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    settings = Settings.from_env()
    if settings.embedded_wechat or not settings.mongo_uri:
        parser.error("separate workers need MONGO_URI and the WeChat settings; use `make serve` for embedded mode")
    services = build_services(settings)
    context.install(services)
    if args.kind == "gpu":
        services.renderer()  # load the base pipeline before the first job, once
        worker = ResidentModelWorker([queues.queue(services, n) for n in queues.GPU_QUEUES], connection=services.redis)
        worker.work()
    else:
        SimpleWorker([queues.queue(services, queues.DEFAULT)], connection=services.redis).work(with_scheduler=True)


if __name__ == "__main__":
    main()
