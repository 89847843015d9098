"""The collaborators of one app, kept in `app.extensions["faceparse"]` (Flask's extension slot)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flask import current_app

if TYPE_CHECKING:
    from celery import Celery

    from api.auth import ApiKeys
    from api.metrics import ApiMetrics
    from api.ratelimit import RateLimiter
    from faceparse.settings import Settings
    from storage.jobstore import JobStore
    from storage.objects import ObjectStore

EXTENSION = "faceparse"


@dataclass
class Services:
    """What the views use: settings, the Celery producer, the job store, the object store."""

    settings: Settings
    celery: Celery
    job_store: JobStore
    object_store: ObjectStore
    api_keys: ApiKeys
    metrics: ApiMetrics
    rate_limiter: RateLimiter | None = None  # None: no limit (FACEPARSE_RATE_LIMIT_PER_MINUTE=0)


def services() -> Services:
    """The current app's collaborators."""
    return current_app.extensions[EXTENSION]
