"""Every Redis key and every storage key is built here, nowhere else."""

from __future__ import annotations

PREFIX = "faceparse"


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def tenant_jobs_key(tenant: str) -> str:
    """Sorted set of a tenant's job ids scored by creation time (newest first via ZREVRANGE)."""
    return f"{PREFIX}:tenant:{tenant}:jobs"


def idempotency_key(tenant: str, key: str) -> str:
    return f"{PREFIX}:idem:{tenant}:{key}"


def batch_key(batch_id: str) -> str:
    return f"{PREFIX}:batch:{batch_id}"


def webhook_secret_key() -> str:
    return f"{PREFIX}:webhook_secret"


def rate_limit_key(tenant: str, window: int) -> str:
    return f"{PREFIX}:rate:{tenant}:{window}"


def status_jobs_key(status: str) -> str:
    """Sorted set of all job ids in one status, scored by creation time (for cheap /metrics counts)."""
    return f"{PREFIX}:status:{status}:jobs"


def lease_key(job_id: str) -> str:
    """The lease of the worker running a job: value = its owner, expiring unless renewed (worker.lease)."""
    return f"{PREFIX}:lease:{job_id}"


def lost_key(job_id: str) -> str:
    """How many times a job's worker was found dead (an integer, expiring with the job)."""
    return f"{PREFIX}:lost:{job_id}"


def leased_jobs_key() -> str:
    """Sorted set of the job ids whose message a worker took (lease taken), scored by when (ms)."""
    return f"{PREFIX}:leased"


def reaper_lock_key() -> str:
    """Held (SET NX PX) by the one process scanning for lost jobs this interval."""
    return f"{PREFIX}:reaper:lock"


# --- storage keys (relative to a storage URL or an output prefix) -------------------------
def job_output_prefix(storage_url: str, job_id: str) -> str:
    """Default output prefix of a job: `{storage_url}/jobs/{id}/`."""
    return f"{storage_url.rstrip('/')}/jobs/{job_id}/"


def output_url(prefix: str, name: str) -> str:
    """`mask.png`, `overlay.png`, `summary.json` or `masks/<label>.png` under an output prefix."""
    return prefix.rstrip("/") + "/" + name


def uploads_prefix(storage_url: str) -> str:
    """The prefix under which every upload lives: `{storage_url}/uploads/`."""
    return f"{storage_url.rstrip('/')}/uploads/"


def upload_url(storage_url: str, job_id: str, filename: str) -> str:
    """Where an uploaded (or data-URL) input is stored before the worker reads it."""
    return f"{uploads_prefix(storage_url)}{job_id}/{filename}"
