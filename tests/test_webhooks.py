"""Webhook signing, verification and single delivery attempts against a real receiver and real Redis.

The queue side (retries as Celery messages, same webhook-id) is covered end to end in
tests/test_e2e_webhooks.py.
"""

from __future__ import annotations

import json
import socket
import time
from email.utils import formatdate

import pytest

from faceparse.client import verify_webhook
from faceparse.settings import Settings
from storage.jobs import Job, JobStatus, WebhookInfo, new_id
from storage.jobstore import JobStore
from tests.fixtures.stack import WEBHOOK_SECRET, WebhookReceiver
from worker import webhooks

# The Standard Webhooks reference vector (standard-webhooks spec test suite).
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TS = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_sign_matches_the_standard_webhooks_vector() -> None:
    assert webhooks.sign(VECTOR_SECRET, VECTOR_ID, VECTOR_TS, VECTOR_BODY) == VECTOR_SIG


def _headers(sig: str = VECTOR_SIG, ts: int = VECTOR_TS, msg_id: str = VECTOR_ID) -> dict[str, str]:
    return {"Webhook-Id": msg_id, "Webhook-Timestamp": str(ts), "Webhook-Signature": sig}


@pytest.mark.parametrize(
    ("secret", "headers", "body", "now", "ok"),
    [
        (VECTOR_SECRET, _headers(), VECTOR_BODY, VECTOR_TS, True),
        (VECTOR_SECRET, _headers(), VECTOR_BODY.decode(), VECTOR_TS + 299, True),
        (VECTOR_SECRET, _headers(sig="v1,bm9wZQ== " + VECTOR_SIG), VECTOR_BODY, VECTOR_TS, True),
        (VECTOR_SECRET, _headers(), b'{"test": 2432232315}', VECTOR_TS, False),  # tampered body
        (VECTOR_SECRET, _headers(msg_id="msg_other"), VECTOR_BODY, VECTOR_TS, False),
        (WEBHOOK_SECRET, _headers(), VECTOR_BODY, VECTOR_TS, False),  # wrong secret
        (VECTOR_SECRET, _headers(), VECTOR_BODY, VECTOR_TS + 301, False),  # too old: replay
        (VECTOR_SECRET, _headers(), VECTOR_BODY, VECTOR_TS - 301, False),  # from the future
        (VECTOR_SECRET, _headers(sig="v2," + VECTOR_SIG[3:]), VECTOR_BODY, VECTOR_TS, False),
        (VECTOR_SECRET, {"webhook-id": VECTOR_ID}, VECTOR_BODY, VECTOR_TS, False),  # headers missing
        ("whsec_not base64!", _headers(), VECTOR_BODY, VECTOR_TS, False),
    ],
)
def test_verify_webhook(secret: str, headers: dict[str, str], body: bytes | str, now: float,
                        ok: bool) -> None:
    assert verify_webhook(secret, headers, body, now=now) is ok


def test_backoff_grows_is_jittered_capped_and_honours_retry_after() -> None:
    low = [webhooks.backoff_delay(n, base=1, cap=30, rng=lambda a, b: a) for n in (1, 2, 3, 4, 10)]
    high = [webhooks.backoff_delay(n, base=1, cap=30, rng=lambda a, b: b) for n in (1, 2, 3, 4, 10)]
    assert high == [1, 2, 4, 8, 30]
    assert low == [0.5, 1, 2, 4, 15]
    assert webhooks.backoff_delay(1, base=1, cap=30, retry_after=12, rng=lambda a, b: b) == 12
    assert webhooks.backoff_delay(1, base=1, cap=30, retry_after=3600, rng=lambda a, b: b) == 30


def test_parse_retry_after() -> None:
    assert webhooks.parse_retry_after("7") == 7.0
    now = time.time()
    assert webhooks.parse_retry_after(formatdate(now + 60, usegmt=True), now=now) == pytest.approx(60, abs=1)
    assert webhooks.parse_retry_after("soon") is None
    assert webhooks.parse_retry_after(None) is None


def test_generated_secret_is_shared_through_redis(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    unset = Settings(redis_url=redis_url, webhook_secret="")
    first = webhooks.resolve_secret(unset, client)
    second = webhooks.resolve_secret(unset, redis.Redis.from_url(redis_url))
    assert first == second and first.startswith("whsec_")
    assert len(webhooks.secret_key_bytes(first)) == 24
    pinned = Settings(redis_url=redis_url, webhook_secret=WEBHOOK_SECRET)
    assert webhooks.resolve_secret(pinned, client) == WEBHOOK_SECRET


# --- one delivery attempt against a real receiver -------------------------------------------------
def _settings(redis_url: str, **over: object) -> Settings:
    base: dict[str, object] = dict(
        redis_url=redis_url, webhook_secret=WEBHOOK_SECRET, webhook_allow_private=True,
        webhook_backoff_base_s=0.01, webhook_backoff_max_s=5, webhook_max_attempts=3, webhook_timeout_s=2,
    )
    base.update(over)
    return Settings(**base)  # type: ignore[arg-type]


def _job(store: JobStore, url: str, events: list[str] | None = None) -> Job:
    job = Job(input="s3://b/k.png", status=JobStatus.SUCCEEDED,
              webhook=WebhookInfo(url=url, events_filter=events or ["completed"]))
    created, _ = store.create(job)
    return created


def _deliver(settings: Settings, store: JobStore, job: Job, attempt: int = 1, event: str = "completed",
             webhook_id: str = "msg_test") -> webhooks.AttemptResult:
    return webhooks.deliver_once(settings=settings, jobs=store, secret=WEBHOOK_SECRET, job_id=job.id,
                                 event=event, webhook_id=webhook_id, attempt=attempt)


def test_delivered_with_a_valid_signature_and_the_job_as_body(
        redis_url: str, job_store: JobStore, webhook_receiver: WebhookReceiver) -> None:
    job = _job(job_store, webhook_receiver.url("/ok"))
    result = _deliver(_settings(redis_url), job_store, job, webhook_id="msg_fixed")
    assert result.outcome == "delivered" and result.status_code == 200 and result.retry_in is None
    [got] = webhook_receiver.received("/ok")
    assert got.verified
    assert got.headers["webhook-id"] == "msg_fixed"
    assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 30
    body = json.loads(got.body)
    assert body["id"] == job.id and body["status"] == "succeeded"
    assert "tenant" not in body  # the job as the API shows it
    [recorded] = job_store.get(job.id).webhook.deliveries  # type: ignore[union-attr]
    assert (recorded.event, recorded.attempt, recorded.status_code, recorded.outcome) == (
        "completed", 1, 200, "delivered")


@pytest.mark.parametrize(
    ("answer", "outcome", "retries"),
    [
        (500, "retrying", True),
        (429, "retrying", True),
        (410, "failed", False),  # Gone: stop for good
        ((302, {"Location": "/elsewhere"}), "retrying", True),  # redirects are failed attempts
    ],
)
def test_non_2xx_answers(redis_url: str, job_store: JobStore, webhook_receiver: WebhookReceiver,
                         answer: int | tuple[int, dict[str, str]], outcome: str, retries: bool) -> None:
    webhook_receiver.respond("/h", [answer])
    job = _job(job_store, webhook_receiver.url("/h"))
    result = _deliver(_settings(redis_url), job_store, job)
    assert result.outcome == outcome
    assert (result.retry_in is not None) is retries
    assert [r.path for r in webhook_receiver.received()] == ["/h"]  # nothing followed a redirect
    [recorded] = job_store.get(job.id).webhook.deliveries  # type: ignore[union-attr]
    assert recorded.outcome == outcome and recorded.status_code == result.status_code


def test_retry_after_is_honoured_and_capped(redis_url: str, job_store: JobStore,
                                            webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.respond("/ra", [(503, {"Retry-After": "3"}), (503, {"Retry-After": "999"})])
    job = _job(job_store, webhook_receiver.url("/ra"))
    settings = _settings(redis_url)
    assert _deliver(settings, job_store, job).retry_in == 3
    assert _deliver(settings, job_store, job, attempt=2).retry_in == 5  # capped at backoff_max


def test_last_attempt_fails_without_retry(redis_url: str, job_store: JobStore,
                                          webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.respond("/x", [500])
    job = _job(job_store, webhook_receiver.url("/x"))
    result = _deliver(_settings(redis_url), job_store, job, attempt=3)
    assert result.outcome == "failed" and result.retry_in is None
    assert "gave up after 3 attempts" in (result.error or "")


def test_unreachable_receiver_is_retried(redis_url: str, job_store: JobStore) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    job = _job(job_store, f"http://127.0.0.1:{port}/hook")
    result = _deliver(_settings(redis_url), job_store, job)
    assert result.outcome == "retrying" and result.status_code is None
    assert "ConnectionError" in (result.error or "")


def test_loopback_refused_unless_allowed(redis_url: str, job_store: JobStore,
                                         webhook_receiver: WebhookReceiver) -> None:
    job = _job(job_store, webhook_receiver.url("/private"))
    result = _deliver(_settings(redis_url, webhook_allow_private=False), job_store, job)
    assert result.outcome == "refused" and result.retry_in is None
    assert webhook_receiver.received() == []
    [recorded] = job_store.get(job.id).webhook.deliveries  # type: ignore[union-attr]
    assert recorded.outcome == "refused"


def test_unsubscribed_event_sends_nothing(redis_url: str, job_store: JobStore,
                                          webhook_receiver: WebhookReceiver) -> None:
    job = _job(job_store, webhook_receiver.url("/f"), events=["completed"])
    result = _deliver(_settings(redis_url), job_store, job, event="start")
    assert result.outcome == "failed" and webhook_receiver.received() == []
    assert not webhooks.wants_event(job, "start") and webhooks.wants_event(job, "completed")
    assert not webhooks.wants_event(Job(input="x", id=new_id()), "completed")
