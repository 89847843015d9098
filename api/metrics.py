"""Prometheus metrics of the API: request counts and latency by endpoint, jobs by status, queue depth.

Jobs and queue depth are read from Redis at scrape time, so every API process reports the same
numbers. Request counters live in the process: each app has its own registry, unless
`PROMETHEUS_MULTIPROC_DIR` names a directory (set before gunicorn starts, emptied at each start):
then every gunicorn worker writes its counters there and any one of them answers with the sum.
Worker-side figures (stage times, batch sizes, webhooks, model loads) are served by the workers
themselves: see `worker.metrics` and docs/OPERATIONS.md.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from storage.errors import Unavailable
from storage.queue import PARSE_QUEUE, WEBHOOK_QUEUE

if TYPE_CHECKING:
    from storage.jobstore import JobStore

# kombu's Redis transport keeps a queue as a list of the queue's name, plus one list per priority
# step (`name\x06\x16<p>`) when messages carry a priority.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class StoreCollector(Collector):
    """Reads jobs by status and queue depth from Redis at each scrape."""

    def __init__(self, job_store: JobStore, queues: tuple[str, ...] = (PARSE_QUEUE, WEBHOOK_QUEUE)) -> None:
        self.job_store = job_store
        self.queues = queues

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("faceparse_redis_up", "1 when the job store answered this scrape")
        jobs = GaugeMetricFamily("faceparse_jobs", "jobs in the job store by status", labels=["status"])
        depth = GaugeMetricFamily("faceparse_queue_depth", "messages waiting per queue", labels=["queue"])
        try:
            counts = self.job_store.counts_by_status()
            lengths = {queue: self._queue_length(queue) for queue in self.queues}
        except (Unavailable, RedisError):
            # A scrape must still answer while Redis is down; the outage is the metric.
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        for status, count in sorted(counts.items()):
            jobs.add_metric([str(status)], count)
        for queue, length in lengths.items():
            depth.add_metric([queue], length)
        yield from (up, jobs, depth)

    def _queue_length(self, queue: str) -> int:
        redis = self.job_store.redis
        names = [queue, *(f"{queue}{_PRIORITY_SEP}{p}" for p in _PRIORITY_STEPS)]
        with redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.llen(name)
            return sum(pipe.execute())


class ApiMetrics:
    """One registry per app: request metrics recorded by hooks, store metrics read at scrape time."""

    def __init__(self, job_store: JobStore) -> None:
        self.registry = CollectorRegistry()
        multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        # In multiprocess mode the values live in files: the registry reads them all through the
        # MultiProcessCollector, so registering this process's metrics too would count them twice.
        own = None if multiprocess else self.registry
        self.requests = Counter(
            "faceparse_http_requests",
            "HTTP requests answered",
            ["method", "endpoint", "status"],
            registry=own,
        )
        self.latency = Histogram(
            "faceparse_http_request_duration_seconds",
            "time to answer an HTTP request",
            ["method", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=own,
        )
        if multiprocess:
            MultiProcessCollector(self.registry)
        self.registry.register(StoreCollector(job_store))

    def init_app(self, app: Flask) -> None:
        """Time every request of `app`."""
        app.before_request(self._start)
        app.after_request(self._observe)

    def _start(self) -> None:
        g.metrics_start = time.perf_counter()

    def _observe(self, response: Response) -> Response:
        start = g.pop("metrics_start", None)
        # The rule's template (/v1/jobs/<job_id>), never the raw path: ids would explode cardinality.
        endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
        self.requests.labels(request.method, endpoint, str(response.status_code)).inc()
        if start is not None:
            self.latency.labels(request.method, endpoint).observe(time.perf_counter() - start)
        return response

    def exposition(self) -> Response:
        """The Prometheus text format of everything in the registry."""
        return Response(generate_latest(self.registry), mimetype=CONTENT_TYPE_LATEST)
