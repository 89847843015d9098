"""The `Job` model and `JobStatus`, shared by the API and the worker."""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from pydantic import BaseModel, Field

ANONYMOUS_TENANT = "anonymous"  # the tenant of every request while auth is off

OUTPUT_KINDS = ("mask", "overlay", "summary", "masks")
DEFAULT_OUTPUTS = ("mask", "overlay", "summary")
WEBHOOK_EVENTS = ("start", "completed")


class JobStatus(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})


def utcnow() -> str:
    """ISO-8601 UTC timestamp with millisecond precision and a `Z`."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def new_id(prefix: str = "") -> str:
    """An unguessable id: 128 random bits, lowercase base32 (26 characters, URL-safe, lossless)."""
    return prefix + base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()


class OutputRef(BaseModel):
    url: str | None = None  # presigned S3 URL or the API's /v1/files/... URL
    key: str  # s3://bucket/key or file:///dir/key


class JobError(BaseModel):
    code: str
    message: str


class WebhookDelivery(BaseModel):
    event: str
    attempt: int
    status_code: int | None = None
    at: str
    error: str | None = None
    outcome: str = "pending"  # delivered | retrying | failed | refused


class WebhookInfo(BaseModel):
    url: str
    events_filter: list[str] = Field(default_factory=lambda: ["completed"])
    deliveries: list[WebhookDelivery] = Field(default_factory=list)


class Job(BaseModel):
    """A job as stored in Redis and returned by the API (`public()` drops internal fields)."""

    id: str = Field(default_factory=new_id)
    status: JobStatus = JobStatus.QUEUED
    created_at: str = Field(default_factory=utcnow)
    started_at: str | None = None
    completed_at: str | None = None
    input: str
    attempts: int = 0
    outputs: dict[str, Any] = Field(default_factory=dict)  # name -> OutputRef (masks: label -> ref)
    summary: dict[str, Any] | None = None
    error: JobError | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    webhook: WebhookInfo | None = None
    batch_id: str | None = None

    # Internal: never shown to clients.
    tenant: str = ANONYMOUS_TENANT
    requested_outputs: list[str] = Field(default_factory=lambda: list(DEFAULT_OUTPUTS))
    output_prefix: str | None = None  # None: {storage_url}/jobs/{id}/
    model: str | None = None

    INTERNAL: ClassVar[frozenset[str]] = frozenset({"tenant", "requested_outputs", "output_prefix"})

    def public(self) -> dict[str, Any]:
        """The job as the API shows it."""
        data = self.model_dump(mode="json", exclude=set(self.INTERNAL))
        if data.get("batch_id") is None:
            data.pop("batch_id", None)
        return data
