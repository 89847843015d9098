"""Fault: webhook receivers that fail. (tests/test_e2e_webhooks.py covers 500/503-then-200 and 410.)

The session stack delivers with `FACEPARSE_WEBHOOK_MAX_ATTEMPTS=4` and a 0.2 s backoff base, so a
receiver that fails three times is delivered on the last allowed attempt, and one that is down
for good is given up on after exactly four attempts; neither ever changes the job's own status.
"""

from __future__ import annotations

import json
import time
import uuid

from tests.fixtures.stack import Stack, WebhookReceiver, free_port, png_bytes, wait_until

TIMEOUT = 60
MAX_ATTEMPTS = 4  # FACEPARSE_WEBHOOK_MAX_ATTEMPTS of the session stack


def _submit(stack: Stack, webhook: str) -> dict:
    key = f"in/{uuid.uuid4().hex}.png"
    stack.s3().put_object(Bucket=stack.bucket, Key=key, Body=png_bytes(16, 16))
    return stack.client("alice").submit(f"s3://{stack.bucket}/{key}", webhook=webhook)


def _deliveries(stack: Stack, job_id: str, final: str) -> list:
    """The job's recorded deliveries once the last one has outcome `final` (else empty)."""
    job = stack.jobs.get(job_id)
    found = job.webhook.deliveries if job and job.webhook else []
    return found if found and found[-1].outcome == final else []


def test_three_500s_then_delivered_on_the_fourth_attempt(stack: Stack,
                                                          webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.respond("/flaky3", [500, 500, 500])
    start = time.monotonic()
    job = _submit(stack, webhook_receiver.url("/flaky3"))
    got = wait_until(lambda: (r := webhook_receiver.received("/flaky3")) and len(r) >= 4 and r,
                     timeout=TIMEOUT, what="four delivery attempts")
    took = time.monotonic() - start
    assert [r.status for r in got] == [500, 500, 500, 200]
    assert len({r.headers["webhook-id"] for r in got}) == 1, "retries must keep the webhook-id"
    assert all(r.verified for r in got), "every attempt is signed"
    # Every attempt carries the completed job (its delivery log grows, so bodies differ).
    bodies = [json.loads(r.body) for r in got]
    assert {(b["id"], b["status"]) for b in bodies} == {(job["id"], "succeeded")}
    recorded = wait_until(lambda: _deliveries(stack, job["id"], "delivered"), timeout=TIMEOUT,
                          what="the delivery to be recorded")
    assert [(d.attempt, d.status_code, d.outcome) for d in recorded] == [
        (1, 500, "retrying"), (2, 500, "retrying"), (3, 500, "retrying"), (4, 200, "delivered")]
    assert stack.client("alice").get(job["id"])["status"] == "succeeded"
    time.sleep(1.0)  # delivered: nothing more may arrive
    assert len(webhook_receiver.received("/flaky3")) == 4
    print(f"\nwebhook 500x3 then 200: delivered on attempt 4, {took:.1f}s after submission")


def test_receiver_down_for_good_fails_the_delivery_not_the_job(stack: Stack) -> None:
    dead = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens: every attempt is refused
    start = time.monotonic()
    job = _submit(stack, dead)
    recorded = wait_until(lambda: _deliveries(stack, job["id"], "failed"), timeout=TIMEOUT,
                          what="the delivery to be given up")
    took = time.monotonic() - start
    assert [d.attempt for d in recorded] == list(range(1, MAX_ATTEMPTS + 1))
    assert [d.outcome for d in recorded] == ["retrying"] * (MAX_ATTEMPTS - 1) + ["failed"]
    assert all(d.status_code is None and d.error for d in recorded)
    assert f"gave up after {MAX_ATTEMPTS} attempts" in recorded[-1].error
    assert stack.client("alice").get(job["id"])["status"] == "succeeded"
    time.sleep(1.0)  # given up: no fifth attempt is recorded
    assert len(stack.jobs.get(job["id"]).webhook.deliveries) == MAX_ATTEMPTS
    print(f"\nwebhook receiver down: given up after {MAX_ATTEMPTS} attempts, {took:.1f}s after submission")
