"""Webhook delivery, Standard Webhooks v1 (https://www.standardwebhooks.com/).

Plain Python: `deliver_once` makes one signed attempt and says whether to retry and when;
the Celery task in `worker.tasks` only adapts that to the queue. A webhook failure never
fails the job: every attempt is recorded on the job and that is all.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import json
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import requests

from storage import keys
from storage.errors import FaceparseError
from storage.jobs import WEBHOOK_EVENTS, Job, WebhookDelivery, utcnow
from storage.netguard import guarded_request
from worker.metrics import observe_webhook

if TYPE_CHECKING:
    import redis

    from faceparse.settings import Settings
    from storage.jobstore import JobStore

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
USER_AGENT = "faceparse-webhooks/1"


def generate_secret() -> str:
    """A new `whsec_<base64 of 24 random bytes>` secret."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def secret_key_bytes(secret: str) -> bytes:
    """The HMAC key of a `whsec_…` secret: the base64 part decoded."""
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: `v1,<base64 HMAC-SHA256 of id.timestamp.body>`."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def resolve_secret(settings: Settings, client: redis.Redis) -> str:
    """The signing secret: the configured one, else one generated once and shared through Redis.

    SET NX makes the first process to ask the author; every other process (API replicas,
    workers on other nodes) reads the same value, so all deliveries verify with one secret.
    """
    if settings.webhook_secret:
        return settings.webhook_secret
    candidate = generate_secret()
    if client.set(keys.webhook_secret_key(), candidate, nx=True):
        # Logged once, by the process that made it: the operator needs it to verify deliveries.
        log.warning(
            "FACEPARSE_WEBHOOK_SECRET is not set; generated webhook signing secret %s "
            "(shared through Redis; set FACEPARSE_WEBHOOK_SECRET to pin it)", candidate,
        )
        return candidate
    stored = client.get(keys.webhook_secret_key())
    if stored is None:  # deleted between SET NX and GET: try again
        return resolve_secret(settings, client)
    return stored.decode() if isinstance(stored, bytes) else str(stored)


def wants_event(job: Job, event: str) -> bool:
    """Whether the job has a webhook that subscribed to `event`."""
    return job.webhook is not None and event in job.webhook.events_filter


def backoff_delay(attempt: int, *, base: float, cap: float, retry_after: float | None = None,
                  rng: Callable[[float, float], float] = random.uniform) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based).

    Exponential with full jitter over its upper half, so receivers that recover do not get a
    thundering herd; a receiver's Retry-After wins when it asks for longer, always capped.
    """
    ceiling = min(cap, base * (2 ** (attempt - 1)))
    delay = rng(ceiling / 2, ceiling)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, cap)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """`Retry-After` as seconds: either delta-seconds or an HTTP date; None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class AttemptResult:
    """What one delivery attempt did; `retry_in` is set when another attempt should follow."""

    outcome: str  # delivered | retrying | failed | refused
    status_code: int | None = None
    error: str | None = None
    retry_in: float | None = None


def deliver_once(
    *,
    settings: Settings,
    jobs: JobStore,
    secret: str,
    job_id: str,
    event: str,
    webhook_id: str,
    attempt: int,
) -> AttemptResult:
    """Make delivery attempt `attempt` of `event` for the job and record it on the job."""
    job = jobs.get(job_id)
    if job is None or job.webhook is None:
        log.info("webhook skipped: job %s is gone or has no webhook", job_id)
        return AttemptResult(outcome="failed", error="job has no webhook")
    if event not in WEBHOOK_EVENTS or not wants_event(job, event):
        return AttemptResult(outcome="failed", error=f"event {event!r} not subscribed")
    url = job.webhook.url

    result = _attempt(settings, secret, job, event, webhook_id, attempt)
    observe_webhook(result.outcome)
    jobs.append_delivery(job_id, WebhookDelivery(
        event=event, attempt=attempt, status_code=result.status_code, at=utcnow(),
        error=result.error, outcome=result.outcome,
    ))
    log.info("webhook %s job=%s event=%s attempt=%d url=%s status=%s outcome=%s",
             webhook_id, job_id, event, attempt, url, result.status_code, result.outcome)
    return result


def _attempt(settings: Settings, secret: str, job: Job, event: str, webhook_id: str,
             attempt: int) -> AttemptResult:
    assert job.webhook is not None
    url = job.webhook.url
    body = json.dumps(job.public(), separators=(",", ":"), sort_keys=True).encode()
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, webhook_id, timestamp, body),
        "x-faceparse-event": event,
    }
    try:
        # Checks the target, then connects to exactly the address it checked (no DNS
        # rebinding between check and connect) and never follows a redirect.
        resp = guarded_request("POST", url, data=body, headers=headers,
                               timeout=settings.webhook_timeout_s,
                               allow_private=settings.webhook_allow_private)
    except FaceparseError as exc:
        # A refused target never becomes acceptable by waiting: stop now.
        return AttemptResult(outcome="refused", error=f"{exc.code}: {exc.message}")
    except requests.RequestException as exc:
        return _retry_or_fail(settings, attempt, None, f"{type(exc).__name__}: {exc}", None)

    if 200 <= resp.status_code < 300:
        return AttemptResult(outcome="delivered", status_code=resp.status_code)
    if resp.status_code == 410:
        # 410 Gone: the receiver asks us to stop for good.
        return AttemptResult(outcome="failed", status_code=410, error="receiver answered 410 Gone")
    error = f"HTTP {resp.status_code}"
    if 300 <= resp.status_code < 400:
        error += " (redirects are not followed)"
    return _retry_or_fail(settings, attempt, resp.status_code, error,
                          parse_retry_after(resp.headers.get("retry-after")))


def _retry_or_fail(settings: Settings, attempt: int, status_code: int | None, error: str,
                   retry_after: float | None) -> AttemptResult:
    if attempt >= settings.webhook_max_attempts:
        return AttemptResult(outcome="failed", status_code=status_code,
                             error=f"{error}; gave up after {attempt} attempts")
    delay = backoff_delay(attempt, base=settings.webhook_backoff_base_s,
                          cap=settings.webhook_backoff_max_s, retry_after=retry_after)
    return AttemptResult(outcome="retrying", status_code=status_code, error=error, retry_in=delay)
