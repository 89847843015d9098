"""The worker's Celery app, built from settings, and the small context its tasks use.

No app exists at import time: `create_worker_app(settings)` builds one (through
`storage.queue.make_celery`, the same long-task configuration the API produces with) and
hangs a `WorkerContext` on it, so tests can start workers with any environment.

The model is loaded once per worker process, in the process that uses it, before it consumes
(see `faceparse.stack.run_worker`); never in a parent that then forks: CUDA and torch's thread
pools do not survive a fork. Each worker process runs Celery's `threads` pool with `slots()`
task threads that share the process's model through one `Batcher` (dynamic batching across jobs).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from celery import Celery

from storage.queue import make_celery

if TYPE_CHECKING:
    import redis

    from faceparse.settings import Settings
    from storage.jobstore import JobStore
    from storage.objects import ObjectStore
    from worker.batcher import Admission, Batcher
    from worker.jobrunner import JobRunner
    from worker.model import FaceParser

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class WorkerContext:
    """Settings plus the per-process collaborators of the tasks, created lazily.

    Connections are made on first use and dropped by `after_fork`, so a prefork child never
    reuses a socket (or a boto3 client) its parent opened.
    """

    settings: Settings
    app: Celery
    parser: FaceParser | None = None
    model_loads: int = 0
    _jobs: JobStore | None = field(default=None, repr=False)
    _store: ObjectStore | None = field(default=None, repr=False)
    _redis: redis.Redis | None = field(default=None, repr=False)
    _secret: str | None = field(default=None, repr=False)
    _batcher: Batcher | None = field(default=None, repr=False)
    _admission: Admission | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Task threads share these lazily built clients: build each once.
    _conn_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def jobs(self) -> JobStore:
        """The job store (one Redis connection pool per process, shared by the task threads)."""
        with self._conn_lock:
            if self._jobs is None:
                from storage.jobstore import JobStore

                self._jobs = JobStore.from_url(self.settings.redis_url, self.settings.job_ttl_seconds)
            return self._jobs

    @property
    def store(self) -> ObjectStore:
        """The object store (its boto3 client is shared by the task threads)."""
        with self._conn_lock:
            if self._store is None:
                from storage.objects import ObjectStore

                self._store = ObjectStore(self.settings.storage_url)
            return self._store

    @property
    def redis(self) -> redis.Redis:
        """A plain Redis client on the broker/job-store URL."""
        with self._conn_lock:
            if self._redis is None:
                import redis as redis_lib

                self._redis = redis_lib.Redis.from_url(self.settings.redis_url)
            return self._redis

    def webhook_secret(self) -> str:
        """The signing secret every process shares (see `worker.webhooks.resolve_secret`)."""
        if self._secret is None:
            from worker.webhooks import resolve_secret

            secret = resolve_secret(self.settings, self.redis)
            with self._conn_lock:
                self._secret = self._secret or secret
        return self._secret

    def load_model(self) -> FaceParser:
        """Load the parser into this process (raises storage.errors.ModelUnavailable)."""
        from worker.metrics import observe_model_load
        from worker.model import load_parser

        with self._lock:
            if self.parser is None:
                settings = self.settings
                started = time.perf_counter()
                self.parser = _in_own_thread(load_parser, settings.model, settings.device, settings.dtype)
                observe_model_load(time.perf_counter() - started)
                self.model_loads += 1
                # Counted by tests to prove one load per process; keep the wording stable.
                log.warning("model loaded pid=%d loads=%d model=%s random_weights=%s",
                            os.getpid(), self.model_loads, self.parser.model_name,
                            getattr(self.parser, "random_weights", False))
            return self.parser

    def get_parser(self) -> FaceParser:
        """The process's parser, loading it if a task arrives before the start-up load."""
        return self.parser if self.parser is not None else self.load_model()

    def max_batch(self) -> int:
        """Images per forward pass: FACEPARSE_MAX_BATCH, else the device's default."""
        from worker.model import default_max_batch

        if self.settings.max_batch is not None:
            return max(1, self.settings.max_batch)
        return default_max_batch(self.get_parser().device)

    def slots(self) -> int:
        """Task threads of this process: FACEPARSE_WORKER_SLOTS, else two batches' worth plus one.

        Two batches: one in the forward pass while the next one's images are fetched, decoded and
        preprocessed (and the last one's encoded and uploaded); plus one for webhook deliveries.
        """
        if self.settings.worker_slots is not None:
            return max(1, self.settings.worker_slots)
        return 2 * self.max_batch() + 1

    def batch_wait_ms(self) -> int:
        """How long a forward pass waits for its batch to fill: FACEPARSE_BATCH_WAIT_MS, else the
        device's default."""
        from worker.model import default_batch_wait_ms

        if self.settings.batch_wait_ms is not None:
            return max(0, self.settings.batch_wait_ms)
        return default_batch_wait_ms(self.get_parser().device)

    def batcher(self) -> Batcher:
        """The process's one batcher: its thread owns the model's forward pass."""
        from worker.batcher import Batcher
        from worker.metrics import observe_batch

        parser = self.get_parser()
        wait_ms = self.batch_wait_ms()
        with self._lock:
            if self._batcher is None:
                self._batcher = Batcher(parser.forward, max_batch=self.max_batch(), wait_ms=wait_ms,
                                        finish=parser.postprocess_one, on_batch=observe_batch)
                log.info("batcher started pid=%d max_batch=%d wait_ms=%s", os.getpid(),
                         self._batcher.max_batch, wait_ms)
            return self._batcher

    def admission(self) -> Admission:
        """When this process's task threads may claim their jobs (see `worker.batcher.Admission`)."""
        from worker.batcher import Admission

        batcher = self.batcher()
        with self._lock:
            if self._admission is None:
                self._admission = Admission(lambda: batcher.busy)
            return self._admission

    def runner(self) -> JobRunner:
        """A `JobRunner` wired to this process's collaborators."""
        from worker.jobrunner import JobRunner
        from worker.tasks import enqueue_webhook

        return JobRunner(self.settings, self.jobs, self.store, self.get_parser,
                         lambda job, event: enqueue_webhook(self.app, job, event),
                         batcher=self.batcher, admission=self.admission())

    def after_fork(self) -> None:
        """Forget connections inherited from a parent process."""
        self._jobs = self._store = self._redis = None


def _in_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on a thread that then exits. Loading a model runs parallel torch ops; on the
    calling thread (Celery's main thread, which lives on) they would leave an OpenMP team behind,
    one more than the batcher's own, and slow every forward pass (see worker.batcher)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # re-raised on the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="faceparse-model-load")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def create_worker_app(settings: Settings) -> Celery:
    """A Celery app for workers, built from settings, with the tasks registered on it."""
    from worker.lease import install_lease
    from worker.tasks import register_tasks

    app = make_celery(settings.redis_url, visibility_timeout=settings.visibility_timeout,
                      soft_time_limit=settings.task_soft_time_limit, time_limit=settings.task_time_limit)
    ctx = WorkerContext(settings=settings, app=app)
    app.faceparse = ctx  # type: ignore[attr-defined]  # the tasks' way back to their context
    register_tasks(app, ctx)
    install_lease(app, ctx)  # leases on running jobs, and the reaper of dead workers' jobs
    return app


def worker_context(app: Celery) -> WorkerContext:
    """The context `create_worker_app` attached to the app."""
    return app.faceparse  # type: ignore[attr-defined,no-any-return]
