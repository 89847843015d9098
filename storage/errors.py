"""Domain errors. Each carries a stable `code`; the API maps them to HTTP in one place
(`api/errors.py`) and the worker records them on the failed job."""

from __future__ import annotations


class FaceparseError(Exception):
    """Base class: `code` is stable and documented, `http_status` is what the API answers."""

    code = "internal_error"
    http_status = 500
    retryable = False  # True: a transient fault; the worker retries with backoff

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


# --- bad input: never retried -------------------------------------------------------------
class InvalidInput(FaceparseError):
    code = "invalid_input"
    http_status = 422


class InvalidImage(InvalidInput):
    code = "invalid_image"


class UnsupportedFormat(InvalidInput):
    code = "unsupported_format"
    http_status = 415


class ImageTooLarge(InvalidInput):
    code = "image_too_large"
    http_status = 413


class InputNotFound(InvalidInput):
    code = "input_not_found"
    http_status = 404


class InputForbidden(InvalidInput):
    """A URL or bucket the service refuses to read (SSRF guard, bucket allow-list)."""

    code = "input_forbidden"
    http_status = 422


# --- API-only answers -------------------------------------------------------------------
class Unauthorized(FaceparseError):
    code = "unauthorized"
    http_status = 401


class NotFound(FaceparseError):
    code = "not_found"
    http_status = 404


class Conflict(FaceparseError):
    code = "conflict"
    http_status = 409


class RateLimited(FaceparseError):
    code = "rate_limited"
    http_status = 429

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# --- transient faults: retried ----------------------------------------------------------
class Unavailable(FaceparseError):
    """A dependency (Redis, object storage, a remote URL) did not answer."""

    code = "unavailable"
    http_status = 503
    retryable = True


class StorageUnavailable(Unavailable):
    code = "storage_unavailable"


class FetchFailed(Unavailable):
    code = "fetch_failed"


# --- model ------------------------------------------------------------------------------
class ModelUnavailable(FaceparseError):
    """The model could not be loaded: a worker must fail loudly, never fake it."""

    code = "model_unavailable"
    http_status = 503
