"""Prometheus metrics of a worker process: job stage times, batch sizes, webhooks, model loads.

Small functions the worker calls where things happen (`observe_job`, `observe_batch`,
`observe_webhook`, `observe_model_load`), and `start_metrics_server(port)`, which serves them over
HTTP for Prometheus to scrape (`FACEPARSE_WORKER_METRICS_PORT`).

Each worker process keeps its own figures. With the solo pool (one process per GPU, the default)
that process serves them on the port. In a prefork child, the port is offset by the child's pool
index (port, port+1, …), so every child is scraped. Alternatively set `PROMETHEUS_MULTIPROC_DIR`
(an empty directory, before the worker starts): then every process writes its figures there and
the one process that calls `start_metrics_server` (the prefork parent) serves the sum.

Jobs by status and queue depth are not here: the API reads them from Redis at each scrape.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Seconds. Queue wait spans idle seconds to a backlog of minutes; stages are milliseconds to seconds.
QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# The job record's per-stage figures (milliseconds) -> the `stage` label.
STAGES = {"fetch_ms": "fetch", "decode_ms": "decode", "inference_ms": "inference", "upload_ms": "upload"}

JOBS = Counter("faceparse_worker_jobs", "jobs a worker finished, by final status", ["status"])
QUEUE_WAIT = Histogram("faceparse_job_queue_wait_seconds",
                       "from submission to a worker's first start of the job", buckets=QUEUE_BUCKETS)
STAGE_TIME = Histogram("faceparse_job_stage_seconds", "time of one stage of a job in the worker",
                       ["stage"], buckets=STAGE_BUCKETS)
INFERENCE_TIME = Histogram("faceparse_job_inference_seconds",
                           "forward pass, upsample and argmax of a job (its batch's, when batched)",
                           buckets=STAGE_BUCKETS)
PROCESSING_TIME = Histogram("faceparse_job_processing_seconds",
                            "from a worker's start of the job to its result being recorded",
                            buckets=STAGE_BUCKETS)
END_TO_END = Histogram("faceparse_job_end_to_end_seconds",
                       "queue wait plus processing: submission to result", buckets=QUEUE_BUCKETS)
BATCH_SIZE = Histogram("faceparse_batch_size", "images per forward pass", buckets=BATCH_BUCKETS)
FORWARD_TIME = Histogram("faceparse_forward_seconds",
                         "wall time of one forward pass (its sum over wall time: how busy the device is)",
                         buckets=STAGE_BUCKETS)
WEBHOOKS = Counter("faceparse_webhook_deliveries",
                   "webhook delivery attempts by outcome (delivered, retrying, failed, refused)",
                   ["outcome"])
MODEL_LOAD = Gauge("faceparse_model_load_seconds", "time this process took to load the model",
                   multiprocess_mode="max")
MODEL_LOADS = Counter("faceparse_model_loads", "model loads by this process")


def observe_job(metrics: Mapping[str, float], status: str) -> None:
    """Record a finished job from its record's `metrics` (milliseconds) and its final status.

    Figures missing from `metrics` (a job that failed before inference) are skipped, not zeroed.
    """
    JOBS.labels(str(status)).inc()
    queue_ms = metrics.get("queue_ms")
    total_ms = metrics.get("total_ms")
    if queue_ms is not None:
        QUEUE_WAIT.observe(queue_ms / 1000.0)
    for key, stage in STAGES.items():
        if key in metrics:
            STAGE_TIME.labels(stage).observe(metrics[key] / 1000.0)
    if "inference_ms" in metrics:
        INFERENCE_TIME.observe(metrics["inference_ms"] / 1000.0)
    if total_ms is not None:
        PROCESSING_TIME.observe(total_ms / 1000.0)
        if queue_ms is not None:
            END_TO_END.observe((queue_ms + total_ms) / 1000.0)


def observe_batch(size: int, seconds: float) -> None:
    """Record one forward pass over `size` images that took `seconds`."""
    BATCH_SIZE.observe(size)
    FORWARD_TIME.observe(seconds)


def observe_webhook(outcome: str) -> None:
    """Record one delivery attempt's outcome (`AttemptResult.outcome`)."""
    WEBHOOKS.labels(outcome).inc()


def observe_model_load(seconds: float) -> None:
    """Record how long this process took to load its model."""
    MODEL_LOAD.set(seconds)
    MODEL_LOADS.inc()


def process_index() -> int | None:
    """This process's index in a Celery prefork pool (0, 1, …), None outside a pool child."""
    from billiard.process import current_process

    index = getattr(current_process(), "index", None)
    return index if isinstance(index, int) else None


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> int:
    """Serve the metrics over HTTP on `port` (plus the pool index in a prefork child); returns the port.

    With `PROMETHEUS_MULTIPROC_DIR` set, serves every process's figures aggregated: call it once,
    in the prefork parent, and not in the children. Port 0 picks a free port (tests).
    """
    registry: CollectorRegistry = REGISTRY
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    else:
        port = port + (process_index() or 0) if port else 0
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    bound = int(server.server_port)
    log.info("worker metrics at http://%s:%d/metrics", addr, bound)
    return bound
