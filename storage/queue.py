"""The queue contract shared by the API (producer) and the workers (consumers).

Task and queue names live here so the API can enqueue by name without importing
`worker` (and torch). Tasks carry job ids, never image bytes.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

PARSE_QUEUE = "faceparse.parse"
WEBHOOK_QUEUE = "faceparse.webhooks"
PARSE_TASK = "faceparse.parse"
WEBHOOK_TASK = "faceparse.deliver_webhook"


def make_celery(
    redis_url: str,
    *,
    visibility_timeout: int = 3600,
    soft_time_limit: int = 300,
    time_limit: int = 360,
) -> Celery:
    """A Celery app configured for long GPU tasks; the API and the worker both build theirs here."""
    if visibility_timeout <= time_limit:
        raise ValueError("visibility_timeout must exceed the hard time limit")
    app = Celery("faceparse", broker=redis_url, set_as_current=False)
    app.conf.update(
        task_default_queue=PARSE_QUEUE,
        # One direct exchange per queue, so nothing published for one queue can reach the other.
        task_queues=(
            Queue(PARSE_QUEUE, Exchange(PARSE_QUEUE, type="direct"), routing_key=PARSE_QUEUE),
            Queue(WEBHOOK_QUEUE, Exchange(WEBHOOK_QUEUE, type="direct"), routing_key=WEBHOOK_QUEUE),
        ),
        task_routes={
            PARSE_TASK: {"queue": PARSE_QUEUE, "routing_key": PARSE_QUEUE},
            WEBHOOK_TASK: {"queue": WEBHOOK_QUEUE, "routing_key": WEBHOOK_QUEUE},
        },
        # Ack after the task ran, and requeue if the worker process dies mid-task.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=soft_time_limit,
        task_time_limit=time_limit,
        # The Redis transport redelivers unacked messages after this; it must exceed the
        # hard time limit or a long task would run twice.
        broker_transport_options={"visibility_timeout": visibility_timeout},
        broker_connection_retry_on_startup=True,
        # The job record in Redis is the source of truth; no result backend.
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    return app
