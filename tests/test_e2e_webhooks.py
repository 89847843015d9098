"""End to end: signed webhooks from real workers to a real receiver, retries and 410."""

from __future__ import annotations

import json
import time
import uuid

from tests.fixtures.stack import Stack, WebhookReceiver, png_bytes, wait_until

TIMEOUT = 60


def _submit(stack: Stack, url: str, events: list[str] | None = None) -> dict:
    key = f"in/{uuid.uuid4().hex}.png"
    stack.s3().put_object(Bucket=stack.bucket, Key=key, Body=png_bytes(16, 16))
    fields = {"webhook": url}
    if events:
        fields["webhook_events_filter"] = events
    return stack.client("alice").submit(f"s3://{stack.bucket}/{key}", **fields)


def test_start_and_completed_are_signed_and_carry_the_job(stack: Stack,
                                                         webhook_receiver: WebhookReceiver) -> None:
    job = _submit(stack, webhook_receiver.url("/both"), ["start", "completed"])
    got = wait_until(lambda: _at_least(webhook_receiver, "/both", 2), timeout=TIMEOUT,
                     what="two webhook deliveries")
    assert all(r.verified for r in got)
    events = {r.headers["x-faceparse-event"]: json.loads(r.body) for r in got}
    assert set(events) == {"start", "completed"}
    assert events["completed"]["id"] == job["id"] and events["completed"]["status"] == "succeeded"
    assert len({r.headers["webhook-id"] for r in got}) == 2  # one id per event
    final = wait_until(lambda: _deliveries(stack, job["id"], 2), timeout=TIMEOUT, what="recorded deliveries")
    assert sorted((d.event, d.outcome, d.status_code) for d in final) == [
        ("completed", "delivered", 200), ("start", "delivered", 200)]


def test_default_filter_sends_only_completed(stack: Stack, webhook_receiver: WebhookReceiver) -> None:
    job = _submit(stack, webhook_receiver.url("/default"))
    stack.client("alice").wait([job["id"]], timeout=TIMEOUT)
    wait_until(lambda: webhook_receiver.received("/default"), timeout=TIMEOUT, what="the completed webhook")
    time.sleep(0.5)
    assert [r.headers["x-faceparse-event"] for r in webhook_receiver.received("/default")] == ["completed"]


def test_500_then_200_retries_with_the_same_webhook_id(stack: Stack,
                                                       webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.respond("/flaky", [500, (503, {"Retry-After": "1"})])
    job = _submit(stack, webhook_receiver.url("/flaky"))
    got = wait_until(lambda: _at_least(webhook_receiver, "/flaky", 3), timeout=TIMEOUT, what="three attempts")
    assert [r.status for r in got] == [500, 503, 200]
    assert len({r.headers["webhook-id"] for r in got}) == 1
    assert all(r.verified for r in got)
    deliveries = wait_until(lambda: _deliveries(stack, job["id"], 3), timeout=TIMEOUT, what="3 recorded")
    assert [(d.attempt, d.status_code, d.outcome) for d in deliveries] == [
        (1, 500, "retrying"), (2, 503, "retrying"), (3, 200, "delivered")]
    assert stack.client("alice").get(job["id"])["status"] == "succeeded"


def test_410_stops_and_never_fails_the_job(stack: Stack, webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.respond("/gone", [410, 500, 500])
    job = _submit(stack, webhook_receiver.url("/gone"))
    wait_until(lambda: webhook_receiver.received("/gone"), timeout=TIMEOUT, what="the first attempt")
    time.sleep(2.5)  # several backoff periods (base 0.2 s): no further attempt may come
    assert [r.status for r in webhook_receiver.received("/gone")] == [410]
    [delivery] = _deliveries(stack, job["id"], 1)
    assert (delivery.status_code, delivery.outcome) == (410, "failed")
    assert stack.client("alice").get(job["id"])["status"] == "succeeded"


def _deliveries(stack: Stack, job_id: str, n: int) -> list:
    job = stack.jobs.get(job_id)
    found = job.webhook.deliveries if job and job.webhook else []
    return found if len(found) >= n else []


def _at_least(receiver: WebhookReceiver, path: str, n: int) -> list:
    got = receiver.received(path)
    return got if len(got) >= n else []
