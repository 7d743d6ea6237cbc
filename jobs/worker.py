"""Worker processes.

    python -m jobs.worker gpu       one per GPU (pin it with CUDA_VISIBLE_DEVICES); previews, then renders before
                                    trainings, express or standard first by the lane rule (portraits.queue.lanes)
    python -m jobs.worker preview   optional: previews only, so one never waits behind a training (a GPU of its own,
                                    or beside a `gpu` process on one with memory to spare)
    python -m jobs.worker default   refunds, notifications, periodic work; runs RQ's scheduler for retry backoff
    python -m jobs.worker intake    face judging of uploaded photos (CPU); as many as the uploads need
    python -m jobs.worker gpu --check   readiness probe (exit 0: ready); see jobs.observability

The GPU worker never forks: a forked work horse deadlocks when the parent has used multi-threaded torch, and
forking would also throw away the resident base pipeline. One job at a time per process. The intake worker does not
fork either: its dlib models are loaded once per process, before the first job, and used by that process alone (they
are not thread-safe; scale with processes, each with its own models, ~100 MB and ~1 s of loading each). A heartbeat thread keeps
the worker and its job alive while the main thread is busy in a long training; the job's execution expires from
RQ's StartedJobRegistry WORKER_DEAD_AFTER_S after the last beat, which is how the reaper (jobs.recovery) finds the
jobs of a worker that was SIGKILLed.

SIGTERM (a deploy, a scale-down): the worker stops taking jobs. A render, or a training expected to end within
WORKER_STOP_GRACE_S, is finished; a longer training is handed back to the front of its queue at its next step
without spending one of the avatar's attempts.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time

from rq import Queue, SimpleWorker
from rq.timeouts import TimerDeathPenalty

from jobs import context, gpu_job, observability, recovery
from portraits import health, sweeper, tasks
from portraits.config import ConfigError, Settings
from portraits.queue.lanes import EXPRESS, LANE_QUEUES, QUEUE_LANE, STANDARD, ExpressSlots, LanePolicy
from portraits.queue.tracking import QueueTracker
from portraits.services import build_services


class DefaultWorker(observability.JobLogContext, SimpleWorker):
    pass


class ResidentModelWorker(observability.JobLogContext, SimpleWorker):
    def __init__(self, *args, heartbeat_s: int = 10, dead_after_s: int = 45, stop_grace_s: float = 20.0,
                 worker_ttl: int = 60, lanes: LanePolicy | None = None, **kwargs):
        if dead_after_s <= heartbeat_s:
            raise ValueError("dead_after_s must be longer than heartbeat_s")
        kwargs.setdefault("job_monitoring_interval", heartbeat_s)
        super().__init__(*args, worker_ttl=worker_ttl, **kwargs)
        self.dead_after_s = dead_after_s
        self.lane_policy = lanes or LanePolicy()
        self._express_slots = ExpressSlots(self.connection)
        self._lane = None
        gpu_job.stop_grace_s[0] = stop_grace_s
        self._handed_back = None
        self.push_exc_handler(self._note_hand_back)

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        # Short on purpose: the heartbeat thread renews it while the job runs, so it only lapses when we are dead.
        return self.dead_after_s

    def heartbeat(self, timeout=None, pipeline=None):
        super().heartbeat(timeout, pipeline=pipeline)
        gpu = [name for name in self.queue_names() if name in tasks.GPU_QUEUES]
        if gpu:
            ttl = timeout or self.worker_ttl + 60
            QueueTracker(self.connection).worker_alive(gpu, self.name, ttl, pipeline=pipeline)

    def register_death(self):
        QueueTracker(self.connection).worker_gone(self.queue_names(), self.name)
        super().register_death()

    def request_stop(self, signum, frame):
        gpu_job.stopping.set()
        super().request_stop(signum, frame)

    def _note_hand_back(self, job, exc_type, exc_value, traceback):
        if exc_type is not None and issubclass(exc_type, gpu_job.HandBack):
            self._handed_back = job
            return False  # not an error worth logging as one
        return True

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        """Listen express first or standard first, as the lane rule says for this worker now."""
        self._order_lanes()
        result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        lane = QUEUE_LANE.get(result[1].name) if result is not None else None
        if lane is None:
            self._express_slots.release(self.name)
        else:
            self._express_slots.hold(self.name, self.dead_after_s, lane)
        self._lane = lane
        return result

    def _order_lanes(self) -> None:
        names = [q.name for q in self.queues]
        if not any(name in QUEUE_LANE for name in names):
            return
        live = QueueTracker(self.connection).live_workers(tasks.RENDER)
        standard = [q.key for q in self.queues if QUEUE_LANE.get(q.name) == STANDARD]
        taken = self._express_slots.take(self.lane_policy, self.name, live, self.dead_after_s, standard)
        first = EXPRESS if taken else STANDARD
        # Queues outside the lanes (the preview's) keep their place ahead of them in tasks.GPU_WORKER_QUEUES.
        ahead = [name for name in tasks.GPU_WORKER_QUEUES if name not in QUEUE_LANE]
        rank = [*ahead, *LANE_QUEUES[first], *LANE_QUEUES[EXPRESS if first == STANDARD else STANDARD]]
        self._ordered_queues = sorted(self.queues, key=lambda q: rank.index(q.name) if q.name in rank else len(rank))

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
            self._express_slots.release(self.name)
            self._lane = None
        if self._handed_back is not None:
            handed, self._handed_back = self._handed_back, None
            outcome = recovery.hand_back(context.services(), handed, self.name)
            self.log.warning("Worker %s: job %s %s", self.name, handed.id, outcome)

    def _beat_while_running(self, job, stop: threading.Event) -> None:
        while not stop.wait(self.job_monitoring_interval):
            execution = self.execution
            if execution is None:
                continue
            try:
                self.maintain_heartbeats(job, execution)
                if self._lane == EXPRESS:
                    self._express_slots.hold(self.name, self.dead_after_s, EXPRESS)
            except Exception:  # a missed beat is retried on the next tick; never kill the job for it
                self.log.exception("heartbeat failed")


class EmbeddedWorker(ResidentModelWorker):
    """For `drain` (the tests' in-process worker): may run in a thread, where signals (handlers, SIGALRM
    timeouts) do not work."""

    death_penalty_class = TimerDeathPenalty

    def _install_signal_handlers(self):
        pass


def build_gpu_worker(connection, settings=None, queues: tuple[str, ...] = tasks.GPU_WORKER_QUEUES,
                     **overrides) -> ResidentModelWorker:
    """A GPU worker on `queues`: by default previews first, then both lanes' render and train queues, renders first
    within a lane."""
    options = {}
    if settings is not None:
        options = dict(heartbeat_s=settings.worker_heartbeat_s, dead_after_s=settings.worker_dead_after_s,
                       stop_grace_s=settings.worker_stop_grace_s, lanes=LanePolicy.of(settings))
    options.update(overrides)
    gpu_queues = [Queue(name, connection=connection, default_timeout=tasks.TIMEOUTS[name])
                  for name in queues]
    return ResidentModelWorker(gpu_queues, connection=connection, **options)


def drain(services, max_rounds: int = 100, queues: tuple[str, ...] = tasks.ALL_QUEUES) -> int:
    """Run every queued job of ``queues`` (and the retries they enqueue) in this thread; returns how many rounds
    ran."""
    context.install(services)
    worker = EmbeddedWorker([tasks.queue(services, name) for name in queues], connection=services.redis,
                            lanes=LanePolicy.of(services.settings))
    rounds = 0
    while rounds < max_rounds and worker.work(burst=True, with_scheduler=True, logging_level="WARNING"):
        rounds += 1
    return rounds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["gpu", "preview", "default", "intake"])
    parser.add_argument("--check", action="store_true", help="readiness probe: exit 0 when ready, print the checks")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as error:
        parser.error(str(error))
    if settings.embedded_wechat or not settings.database_is_shared:
        parser.error("separate workers need a database other processes share (MONGO_URI, or EMBEDDED's database "
                     "server) and the WeChat settings, not a simulator of their own; `make serve` sets them")
    if args.check:
        try:
            checks = observability.check_worker(settings, args.kind)
        except ConfigError as error:
            parser.error(str(error))
        print(json.dumps(checks))
        if not health.is_ready(checks):
            failing = "; ".join(f"{name}: {state}" for name, state in checks.items() if state != health.OK)
            print(f"{args.kind} worker not ready: {failing}", file=sys.stderr)
            sys.exit(1)
        sys.exit(0)
    observability.start(settings)
    services = build_services(settings)
    context.install(services)
    if args.kind == "gpu":
        started = time.monotonic()
        services.renderer()  # load the base pipeline before the first job, once
        if settings.previews_enabled:
            services.previewer().warm_up()  # and the preview's own pipeline with its adapter
        logging.info("base pipeline resident after %.1fs", time.monotonic() - started)
        recovery.reap(services)  # jobs of a worker that died on this machine are found without waiting for the clock
        sweeper.sweep(services)  # and work owed that Redis lost (a restart without its data) is queued again
        build_gpu_worker(services.redis, settings).work()
    elif args.kind == "preview":
        services.previewer().warm_up()
        sweeper.sweep(services)
        build_gpu_worker(services.redis, settings, queues=(tasks.PREVIEW,)).work()
    elif args.kind == "intake":
        services.face_analyzer().use_one_core()  # this process's own models, loaded before the first photo
        sweeper.sweep(services)
        DefaultWorker([tasks.queue(services, tasks.INTAKE)], connection=services.redis).work(with_scheduler=True)
    else:
        sweeper.sweep(services)
        DefaultWorker([tasks.queue(services, tasks.DEFAULT)], connection=services.redis).work(with_scheduler=True)


if __name__ == "__main__":
    main()
