"""The queue contract shared by the API (producer) and the workers (consumers).

Task and queue names live here so the API can enqueue by name without importing
`worker` (and torch). Tasks carry job ids, never image bytes.
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.events.event import Event
from celery.utils.nodenames import anon_nodename
from celery.utils.time import utcoffset
from kombu import Exchange, Queue
from kombu.serialization import dumps as serialize
from kombu.utils.uuid import uuid
from redis import Redis

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


# --- publishing inside another Redis transaction -----------------------------------------------
# Celery's events exchange, and the task-sent event's type and routing key.
EVENT_EXCHANGE = "celeryev"
SENT_EVENT = "task-sent"
SENT_EVENT_ROUTING_KEY = "task.sent"


@dataclass(frozen=True)
class TaskMessage:
    """A task message, and its task-sent event, as kombu's Redis transport writes them, made
    ready to go in the same Redis transaction as the job record they are for (`write(pipe)`)."""

    queue: str  # the queue's Redis list
    payload: str  # kombu's JSON envelope around Celery's message
    event: str | None  # the task-sent event's envelope (None with task_send_sent_event off)

    def write(self, pipe: Any) -> None:
        """Queue the message's writes on a Redis pipeline: push on the queue, publish the event."""
        pipe.lpush(self.queue, self.payload)
        if self.event is not None:
            # kombu's fanout channel: "/{db}.{exchange}/{routing key}" (fanout prefix and patterns on).
            db = pipe.connection_pool.connection_kwargs.get("db", 0)
            pipe.publish(f"/{db}.{EVENT_EXCHANGE}/{SENT_EVENT_ROUTING_KEY}", self.event)


def task_message(app: Celery, name: str, args: list[Any], queue: str) -> TaskMessage:
    """What `app.send_task(name, args=args, queue=queue)` writes to Redis, without writing it.

    Celery builds the message (protocol 2: headers, properties, body) and the task-sent event's
    fields, as send_task does; they are wrapped the way kombu's Redis transport stores them (its
    JSON envelope, the body in base64). A queue behind a direct exchange of its own name is, to
    kombu, a push on the queue's list (priority 0). `tests/test_queue.py` holds both writes against
    what send_task itself writes, so a Celery or kombu upgrade that changes them fails there.
    """
    task_id = uuid()
    message = app.amqp.create_task_message(
        task_id, name, args, {}, reply_to=app.thread_oid, ignore_result=None,
        create_sent_event=app.conf.task_send_sent_event)
    payload = _envelope(message.body, message.headers, {**message.properties, "delivery_mode": 2},
                        exchange="", routing_key=queue, serializer=app.conf.task_serializer)
    event = None
    if message.sent_event is not None:
        hostname = anon_nodename()
        fields = {**message.sent_event, "queue": queue, "exchange": "", "routing_key": queue}
        body = Event(SENT_EVENT, hostname=hostname, utcoffset=utcoffset(), pid=os.getpid(),
                     clock=app.clock.forward(), **fields)
        event = _envelope(body, {"hostname": hostname}, {"delivery_mode": 1}, exchange=EVENT_EXCHANGE,
                          routing_key=SENT_EVENT_ROUTING_KEY, serializer="json")
    return TaskMessage(queue=queue, payload=payload, event=event)


def _envelope(body: Any, headers: dict[str, Any], properties: dict[str, Any], *, exchange: str,
              routing_key: str, serializer: str) -> str:
    """kombu's Redis envelope of one message (virtual Channel.prepare_message + basic_publish)."""
    content_type, content_encoding, data = serialize(body, serializer=serializer)
    raw = data.encode(content_encoding) if isinstance(data, str) else data
    return json.dumps({
        "body": base64.b64encode(raw).decode("ascii"),
        "content-encoding": content_encoding,
        "content-type": content_type,
        "headers": headers,
        "properties": {**properties, "delivery_info": {"exchange": exchange, "routing_key": routing_key},
                       "priority": 0, "body_encoding": "base64", "delivery_tag": uuid()},
    })


# kombu's Redis transport keeps every delivered, not yet acknowledged message in a hash
# (`unacked`: delivery tag -> [message, exchange, routing key]) indexed by delivery time
# (`unacked_index`), and puts them back only after the visibility timeout (an hour). The reaper
# reads them to find messages that no live worker holds any more.
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"


def unacked_parse_messages(redis: Redis, *, older_than_s: float, limit: int = 1000) -> list[tuple[str, str]]:
    """(delivery tag, job id) of parse messages delivered over `older_than_s` ago and not acked yet."""
    cutoff = time.time() - older_than_s
    tags = redis.zrangebyscore(UNACKED_INDEX_KEY, 0, cutoff, start=0, num=limit)
    if not tags:
        return []
    found: list[tuple[str, str]] = []
    for tag, payload in zip(tags, redis.hmget(UNACKED_KEY, tags), strict=True):
        job_id = _parse_job_id(payload)
        if job_id is not None:
            found.append((tag.decode() if isinstance(tag, bytes) else tag, job_id))
    return found


def drop_unacked(redis: Redis, tag: str) -> None:
    """Forget an unacked message (it was sent again), so the transport never redelivers it too."""
    pipe = redis.pipeline()
    pipe.hdel(UNACKED_KEY, tag)
    pipe.zrem(UNACKED_INDEX_KEY, tag)
    pipe.execute()


def parse_job_ids_waiting(redis: Redis) -> set[str]:
    """Job ids with a parse message waiting in the queue's list (an O(queue length) read)."""
    return {j for j in (_job_id_of_message(raw) for raw in redis.lrange(PARSE_QUEUE, 0, -1)) if j}


def parse_job_ids_unacked(redis: Redis) -> set[str]:
    """Job ids with a parse message delivered to a worker and not acked yet."""
    return {j for j in (_parse_job_id(raw) for raw in redis.hvals(UNACKED_KEY)) if j}


def _parse_job_id(payload: bytes | None) -> str | None:
    """The job id of an unacked entry (`[message, exchange, routing key]`); None for anything else."""
    if payload is None:
        return None
    try:
        return _job_id_of(json.loads(payload)[0])
    except (ValueError, IndexError, TypeError):
        return None


def _job_id_of_message(raw: bytes) -> str | None:
    """The job id of a message as it waits in the queue's list; None for anything else."""
    try:
        return _job_id_of(json.loads(raw))
    except (ValueError, TypeError):
        return None


def _job_id_of(message: dict) -> str | None:
    """The job id of a Celery (protocol 2) parse message as kombu stores it; None for anything else."""
    try:
        if message.get("headers", {}).get("task") != PARSE_TASK:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        return str(json.loads(body)[0][0])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
