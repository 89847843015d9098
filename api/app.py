"""The app factory: settings in, a Flask app with the v1 API, docs, health and metrics out."""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
from flask import Flask

from api import errors, openapi, ops, page, v1
from api.auth import ApiKeys
from api.metrics import ApiMetrics
from api.ratelimit import RateLimiter
from api.services import EXTENSION, Services
from storage.jobstore import JobStore
from storage.objects import ObjectStore
from storage.queue import make_celery

if TYPE_CHECKING:
    from celery import Celery

    from faceparse.settings import Settings

log = structlog.get_logger(__name__)

# Multipart boundaries and form fields, and base64's 4/3 inflation of data: URLs, on top of the image.
BODY_OVERHEAD_BYTES = 64 * 1024


def create_app(
    settings: Settings,
    *,
    celery: Celery | None = None,
    job_store: JobStore | None = None,
    object_store: ObjectStore | None = None,
) -> Flask:
    """Build the API for `settings`; tests inject their own Celery producer and stores."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes * 4 // 3 + BODY_OVERHEAD_BYTES
    app.json.sort_keys = False

    job_store = job_store or JobStore.from_url(settings.redis_url, settings.job_ttl_seconds)
    api_keys = ApiKeys(settings.tenant_keys())
    api_keys.warn_if_disabled()
    svc = Services(
        settings=settings,
        celery=celery
        or make_celery(
            settings.redis_url,
            visibility_timeout=settings.visibility_timeout,
            soft_time_limit=settings.task_soft_time_limit,
            time_limit=settings.task_time_limit,
        ),
        job_store=job_store,
        object_store=object_store or ObjectStore(settings.storage_url),
        api_keys=api_keys,
        metrics=ApiMetrics(job_store),
        rate_limiter=(
            RateLimiter(job_store.redis, settings.rate_limit_per_minute)
            if settings.rate_limit_per_minute > 0
            else None
        ),
    )
    app.extensions[EXTENSION] = svc

    svc.metrics.init_app(app)
    errors.register_error_handlers(app)
    app.register_blueprint(v1.bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(page.bp)
    openapi.init_app(app)
    log.info("api ready", storage=svc.object_store.storage_url, auth=api_keys.enabled)
    return app
