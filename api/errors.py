"""The one place that turns exceptions into HTTP answers of the contract's shape.

Every error leaves the API as `{"error": {"code": "...", "message": "..."}}`: domain errors
(`storage.errors.FaceparseError`) carry their own `code` and `http_status`; werkzeug's HTTP errors
(404, 405, 413, ...) are translated here, request validation errors become `RequestInvalid` (spectree's
hook in `api.openapi`), and a Redis outage anywhere becomes `503 unavailable`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog
from flask import Response, jsonify
from kombu.exceptions import OperationalError as BrokerError
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from werkzeug.exceptions import HTTPException

from storage.errors import FaceparseError, InvalidInput, RateLimited

if TYPE_CHECKING:
    from flask import Flask

log = structlog.get_logger(__name__)

# werkzeug's HTTP errors by status: the codes clients see for errors the views never raise themselves.
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    # The only large bodies this API accepts are images (uploads and data: URLs).
    413: "image_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}


REDIS_UNAVAILABLE = "redis_unavailable"  # storage.jobstore's code for a lost Redis connection


class RequestInvalid(InvalidInput):
    """A request body or query that does not match its schema (422)."""

    code = "invalid_request"

    @classmethod
    def from_validation_error(cls, err: ValidationError) -> RequestInvalid:
        """Summarise pydantic's errors as `field: reason; ...` (values are not echoed back)."""
        parts = []
        for item in err.errors(include_url=False, include_input=False):
            where = ".".join(str(p) for p in item.get("loc", ())) or "body"
            parts.append(f"{where}: {item.get('msg', 'invalid')}")
        return cls("; ".join(parts) or "invalid request")


def error_response(code: str, message: str, status: int, **extra: Any) -> Response:
    """A JSON error in the contract's shape; `extra` adds top-level fields (e.g. `checks`)."""
    response = jsonify({"error": {"code": code, "message": message}, **extra})
    response.status_code = status
    return response


def _handle_domain_error(err: FaceparseError) -> Response:
    if err.code == REDIS_UNAVAILABLE:
        # The job store's own wrapper of a lost connection: one answer for every Redis outage, and
        # never the internal address its message carries.
        return _handle_redis_down(err)
    if err.http_status >= 500:
        log.warning("request failed", code=err.code, error=err.message)
    response = error_response(err.code, err.message, err.http_status)
    if isinstance(err, RateLimited):
        response.headers["Retry-After"] = str(err.retry_after)
    return response


def _handle_http_error(err: HTTPException) -> Response:
    status = err.code or 500
    if status >= 500:
        # Flask hands unhandled exceptions here wrapped in InternalServerError.
        original = getattr(err, "original_exception", None)
        log.error("unhandled error", exc_info=original or err)
        message = "internal server error"
    else:
        message = err.description or err.name
    response = error_response(HTTP_CODES.get(status, f"http_{status}"), message, status)
    if status == 405 and err.get_headers():
        response.headers.update({k: v for k, v in err.get_headers() if k.lower() == "allow"})
    return response


def _handle_redis_down(err: Exception) -> Response:
    log.warning("redis unavailable", error=str(err))
    return error_response("unavailable", "the job store (Redis) is unreachable; try again later", 503)


def _handle_broker_down(err: BrokerError) -> Response:
    log.warning("broker unavailable", error=str(err))
    return error_response("unavailable", "the job queue (Redis) is unreachable; try again later", 503)


def register_error_handlers(app: Flask) -> None:
    """Install the handlers on `app`: every error answer of the API comes from here."""
    app.register_error_handler(FaceparseError, _handle_domain_error)
    app.register_error_handler(HTTPException, _handle_http_error)
    app.register_error_handler(RedisConnectionError, _handle_redis_down)
    app.register_error_handler(RedisTimeoutError, _handle_redis_down)
    app.register_error_handler(BrokerError, _handle_broker_down)
