"""The worker's Celery app, built from settings, and the small context its tasks use.

No app exists at import time: `create_worker_app(settings)` builds one (through
`storage.queue.make_celery`, the same long-task configuration the API produces with) and
hangs a `WorkerContext` on it, so tests can start workers with any environment.

The model is loaded once per worker process, in the process that uses it: before consuming
for the solo pool, in `worker_process_init` for prefork children (see `faceparse.stack`).
Never in a parent that then forks: CUDA and torch's thread pools do not survive a fork.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from celery import Celery

from storage.queue import make_celery

if TYPE_CHECKING:
    import redis

    from faceparse.settings import Settings
    from storage.jobstore import JobStore
    from storage.objects import ObjectStore
    from worker.jobrunner import JobRunner
    from worker.model import FaceParser

log = logging.getLogger(__name__)


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
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def jobs(self) -> JobStore:
        if self._jobs is None:
            from storage.jobstore import JobStore

            self._jobs = JobStore.from_url(self.settings.redis_url, self.settings.job_ttl_seconds)
        return self._jobs

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            from storage.objects import ObjectStore

            self._store = ObjectStore(self.settings.storage_url)
        return self._store

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            import redis as redis_lib

            self._redis = redis_lib.Redis.from_url(self.settings.redis_url)
        return self._redis

    def webhook_secret(self) -> str:
        """The signing secret every process shares (see `worker.webhooks.resolve_secret`)."""
        if self._secret is None:
            from worker.webhooks import resolve_secret

            self._secret = resolve_secret(self.settings, self.redis)
        return self._secret

    def load_model(self) -> FaceParser:
        """Load the parser into this process (raises storage.errors.ModelUnavailable)."""
        from worker.model import load_parser

        with self._lock:
            if self.parser is None:
                settings = self.settings
                self.parser = load_parser(settings.model, settings.device, settings.dtype)
                self.model_loads += 1
                # Counted by tests to prove one load per process; keep the wording stable.
                log.warning("model loaded pid=%d loads=%d model=%s random_weights=%s",
                            os.getpid(), self.model_loads, self.parser.model_name,
                            getattr(self.parser, "random_weights", False))
            return self.parser

    def get_parser(self) -> FaceParser:
        """The process's parser, loading it if a task arrives before the start-up load."""
        return self.parser if self.parser is not None else self.load_model()

    def runner(self) -> JobRunner:
        """A `JobRunner` wired to this process's collaborators."""
        from worker.jobrunner import JobRunner
        from worker.tasks import enqueue_webhook

        return JobRunner(self.settings, self.jobs, self.store, self.get_parser,
                         lambda job, event: enqueue_webhook(self.app, job, event))

    def after_fork(self) -> None:
        """Forget connections inherited from a parent process."""
        self._jobs = self._store = self._redis = None


def create_worker_app(settings: Settings) -> Celery:
    """A Celery app for workers, built from settings, with the tasks registered on it."""
    from worker.tasks import register_tasks

    app = make_celery(settings.redis_url, visibility_timeout=settings.visibility_timeout,
                      soft_time_limit=settings.task_soft_time_limit, time_limit=settings.task_time_limit)
    ctx = WorkerContext(settings=settings, app=app)
    app.faceparse = ctx  # type: ignore[attr-defined]  # the tasks' way back to their context
    register_tasks(app, ctx)
    return app


def worker_context(app: Celery) -> WorkerContext:
    """The context `create_worker_app` attached to the app."""
    return app.faceparse  # type: ignore[attr-defined,no-any-return]
