"""The `/v1` blueprint: jobs, batches and files. Every request here names its tenant by API key."""

from __future__ import annotations

import functools
import mimetypes
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Blueprint, request, send_file
from spectree import Response
from werkzeug.exceptions import UnsupportedMediaType

from api.auth import authenticate, current_tenant
from api.jobs import Upload, present_job, read_upload, submit_batch, submit_job
from api.openapi import documented, spec
from api.schemas import (
    BatchCreate,
    BatchCreated,
    BatchOut,
    ErrorBody,
    JobCreate,
    JobForm,
    JobList,
    JobListQuery,
    JobOut,
)
from api.services import services
from storage.errors import InputForbidden, InvalidInput, NotFound
from storage.jobs import JobStatus, utcnow

if TYPE_CHECKING:
    from flask.typing import ResponseReturnValue

    from faceparse.settings import Settings

bp = Blueprint("v1", __name__, url_prefix="/v1")

BEARER = {"bearer": []}
ERRORS = {f"HTTP_{code}": ErrorBody for code in (401, 404, 503)}
# POSTs count against the tenant's rate limit (api.ratelimit): 429 with Retry-After.
POST_ERRORS = {**ERRORS, "HTTP_429": ErrorBody}
SUBMIT_ERRORS = {**POST_ERRORS, **{f"HTTP_{code}": ErrorBody for code in (400, 413, 415)}}
IDEMPOTENCY_KEY_MAX = 255
JSON = "application/json"
MULTIPART = "multipart/form-data"
FORM = "application/x-www-form-urlencoded"  # an `input` URL without a file (curl -d)


@bp.before_request
def authenticate_request() -> None:
    """Every /v1 request carries a valid API key (unless auth is off); POSTs count against the
    tenant's rate limit (429 past it)."""
    svc = services()
    authenticate(svc.api_keys)
    if request.method == "POST" and svc.rate_limiter is not None:
        svc.rate_limiter.hit(current_tenant())


def accepts(*mimetypes_: str) -> Callable:
    """Refuse other bodies with 415 and malformed JSON with 400, before the schema sees the body."""

    def decorate(view: Callable) -> Callable:
        @functools.wraps(view)
        def checked(*args: Any, **kwargs: Any) -> Any:
            if request.mimetype not in mimetypes_:
                raise UnsupportedMediaType(f"send the body as one of: {', '.join(mimetypes_)}")
            if request.mimetype == JSON:
                request.get_json()  # raises 400 on malformed JSON (cached for the validator)
            return view(*args, **kwargs)

        return checked

    return decorate


def idempotency_key() -> str | None:
    """The `Idempotency-Key` header, bounded."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 0 < len(key) <= IDEMPOTENCY_KEY_MAX:
        raise InvalidInput(
            f"Idempotency-Key must be 1..{IDEMPOTENCY_KEY_MAX} characters", code="invalid_request"
        )
    return key


# --- jobs -----------------------------------------------------------------------------------
@bp.post("/jobs")
@accepts(JSON, MULTIPART, FORM)
@spec.validate(
    json=JobCreate,
    form=JobForm,
    tags=["jobs"],
    security=BEARER,
    resp=Response(
        HTTP_202=JobOut, HTTP_200=(JobOut, "replayed: the job of this Idempotency-Key"), **SUBMIT_ERRORS
    ),
)
def create_job() -> ResponseReturnValue:
    """Create a job.

    JSON with an `input` URL (s3://, https://, data:), or multipart/form-data with the file in
    `image`. Answers 202 with the job and its Location; the same `Idempotency-Key` answers 200
    with the job it created before.
    """
    svc, key = services(), idempotency_key()
    if request.mimetype == JSON:
        body: JobCreate = request.context.json
        job, created = submit_job(svc, current_tenant(), body, input_url=body.input, idempotency_key=key)
    else:
        form: JobForm = request.context.form
        input_url, upload = form_input(form, svc.settings)
        job, created = submit_job(
            svc, current_tenant(), form, input_url=input_url, upload=upload, idempotency_key=key
        )
    headers = {"Location": f"/v1/jobs/{job.id}", **({} if created else {"Idempotent-Replayed": "true"})}
    return present_job(svc, job), 202 if created else 200, headers


def form_input(form: JobForm, settings: Settings) -> tuple[str | None, Upload | None]:
    """A multipart job's input: exactly one of the `image` file or an `input` URL."""
    file = request.files.get("image")
    if (file is None) == (form.input is None):
        raise InvalidInput(
            "send exactly one of the file `image` or the field `input`", code="invalid_request"
        )
    if file is None:
        return form.input, None
    return None, read_upload(file, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)


@bp.get("/jobs/<job_id>")
@spec.validate(tags=["jobs"], security=BEARER, resp=Response(HTTP_200=JobOut, **ERRORS))
def get_job(job_id: str) -> ResponseReturnValue:
    """Get a job."""
    svc = services()
    return present_job(svc, svc.job_store.get_for_tenant(job_id, current_tenant()))


@bp.post("/jobs/<job_id>/cancel")
@spec.validate(tags=["jobs"], security=BEARER, resp=Response(HTTP_200=JobOut, **POST_ERRORS))
def cancel_job(job_id: str) -> ResponseReturnValue:
    """Cancel a job: it becomes `canceled` unless it had already finished."""
    svc, tenant = services(), current_tenant()
    job = svc.job_store.get_for_tenant(job_id, tenant)
    if not job.status.is_terminal():
        # None: it finished meanwhile (the store refuses to leave a terminal state); show that.
        job = svc.job_store.transition(job_id, JobStatus.CANCELED, completed_at=utcnow()) or (
            svc.job_store.get_for_tenant(job_id, tenant)
        )
    return present_job(svc, job)


@bp.get("/jobs")
@spec.validate(query=JobListQuery, tags=["jobs"], security=BEARER, resp=Response(HTTP_200=JobList, **ERRORS))
def list_jobs() -> ResponseReturnValue:
    """List the tenant's jobs, newest first; filter by `status`, page with `cursor`."""
    svc, query = services(), request.context.query
    jobs, cursor = svc.job_store.list(
        current_tenant(), status=query.status, limit=query.limit, cursor=query.cursor
    )
    return {"jobs": [present_job(svc, job) for job in jobs], "next_cursor": cursor}


# --- batches --------------------------------------------------------------------------------
@bp.post("/batches")
@accepts(JSON)
@spec.validate(
    json=BatchCreate, tags=["batches"], security=BEARER, resp=Response(HTTP_202=BatchCreated, **SUBMIT_ERRORS)
)
def create_batch() -> ResponseReturnValue:
    """Create a batch: one job per input, or per image under an S3 prefix."""
    batch_id, job_ids = submit_batch(services(), current_tenant(), request.context.json)
    body = {"id": batch_id, "job_ids": job_ids, "total": len(job_ids)}
    return body, 202, {"Location": f"/v1/batches/{batch_id}"}


@bp.get("/batches/<batch_id>")
@spec.validate(tags=["batches"], security=BEARER, resp=Response(HTTP_200=BatchOut, **ERRORS))
def get_batch(batch_id: str) -> ResponseReturnValue:
    """Get a batch: its job ids and how many are in each status."""
    batch = services().job_store.get_batch(batch_id, current_tenant())
    return batch_view(batch)


def batch_view(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch as the API shows it."""
    job_ids = list(batch["job_ids"])
    return {
        "id": batch["id"],
        "job_ids": job_ids,
        "total": len(job_ids),
        "counts": dict(batch.get("counts", {})),
        "created_at": batch.get("created_at"),
    }


# --- files ----------------------------------------------------------------------------------
@bp.get("/files/<path:key>")
@documented(tags=["files"], security=BEARER, resp=Response("HTTP_200", **ERRORS))
def get_file(key: str) -> ResponseReturnValue:
    """Download an output or upload of the tenant's (local-directory storage only)."""
    svc = services()
    if not svc.object_store.is_local:
        raise NotFound("files are served by presigned URLs when storage is S3")
    job_id = file_owner(key)
    svc.job_store.get_for_tenant(job_id, current_tenant())
    try:
        path = svc.object_store.local_path(svc.object_store.url_for_key(key))
    except InputForbidden as exc:  # e.g. a symlink out of the root: nothing to see here
        raise NotFound(f"no such file: {key}") from exc
    if not path.is_file():
        raise NotFound(f"no such file: {key}")
    return send_file(path, mimetype=mimetypes.guess_type(path.name)[0] or "application/octet-stream")


def file_owner(key: str) -> str:
    """The job id a file key belongs to: `jobs/{id}/…` or `uploads/{id}/…`; 404 for anything else."""
    parts = key.split("/")
    if (
        len(parts) < 3
        or parts[0] not in ("jobs", "uploads")
        or any(p in ("", ".", "..") or "\\" in p for p in parts)
    ):
        raise NotFound(f"no such file: {key}")
    return parts[1]
