"""Every Prometheus metric of the service, declared here once; web and worker processes record into them.

With PROMETHEUS_MULTIPROC_DIR set (read by prometheus_client itself when it is first imported), each process writes
its values to files of its own in that directory, and a scrape adds up the files of every process that shares it:
gunicorn's workers and the RQ workers of one machine (or one container). Without it, each process keeps its values
in memory and a scrape shows that process alone (tests, `make serve`).

The queue gauges are not stored anywhere: they are read from Redis at scrape time (QueueGauges), so every web
process reports the same numbers; aggregate them across instances with max(), not sum().
"""
from __future__ import annotations

import hmac
import logging
import os
from typing import Callable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

WECHAT_PUSHES = Counter(
    "portraits_wechat_pushes_total",
    "WeChat message pushes answered, by event (wxa_media_check, ..., other) and outcome: what the handler did "
    "(pass, risky, review, recorded, ignored) or the refusal's code (push_signature_invalid, push_replayed, ...)",
    ["event", "outcome"])
PAYMENT_CALLBACKS = Counter(
    "portraits_payment_callbacks_total",
    "WeChat Pay callbacks answered, by kind (payment, refund) and outcome: applied, duplicate, ignored, or the "
    "refusal's error code (bad_signature, amount_mismatch, order_busy, unknown_order, ...)",
    ["kind", "outcome"])
REFUNDS_FINISHED = Counter(
    "portraits_refunds_finished_total",
    "refunds that reached a final state, by state (SUCCESS, ABNORMAL, CLOSED, rejected); counted once per refund "
    "and state (a refund read as rejected that WeChat Pay later reports SUCCESS counts in both)",
    ["state"])
PAYMENT_ALERTS = Counter(
    "portraits_payment_alerts_total",
    "payment alerts raised for operators, by kind; counted once per alert, not per sighting",
    ["kind"])
TRAINING_SECONDS = Histogram(
    "portraits_training_duration_seconds", "LoRA trainings, from claim to end of work, by outcome (done, failed)",
    ["outcome"], buckets=(30, 60, 120, 300, 600, 900, 1200, 1800, 2700, 3600, float("inf")))
RENDER_SECONDS = Histogram(
    "portraits_render_duration_seconds", "render sets, from claim to end of work, by outcome (done, failed)",
    ["outcome"], buckets=(5, 10, 20, 30, 60, 90, 120, 180, 300, 600, 900, float("inf")))
POLL_CACHE_HITS = Counter("portraits_poll_cache_hits_total",
                          "queue polls answered from this process's memory (portraits.queue.local_view)")
POLL_CACHE_MISSES = Counter("portraits_poll_cache_misses_total",
                            "queue polls that had to read Redis; hit ratio = hits / (hits + misses)")



class QueueGauges:
    """GPU queue depth and live GPU workers, read from Redis by the process being scraped: `read_counts()` gives
    one {queue, waiting, running, workers} row per GPU queue (portraits.tasks.gpu_queue_counts)."""

    def __init__(self, read_counts: Callable[[], list[dict]]):
        self._read_counts = read_counts

    def collect(self):
        waiting = GaugeMetricFamily("portraits_gpu_queue_waiting", "jobs waiting in a GPU queue", labels=["queue"])
        running = GaugeMetricFamily("portraits_gpu_queue_running", "jobs running from a GPU queue", labels=["queue"])
        workers = GaugeMetricFamily("portraits_gpu_workers_live",
                                    "GPU workers whose heartbeat is current, by queue they listen to",
                                    labels=["queue"])
        try:
            rows = self._read_counts()
        except RedisError:  # a scrape still shows the counters while Redis is away; the gauges are missing
            log.warning("queue gauges left out of this scrape: Redis did not answer", exc_info=True)
            return []
        for row in rows:
            waiting.add_metric([row["queue"]], row["waiting"])
            running.add_metric([row["queue"]], row["running"])
            workers.add_metric([row["queue"]], row["workers"])
        return [waiting, running, workers]


class _ThisProcess:
    """The metrics of this process's default registry, when there is no multiprocess directory."""

    def collect(self):
        return REGISTRY.collect()


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_DIR_VARIABLE) or None


def scrape_registry(read_queue_counts: Callable[[], list[dict]] | None = None) -> CollectorRegistry:
    """What a scrape shows: every process sharing the multiprocess directory (or this process alone), and the
    queue gauges when a reader of them is given. Never the default registry itself: in multiprocess mode this
    process's values are already in the directory's files."""
    registry = CollectorRegistry(auto_describe=False)
    directory = multiprocess_dir()
    if directory:
        MultiProcessCollector(registry, path=directory)
    else:
        registry.register(_ThisProcess())
    if read_queue_counts is not None:
        registry.register(QueueGauges(read_queue_counts))
    return registry


def scrape_allowed(token: str, authorization: str | None) -> bool:
    """A scrape must send `Authorization: Bearer <METRICS_TOKEN>`; with no token configured nothing may scrape."""
    if not token:
        return False
    return hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode())
