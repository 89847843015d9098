"""The one settings object, read from `FACEPARSE_*` variables at the entry points."""

from __future__ import annotations

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything configurable. S3 endpoint and credentials come from boto3's own variables."""

    model_config = SettingsConfigDict(env_prefix="FACEPARSE_", extra="ignore")

    redis_url: str = "redis://localhost:6379/0"
    storage_url: str = "file://./faceparse-data"

    # Model and device.
    model: str = "jonathandinu/face-parsing"
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int | None = None  # None: chosen from the device (see worker.model)
    batch_wait_ms: int | None = None  # None: chosen from the device (see worker.model)
    worker_slots: int | None = None  # jobs in flight per worker process; None: 2 x max_batch + 1

    # API.
    api_keys: str = ""  # "tenant:key,tenant2:key2"; empty turns auth off (with a warning)
    public_url: str = ""  # base URL put in front of /v1/files/... links; empty = relative
    max_upload_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 50_000_000
    max_batch_inputs: int = 1000
    input_buckets: str = ""  # comma-separated; empty = any bucket
    rate_limit_per_minute: int = 600  # POST requests per tenant per minute (fixed window); 0 disables

    # Jobs and queue.
    job_ttl_seconds: int = 7 * 24 * 3600
    task_soft_time_limit: int = 300
    task_time_limit: int = 360
    visibility_timeout: int = 3600  # must stay above task_time_limit
    max_retries: int = 3  # transient storage/network failures
    fetch_timeout_s: float = 30.0
    # Lost workers (worker.lease): a running job's lease expires this long after its worker
    # stops renewing it; a reaper checks every reaper_interval_seconds; a job whose worker was
    # lost max_attempts times fails with `worker_lost`.
    lease_seconds: float = 30.0
    reaper_interval_seconds: float = 10.0
    max_attempts: int = 3
    presign_expires_s: int = 3600

    # Webhooks.
    webhook_secret: str = ""  # whsec_...; generated once and shared through Redis when unset
    webhook_allow_private: bool = False
    webhook_max_attempts: int = 8
    webhook_timeout_s: float = 10.0
    webhook_backoff_base_s: float = 1.0
    webhook_backoff_max_s: float = 300.0

    # Operations (see docs/OPERATIONS.md).
    log_level: str = "INFO"
    log_format: str = "json"  # json (one object per line) or console
    worker_metrics_port: int | None = None  # a worker serves Prometheus metrics here when set

    @field_validator("visibility_timeout")
    @classmethod
    def _visibility_above_limit(cls, v: int, info) -> int:
        limit = info.data.get("task_time_limit", 0)
        if v <= limit:
            raise ValueError(
                f"FACEPARSE_VISIBILITY_TIMEOUT ({v}) must exceed FACEPARSE_TASK_TIME_LIMIT ({limit})"
            )
        return v

    def tenant_keys(self) -> dict[str, str]:
        """Map API key -> tenant from `FACEPARSE_API_KEYS`."""
        keys: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in self.api_keys.split(","))):
            tenant, sep, key = item.partition(":")
            if not sep or not tenant or not key:
                raise ValueError(f"FACEPARSE_API_KEYS entry {item!r} is not tenant:key")
            keys[key] = tenant
        return keys

    def allowed_buckets(self) -> set[str]:
        return {b.strip() for b in self.input_buckets.split(",") if b.strip()}

