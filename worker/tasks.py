"""The Celery tasks: thin adapters from the queue to `JobRunner` and `worker.webhooks`.

Tasks receive ids, never images, and are registered on an app built from settings
(`worker.celery_app.create_worker_app`), never on a global one. They run in the worker's
`threads` pool: several parse tasks of one process are in flight at once, and their forward
passes are batched by the process's `worker.batcher.Batcher` (see `WorkerContext.runner`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from storage.jobs import Job, new_id
from storage.queue import PARSE_TASK, WEBHOOK_QUEUE, WEBHOOK_TASK

if TYPE_CHECKING:
    from celery import Celery, Task

    from worker.celery_app import WorkerContext

log = logging.getLogger(__name__)


def register_tasks(app: Celery, ctx: WorkerContext) -> None:
    """Register `faceparse.parse` and `faceparse.deliver_webhook` on the app."""

    @app.task(name=PARSE_TASK, bind=True, max_retries=None)
    def parse(self: Task, job_id: str) -> None:
        """Run one parse job; transient faults come back as a delayed retry of this message."""
        result = ctx.runner().run(job_id)
        if result.retry_in is not None:
            # The JobRunner bounds the attempts (settings.max_retries) through job.attempts.
            raise self.retry(countdown=result.retry_in)

    @app.task(name=WEBHOOK_TASK, bind=True, max_retries=None)
    def deliver_webhook(self: Task, job_id: str, event: str, webhook_id: str) -> None:
        """Make one delivery attempt; retries keep the same webhook-id."""
        from worker.webhooks import deliver_once

        result = deliver_once(settings=ctx.settings, jobs=ctx.jobs, secret=ctx.webhook_secret(),
                              job_id=job_id, event=event, webhook_id=webhook_id,
                              attempt=self.request.retries + 1)
        if result.retry_in is not None:
            # webhook_max_attempts is enforced by deliver_once, which stops asking for retries.
            raise self.retry(countdown=result.retry_in)


def enqueue_webhook(app: Celery, job: Job, event: str) -> None:
    """Enqueue delivery of `event` for the job when its webhook subscribed to it."""
    from worker.webhooks import wants_event

    if not wants_event(job, event):
        return
    webhook_id = new_id("msg_")  # one id per event, kept across its retries
    try:
        app.send_task(WEBHOOK_TASK, args=[job.id, event, webhook_id], queue=WEBHOOK_QUEUE)
    except (OperationalError, RedisError) as exc:
        # A webhook never fails the job: log, and let the job's state speak for itself.
        log.error("job %s: could not enqueue %s webhook: %s", job.id, event, exc)
