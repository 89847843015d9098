"""Operations endpoints, without auth: `/healthz` (alive), `/readyz` (dependencies answer), `/metrics`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
from flask import Blueprint
from spectree import Response

from api.errors import error_response
from api.openapi import spec
from api.schemas import Health, NotReady, Readiness
from api.services import services
from storage.errors import StorageUnavailable, Unavailable

if TYPE_CHECKING:
    from flask.typing import ResponseReturnValue

log = structlog.get_logger(__name__)

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
@spec.validate(tags=["ops"], resp=Response(HTTP_200=Health))
def check_health() -> ResponseReturnValue:
    """The process is alive (no I/O)."""
    return {"status": "ok"}


@bp.get("/readyz")
@spec.validate(tags=["ops"], resp=Response(HTTP_200=Readiness, HTTP_503=NotReady))
def check_ready() -> ResponseReturnValue:
    """Redis and the object store answer; 503 naming the part that does not."""
    svc = services()
    checks = {"redis": "ok", "storage": "ok"}
    try:
        svc.job_store.ping()
    except Unavailable as exc:
        checks["redis"] = f"unreachable: {exc.message}"
    try:
        svc.object_store.ping()
    except StorageUnavailable as exc:
        checks["storage"] = f"unreachable: {exc.message}"
    failed = [part for part, state in checks.items() if state != "ok"]
    if failed:
        log.warning("not ready", failed=failed)
        return error_response(
            "unavailable", f"not ready: {', '.join(failed)} unreachable", 503, checks=checks
        )
    return {"status": "ok", "checks": checks}


@bp.get("/metrics")
@spec.validate(tags=["ops"], resp=Response("HTTP_200"))
def get_metrics() -> ResponseReturnValue:
    """Prometheus metrics (text format): jobs by status, queue depth, request counts and latency."""
    return services().metrics.exposition()
