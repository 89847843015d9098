"""`storage.queue.task_message` writes what Celery's own `send_task` writes, to the letter of the
format: the message on the queue's list and the task-sent event on kombu's fanout channel."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import redis

from storage.queue import PARSE_QUEUE, PARSE_TASK, make_celery, parse_job_ids_waiting, task_message

# Differ from one message to the next: ids, this process's node name, clocks and times.
MESSAGE_VARIES = {("headers", "id"), ("headers", "root_id"), ("headers", "origin"),
                  ("properties", "correlation_id"), ("properties", "reply_to"),
                  ("properties", "delivery_tag")}
EVENT_VARIES = {"uuid", "root_id", "hostname", "pid", "clock", "timestamp", "utcoffset"}


def _body(envelope: dict[str, Any]) -> Any:
    assert envelope["properties"]["body_encoding"] == "base64"
    return json.loads(base64.b64decode(envelope["body"]))


def _shape(envelope: dict[str, Any]) -> dict[str, Any]:
    """The envelope with the parts that vary by message blanked and the body decoded."""
    out = json.loads(json.dumps(envelope))
    for section, key in MESSAGE_VARIES:
        if key in out.get(section, {}):
            out[section][key] = "*"
    out["body"] = _body(envelope)
    if isinstance(out["body"], dict):  # an event
        out["body"] = {k: ("*" if k in EVENT_VARIES else v) for k, v in out["body"].items()}
        out["headers"]["hostname"] = "*"
    return out


def _written(client: redis.Redis, write: Any) -> tuple[dict[str, Any], tuple[bytes, dict[str, Any]]]:
    """(the message pushed on the parse queue, (channel, event) published) by `write()`."""
    pubsub = client.pubsub()
    pubsub.psubscribe("*")
    assert pubsub.get_message(timeout=2)["type"] == "psubscribe"
    write()
    message = json.loads(client.lpop(PARSE_QUEUE))
    deadline = time.monotonic() + 5
    while (event := pubsub.get_message(timeout=1)) is None or event["type"] != "pmessage":
        assert time.monotonic() < deadline, "no event published"
    pubsub.close()
    return message, (event["channel"], json.loads(event["data"]))


def test_task_message_writes_what_send_task_writes(redis_url: str) -> None:
    app = make_celery(redis_url)
    client = redis.Redis.from_url(redis_url)
    sent, (sent_channel, sent_event) = _written(
        client, lambda: app.send_task(PARSE_TASK, args=["job-1"], queue=PARSE_QUEUE))

    def ours() -> None:
        pipe = client.pipeline(transaction=True)
        task_message(app, PARSE_TASK, ["job-1"], PARSE_QUEUE).write(pipe)
        pipe.execute()

    mine, (my_channel, my_event) = _written(client, ours)
    assert _shape(mine) == _shape(sent)
    assert _body(mine)[0] == ["job-1"] and mine["headers"]["task"] == PARSE_TASK
    assert my_channel == sent_channel == b"/0.celeryev/task.sent"
    assert _shape(my_event) == _shape(sent_event)
    assert _body(my_event)["uuid"] == mine["headers"]["id"]  # the event names its own message


def test_the_reaper_reads_a_message_written_this_way(redis_url: str) -> None:
    app = make_celery(redis_url)
    client = redis.Redis.from_url(redis_url)
    pipe = client.pipeline(transaction=True)
    task_message(app, PARSE_TASK, ["job-2"], PARSE_QUEUE).write(pipe)
    pipe.execute()
    assert parse_job_ids_waiting(client) == {"job-2"}
