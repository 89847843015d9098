"""Every refusal of the API, as a table of (request, status, code), each in the contract's error shape."""

from __future__ import annotations

import io

import pytest
from flask import Flask

from api.errors import register_error_handlers
from storage.errors import Conflict, RateLimited
from tests.fixtures.api import (
    assert_error,
    data_url,
    png_bytes,
)

S3_IN = "s3://inputs-bucket/a.jpg"
BIG = 64 * 1024  # settings.max_upload_bytes in these tests


def json_job(**fields):
    return {"json": {"input": S3_IN, **fields}}


def multipart(**fields):
    return {"data": fields, "content_type": "multipart/form-data"}


CREATE_CASES = [
    # (id, request kwargs, status, code)
    ("text-body", {"data": "hello", "content_type": "text/plain"}, 415, "unsupported_media_type"),
    ("no-body", {}, 415, "unsupported_media_type"),
    ("malformed-json", {"data": "{nope", "content_type": "application/json"}, 400, "bad_request"),
    ("empty-object", {"json": {}}, 422, "invalid_request"),
    ("json-array", {"json": [S3_IN]}, 422, "invalid_request"),
    ("input-mistyped", {"json": {"input": 5}}, 422, "invalid_request"),
    ("unknown-field", json_job(colour="red"), 422, "invalid_request"),
    ("file-scheme", {"json": {"input": "file:///etc/passwd"}}, 422, "unsupported_scheme"),
    ("ftp-scheme", {"json": {"input": "ftp://example.com/a.jpg"}}, 422, "unsupported_scheme"),
    ("http-input", {"json": {"input": "http://example.com/a.jpg"}}, 422, "unsupported_scheme"),
    ("s3-no-key", {"json": {"input": "s3://inputs-bucket/"}}, 422, "invalid_url"),
    ("unknown-output", json_job(outputs=["mask", "depth"]), 422, "invalid_request"),
    ("empty-outputs", json_job(outputs=[]), 422, "invalid_request"),
    (
        "unknown-event",
        json_job(webhook="https://93.184.215.14/h", webhook_events_filter=["done"]),
        422,
        "invalid_request",
    ),
    ("http-webhook", json_job(webhook="http://93.184.215.14/h"), 422, "invalid_webhook"),
    ("loopback-webhook", json_job(webhook="https://127.0.0.1/h"), 422, "input_forbidden"),
    ("metadata-webhook", json_job(webhook="https://169.254.169.254/h"), 422, "input_forbidden"),
    ("reserved-prefix", json_job(output_prefix="jobs/someone-else/"), 422, "input_forbidden"),
    ("uploads-prefix", json_job(output_prefix="uploads/x/"), 422, "input_forbidden"),
    ("dotdot-prefix", json_job(output_prefix="runs/../../etc/"), 422, "invalid_url"),
    ("foreign-file-prefix", json_job(output_prefix="file:///tmp/elsewhere/"), 422, "invalid_url"),
    (
        "data-url-not-image",
        {"json": {"input": data_url(b"just some text", "image/png")}},
        415,
        "unsupported_format",
    ),
    ("data-url-bad-base64", {"json": {"input": "data:image/png;base64,@@@@"}}, 422, "invalid_data_url"),
    ("data-url-too-big", {"json": {"input": data_url(b"\0" * (BIG + 10))}}, 413, "image_too_large"),
    (
        "upload-not-image",
        multipart(image=(io.BytesIO(b"GIF-ish but not"), "a.gif")),
        415,
        "unsupported_format",
    ),
    (
        "upload-too-big",
        multipart(image=(io.BytesIO(b"\x89PNG" + b"\0" * BIG), "a.png")),
        413,
        "image_too_large",
    ),
    ("body-over-limit", multipart(image=(io.BytesIO(b"\0" * (BIG * 3)), "a.png")), 413, "image_too_large"),
    ("multipart-nothing", multipart(outputs="mask"), 422, "invalid_request"),
    (
        "multipart-both",
        multipart(image=(io.BytesIO(png_bytes()), "a.png"), input=S3_IN),
        422,
        "invalid_request",
    ),
    (
        "multipart-bad-output",
        multipart(image=(io.BytesIO(png_bytes()), "a.png"), outputs="mask,depth"),
        422,
        "invalid_request",
    ),
]


@pytest.mark.parametrize(
    "kwargs,status,code", [c[1:] for c in CREATE_CASES], ids=[c[0] for c in CREATE_CASES]
)
def test_create_job_refusals(client, tenants, queue, kwargs, status, code):
    resp = client.post("/v1/jobs", headers=tenants["acme"].headers, **kwargs)
    assert_error(resp, status, code)
    assert queue.sent == []  # nothing refused is ever enqueued


def test_too_large_image_in_pixels(client, tenants, settings):
    small = settings.model_copy(update={"max_pixels": 100})
    client.application.extensions["faceparse"].settings = small
    resp = client.post(
        "/v1/jobs", json={"input": data_url(png_bytes((20, 20)))}, headers=tenants["acme"].headers
    )
    assert_error(resp, 413, "image_too_large")


OTHER_CASES = [
    ("get", "/v1/jobs/no-such-job", {}, 404, "not_found"),
    ("post", "/v1/jobs/no-such-job/cancel", {}, 404, "not_found"),
    ("get", "/v1/batches/no-such-batch", {}, 404, "not_found"),
    ("get", "/v1/jobs?limit=0", {}, 422, "invalid_request"),
    ("get", "/v1/jobs?limit=many", {}, 422, "invalid_request"),
    ("get", "/v1/jobs?status=done", {}, 422, "invalid_request"),
    ("get", "/v1/jobs?cursor=%%%garbage", {}, 422, "invalid_cursor"),
    ("delete", "/v1/jobs", {}, 405, "method_not_allowed"),
    ("get", "/v1/nothing-here", {}, 404, "not_found"),
    ("get", "/nothing-here", {}, 404, "not_found"),
    (
        "post",
        "/v1/jobs",
        {"json": {"input": S3_IN}, "headers": {"Idempotency-Key": "k" * 300}},
        422,
        "invalid_request",
    ),
    ("post", "/v1/batches", {"data": "x", "content_type": "text/plain"}, 415, "unsupported_media_type"),
    ("post", "/v1/batches", {"json": {}}, 422, "invalid_request"),
]


@pytest.mark.parametrize(
    "method,path,kwargs,status,code", OTHER_CASES, ids=[f"{c[0]} {c[1]} {c[3]}" for c in OTHER_CASES]
)
def test_other_refusals(client, tenants, method, path, kwargs, status, code):
    headers = {**tenants["acme"].headers, **kwargs.pop("headers", {})}
    resp = getattr(client, method)(path, headers=headers, **kwargs)
    assert_error(resp, status, code)


def test_405_names_the_allowed_methods(client, tenants):
    resp = client.delete("/v1/jobs", headers=tenants["acme"].headers)
    assert set(resp.headers["Allow"].split(", ")) >= {"GET", "POST"}


@pytest.mark.parametrize(
    "exc,status,code",
    [
        (RateLimited("slow down", retry_after=7), 429, "rate_limited"),
        (Conflict("already there"), 409, "conflict"),
        (RuntimeError("boom"), 500, "internal_error"),
    ],
)
def test_domain_and_unexpected_errors_map_in_one_place(exc, status, code):
    """The mapping itself, for errors no v1 view raises today (rate limits, conflicts, bugs)."""
    app = Flask(__name__)
    register_error_handlers(app)

    @app.get("/raise")
    def raise_it():
        raise exc

    resp = app.test_client().get("/raise")
    body = assert_error(resp, status, code)
    assert "boom" not in body["error"]["message"]  # internals are logged, not shown
    if status == 429:
        assert resp.headers["Retry-After"] == "7"
