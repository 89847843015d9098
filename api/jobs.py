"""Creating jobs (one or a batch), queueing each with its record in one Redis transaction, and
showing them with output URLs.

The API never holds image bytes past the request: uploads and data: URLs are written to the object
store and the job's `input` becomes that URL; the task carries only the job id.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from PIL import Image, UnidentifiedImageError
from werkzeug.utils import secure_filename

from storage import keys
from storage.errors import ImageTooLarge, InputForbidden, InvalidInput, Unavailable, UnsupportedFormat
from storage.inputs import check_bucket, parse_data_url, validate_input_url
from storage.jobs import Job, WebhookInfo, new_id
from storage.netguard import check_url
from storage.objects import S3_SCHEME, split_s3_url
from storage.queue import PARSE_QUEUE, PARSE_TASK, task_message

if TYPE_CHECKING:
    from werkzeug.datastructures import FileStorage

    from api.schemas import BatchCreate, JobFields
    from api.services import Services

log = structlog.get_logger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
# Custom output prefixes may not reach into the folders the service names by job id: a tenant could
# otherwise write into (or read back through /v1/files) another tenant's job.
RESERVED_FOLDERS = ("jobs", "uploads")


@dataclass
class Upload:
    """Image bytes that arrived with the request (multipart file or data: URL), already sniffed."""

    data: bytes
    filename: str
    fmt: str  # PIL's format name, lower case

    @classmethod
    def checked(cls, data: bytes, filename: str, *, max_pixels: int) -> Upload:
        """Refuse what is not an image (415) or too many pixels (413) before anything is stored."""
        fmt = sniff_image(data, max_pixels=max_pixels)
        return cls(data, filename or f"input.{fmt}", fmt)


# --- checks ---------------------------------------------------------------------------------
def sniff_image(data: bytes, *, max_pixels: int) -> str:
    """The image's format from its header alone (no full decode); 415 when it is no image we read."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            fmt = (image.format or "").lower()
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"the image has more than {max_pixels} pixels") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise UnsupportedFormat("the upload is not an image in a supported format") from exc
    if width * height > max_pixels:
        raise ImageTooLarge(f"the image is {width}x{height}, above the limit of {max_pixels} pixels")
    return fmt or "bin"


def read_upload(file: FileStorage, *, max_bytes: int, max_pixels: int) -> Upload:
    """Read a multipart file, refusing more than `max_bytes` (413)."""
    data = file.stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageTooLarge(f"the upload is larger than the limit of {max_bytes} bytes")
    if not data:
        raise InvalidInput("the uploaded file `image` is empty", code="invalid_image")
    return Upload.checked(data, secure_filename(file.filename or ""), max_pixels=max_pixels)


def check_webhook(url: str | None, *, allow_private: bool) -> None:
    """A webhook must be https (http only where private targets are allowed) and pass the SSRF guard."""
    if url is None:
        return
    scheme = url.partition("://")[0].lower()
    if scheme != "https" and not (scheme == "http" and allow_private):
        raise InvalidInput("webhook must be an https:// URL", code="invalid_webhook")
    check_url(url, allow_private=allow_private)


def resolve_output_prefix(svc: Services, prefix: str | None) -> str | None:
    """Normalise a requested output prefix to a full URL ending in `/`; None keeps the default.

    Accepted: `s3://bucket/dir/` (bucket allow-list applies) or a path under the storage root,
    relative (`results/run1/`) or as a full URL of the root.
    """
    if prefix is None:
        return None
    root = svc.object_store.storage_url.rstrip("/")
    if prefix.startswith(S3_SCHEME):
        bucket, path = split_s3_url(prefix)
        if not (root.startswith(S3_SCHEME) and split_s3_url(root)[0] == bucket):  # its own bucket
            check_bucket(prefix, svc.settings.allowed_buckets())
        full = f"{S3_SCHEME}{bucket}/{path.strip('/')}".rstrip("/")
    elif "://" in prefix:
        if not prefix.startswith(root + "/"):
            raise InvalidInput("output_prefix must be s3://… or under the storage root", code="invalid_url")
        full = prefix.rstrip("/")
    else:
        full = f"{root}/{prefix.strip('/')}"
    relative = full[len(root) + 1 :] if full.startswith(root + "/") else None
    if relative is not None:
        parts = relative.split("/")
        if any(p in ("", ".", "..") for p in parts) or posixpath.normpath(relative) != relative:
            raise InvalidInput("output_prefix must not contain empty, '.' or '..' parts", code="invalid_url")
        if parts[0] in RESERVED_FOLDERS:
            raise InputForbidden(f"output_prefix may not be under {parts[0]}/ (reserved for job files)")
    elif full == root:
        raise InputForbidden("output_prefix may not be the storage root itself")
    return full + "/"


# --- creating -------------------------------------------------------------------------------
def prepare_input(svc: Services, url: str) -> tuple[str, Upload | None]:
    """Check an input URL; a data: URL becomes an upload the API stores before enqueueing."""
    if url.startswith("data:"):
        _mime, data = parse_data_url(url, max_bytes=svc.settings.max_upload_bytes)
        return url, Upload.checked(data, "", max_pixels=svc.settings.max_pixels)
    validate_input_url(url, allow_private=svc.settings.webhook_allow_private)
    bucket_check(svc, url)
    host_check(svc, url)
    return url, None


def host_check(svc: Services, url: str) -> None:
    """Refuse an http(s) input whose host is, or resolves to, a loopback, private, link-local or
    metadata address (422 `input_forbidden`) at submission rather than as a failed job later.

    The worker checks again on every hop it fetches (DNS may answer differently by then); a name
    that does not resolve now is left to the worker, whose fetch fails (or retries) with its code.
    """
    if url.partition("://")[0].lower() not in ("http", "https"):
        return
    try:
        check_url(url, allow_private=svc.settings.webhook_allow_private)
    except InputForbidden:
        raise
    except (InvalidInput, Unavailable) as exc:
        log.info("input host not checked at submission", code=exc.code)


def bucket_check(svc: Services, url: str) -> None:
    """Refuse s3:// inputs outside `FACEPARSE_INPUT_BUCKETS` (when set) at submission, not later."""
    if url.startswith(S3_SCHEME):
        check_bucket(url, svc.settings.allowed_buckets())


def new_job(tenant: str, fields: JobFields, input_url: str, output_prefix: str | None) -> Job:
    """A queued job record for `input_url` (not stored yet)."""
    webhook = None
    if fields.webhook is not None:
        webhook = WebhookInfo(
            url=fields.webhook, events_filter=list(dict.fromkeys(fields.webhook_events_filter))
        )
    return Job(
        input=input_url,
        tenant=tenant,
        webhook=webhook,
        requested_outputs=list(dict.fromkeys(fields.outputs)),
        output_prefix=output_prefix,
    )


def store_upload(svc: Services, job: Job, upload: Upload) -> str:
    """Write the upload under `uploads/{job id}/` and return its URL (the job's input)."""
    url = keys.upload_url(svc.object_store.storage_url, job.id, upload.filename)
    svc.object_store.put(url, upload.data, Image.MIME.get(upload.fmt.upper(), "application/octet-stream"))
    return url


def submit_job(
    svc: Services,
    tenant: str,
    fields: JobFields,
    *,
    input_url: str | None = None,
    upload: Upload | None = None,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Create, store and enqueue one job; `(job, False)` when the idempotency key was seen before."""
    check_webhook(fields.webhook, allow_private=svc.settings.webhook_allow_private)
    output_prefix = resolve_output_prefix(svc, fields.output_prefix)
    if input_url is not None:
        input_url, upload = prepare_input(svc, input_url)
    job = new_job(tenant, fields, input_url or "", output_prefix)
    if upload is not None:
        job.input = store_upload(svc, job, upload)
    stored, created = svc.job_store.create(job, idempotency_key=idempotency_key, also=queue_message(svc, job))
    if not created:
        if upload is not None:
            svc.object_store.delete(job.input)  # this request's copy, under its own unused job id
        return stored, False
    log.info("job queued", job_id=job.id, tenant=job.tenant, batch_id=job.batch_id)
    return stored, True


def submit_batch(svc: Services, tenant: str, body: BatchCreate) -> tuple[str, list[str]]:
    """Create one job per input (or per image under an S3 prefix), group them, enqueue them."""
    inputs = batch_inputs(svc, body)
    check_webhook(body.webhook, allow_private=svc.settings.webhook_allow_private)
    prefix = resolve_output_prefix(svc, body.output_prefix)
    prepared = [prepare_input(svc, url) for url in inputs]
    batch_id = new_id()
    jobs = []
    for url, upload in prepared:
        job = new_job(tenant, body, url, None)
        job.batch_id = batch_id
        if prefix is not None:
            job.output_prefix = f"{prefix}{job.id}/"
        if upload is not None:
            job.input = store_upload(svc, job, upload)
        jobs.append(job)
    svc.job_store.create_batch(tenant, [job.id for job in jobs], batch_id=batch_id)
    # Each job is stored with its queue message: if Redis fails midway, the jobs before are
    # queued for real and the rest never exist (the batch counts them in `total` only).
    for job in jobs:
        svc.job_store.create(job, also=queue_message(svc, job))
        log.info("job queued", job_id=job.id, tenant=job.tenant, batch_id=job.batch_id)
    return batch_id, [job.id for job in jobs]


def batch_inputs(svc: Services, body: BatchCreate) -> list[str]:
    """The batch's input URLs: the list given, or the images under the prefix (bounded)."""
    limit = svc.settings.max_batch_inputs
    if (body.inputs is None) == (body.prefix is None):
        raise InvalidInput("give exactly one of `inputs` or `prefix`", code="invalid_request")
    if body.inputs is not None:
        inputs = body.inputs
    else:
        if not body.prefix.startswith(S3_SCHEME):
            raise InvalidInput("prefix must be an s3://bucket/dir/ URL", code="invalid_url")
        bucket_check(svc, body.prefix)
        listed = svc.object_store.list(body.prefix, limit=limit + 1)
        inputs = [url for url in listed if posixpath.splitext(url)[1].lower() in IMAGE_EXTENSIONS]
        if not inputs:
            raise InvalidInput(f"no images under {body.prefix}", code="empty_batch")
    if len(inputs) > limit:
        raise InvalidInput(f"a batch holds at most {limit} inputs", code="batch_too_large")
    return inputs


def queue_message(svc: Services, job: Job) -> Callable[[Any], None]:
    """The job's parse message, written in the same Redis transaction as its record
    (`JobStore.create(also=...)`): a job is stored queued with its message or not at all.

    The message and its task-sent event are exactly what `send_task` would write
    (`storage.queue.task_message`), in one round trip instead of three.
    """
    return task_message(svc.celery, PARSE_TASK, [job.id], PARSE_QUEUE).write


# --- showing --------------------------------------------------------------------------------
def output_link(svc: Services, key: str) -> str | None:
    """Where a client downloads an output: presigned for S3, the API's /v1/files/… for local files."""
    if key.startswith(S3_SCHEME):
        return svc.object_store.presign(key, svc.settings.presign_expires_s)
    relative = svc.object_store.relative_key(key)
    if relative is None or relative.split("/", 1)[0] not in RESERVED_FOLDERS:
        return None  # outside what /v1/files serves
    return f"{svc.settings.public_url.rstrip('/')}/v1/files/{relative}"


def _fill_urls(svc: Services, node: Any) -> None:
    if not isinstance(node, dict):
        return
    if isinstance(node.get("key"), str):
        node["url"] = output_link(svc, node["key"])
        return
    for child in node.values():  # `masks`: label -> {"key": ...}
        _fill_urls(svc, child)


def present_job(svc: Services, job: Job) -> dict[str, Any]:
    """The job as every endpoint returns it: `Job.public()` with each output's `url` filled."""
    data = job.public()
    _fill_urls(svc, data.get("outputs") or {})
    return data
