"""Request and response models of the HTTP API: pydantic at the wire only.

They validate requests (through spectree) and describe every endpoint in `/openapi.json`.
The stored `storage.jobs.Job` stays the one job model; `JobOut` only documents its public shape.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from storage.jobs import DEFAULT_OUTPUTS, JobStatus

OutputKind = Literal["mask", "overlay", "summary", "masks"]
WebhookEvent = Literal["start", "completed"]


# --- requests -----------------------------------------------------------------------------
class JobFields(BaseModel):
    """What a job asks for besides its input; shared by jobs and batches."""

    model_config = ConfigDict(extra="forbid")

    webhook: str | None = Field(None, description="https URL that receives signed job events")
    webhook_events_filter: list[WebhookEvent] = Field(
        default_factory=lambda: ["completed"], min_length=1, description="events sent to the webhook"
    )
    outputs: list[OutputKind] = Field(
        default_factory=lambda: list(DEFAULT_OUTPUTS), min_length=1, description="files to write"
    )
    output_prefix: str | None = Field(
        None, description="s3://bucket/prefix/ or a path under the storage root (default jobs/{id}/)"
    )


class JobCreate(JobFields):
    """JSON body of `POST /v1/jobs`."""

    input: str = Field(..., min_length=1, description="s3://bucket/key, https://… or data:image/…;base64,…")


def _split_commas(value: Any) -> Any:
    """Form fields may repeat (`outputs=mask&outputs=overlay`) or be comma-separated (`mask,overlay`)."""
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(item, str) for item in items):
        return value
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


class JobForm(JobFields):
    """multipart/form-data body of `POST /v1/jobs`: the image file in `image`, or an `input` URL."""

    image: Annotated[Any, WithJsonSchema({"type": "string", "format": "binary"})] = Field(
        None, description="the image file", json_schema_extra=lambda schema: schema.pop("default", None)
    )
    input: str | None = Field(None, description="an input URL instead of an uploaded image")

    @field_validator("webhook_events_filter", "outputs", mode="before")
    @classmethod
    def _lists_from_form(cls, value: Any) -> Any:
        return _split_commas(value)


class BatchCreate(JobFields):
    """JSON body of `POST /v1/batches`: a list of inputs or an S3 prefix, plus the job fields.

    A batch's `output_prefix` gets one sub-folder per job (`{output_prefix}{job_id}/`).
    """

    inputs: list[str] | None = Field(None, min_length=1, description="input URLs, one job each")
    prefix: str | None = Field(None, description="s3://bucket/dir/: one job per image under it")


class JobListQuery(BaseModel):
    """Query of `GET /v1/jobs`."""

    status: JobStatus | None = None
    limit: int = Field(20, ge=1, le=100)
    cursor: str | None = None


# --- responses ----------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    code: str = Field(..., description="stable machine-readable code, e.g. not_found, invalid_input")
    message: str


class ErrorBody(BaseModel):
    """Every error the API answers."""

    error: ErrorDetail


class OutputOut(BaseModel):
    url: str | None = Field(None, description="presigned S3 URL or the API's /v1/files/… URL")
    key: str


class DeliveryOut(BaseModel):
    event: str
    attempt: int
    status_code: int | None = None
    at: str
    error: str | None = None
    outcome: str


class WebhookOut(BaseModel):
    url: str
    events_filter: list[str]
    deliveries: list[DeliveryOut]


class JobOut(BaseModel):
    """A job as the API shows it (`outputs.masks` maps label name to an output)."""

    id: str
    status: JobStatus
    created_at: str
    started_at: str | None
    completed_at: str | None
    input: str
    attempts: int
    outputs: dict[str, OutputOut | dict[str, OutputOut]]
    summary: dict[str, Any] | None
    error: ErrorDetail | None
    metrics: dict[str, float]
    webhook: WebhookOut | None
    batch_id: str | None = None
    model: str | None = None


class JobList(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next page; null at the end")


class BatchCreated(BaseModel):
    id: str
    job_ids: list[str]
    total: int


class BatchOut(BaseModel):
    id: str
    job_ids: list[str]
    total: int
    counts: dict[str, int] = Field(..., description="number of the batch's jobs in each status")
    created_at: str | None = None


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ok"]
    checks: dict[str, str] = Field(..., description="part -> ok")


class NotReady(ErrorBody):
    """`/readyz` when a dependency does not answer: the error, and which part failed."""

    checks: dict[str, str] = Field(..., description="part -> ok or the reason it failed")
