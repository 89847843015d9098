"""Bad inputs, one table: each case, how it is submitted, and its documented answer.

Every case ends either as a 4xx from the API with the contract's error body and code, or as a job
that the worker marks `failed` with its code; never a 5xx, never a dead worker. Jobs that reach a
worker are each followed by a good job, which must succeed.

The cases go to a "strict" API (gunicorn) with production guards: private targets refused, a
256 KiB upload limit. It shares the session stack's Redis and bucket, so the stack's two workers
run its jobs. One case (a redirect to the metadata address) goes to the stack's own API, which
allows private targets as a test deployment does: the first hop (a loopback server) is allowed,
and the worker still refuses the second, because metadata addresses are refused even then.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from tests.fixtures.stack import API_KEYS, ManagedProcess, Stack, png_bytes, start_api, wait_until

MAX_UPLOAD = 256 * 1024
AUTH = {"Authorization": f"Bearer {API_KEYS['alice']}"}
TIMEOUT = 60


# --- bytes ----------------------------------------------------------------------------------------
def _image(fmt: str, size: tuple[int, int] = (64, 48)) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _flip(data: bytes, start: int, end: int) -> bytes:
    return data[:start] + bytes(b ^ 0xFF for b in data[start:end]) + data[end:]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_declaring(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header claims `width`x`height` (a decompression bomb's calling card)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))


PNG, JPEG = _image("PNG"), _image("JPEG")
BYTES = {
    "empty": b"",
    "random": np.random.default_rng(1).bytes(4096),
    "text": b"just some text, not an image\n",
    "html": b"<!doctype html><html><head><title>x</title></head><body><img src=x></body></html>",
    "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><circle r="9"/></svg>',
    "pdf": b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n",
    "truncated_png": PNG[: len(PNG) // 2],
    "truncated_jpeg": JPEG[: len(JPEG) // 2],
    "corrupt_png": _flip(PNG, 60, 200),  # IDAT bytes inverted: the CRC and the zlib stream break
    "corrupt_jpeg": _flip(JPEG, len(JPEG) // 3, len(JPEG) // 3 + 200),
    "corrupt_jpeg_header": _flip(JPEG, 2, 40),
    "png_40000x40000": _png_declaring(40000, 40000),
    "over_limit": b"\x89PNG\r\n\x1a\n" + b"\0" * (MAX_UPLOAD + 1024),
    "huge_body": b"\0" * (MAX_UPLOAD * 2),
}


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# --- the table ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """`how` says how `payload` is submitted; `expect` is (HTTP status, code) or ("failed", code)."""

    name: str
    how: str  # upload | s3 | data_url | json | raw | get | stack_json
    payload: Any
    expect: tuple[int | str, str]


def _webhook(url: str) -> dict[str, Any]:
    return {"input": "s3://faceparse-stack/in/unused.png", "webhook": url}


INVALID = (422, "invalid_request")
FORBIDDEN = (422, "input_forbidden")
SCHEME = (422, "unsupported_scheme")
CASES = [
    # Non-images and broken images, uploaded: refused by the API from the header alone ...
    Case("empty-upload", "upload", BYTES["empty"], (422, "invalid_image")),
    Case("random-upload", "upload", BYTES["random"], (415, "unsupported_format")),
    Case("text-upload", "upload", BYTES["text"], (415, "unsupported_format")),
    Case("html-upload", "upload", BYTES["html"], (415, "unsupported_format")),
    Case("svg-upload", "upload", BYTES["svg"], (415, "unsupported_format")),
    Case("pdf-upload", "upload", BYTES["pdf"], (415, "unsupported_format")),
    Case("corrupt-jpeg-header-upload", "upload", BYTES["corrupt_jpeg_header"], (415, "unsupported_format")),
    Case("png-40000x40000-upload", "upload", BYTES["png_40000x40000"], (413, "image_too_large")),
    Case("upload-over-limit", "upload", BYTES["over_limit"], (413, "image_too_large")),
    Case("body-over-limit", "upload", BYTES["huge_body"], (413, "image_too_large")),
    # ... but a sound header over a broken body passes the API and fails in the worker.
    Case("truncated-jpeg-upload", "upload", BYTES["truncated_jpeg"], ("failed", "invalid_image")),
    Case("truncated-png-data-url", "data_url", BYTES["truncated_png"], ("failed", "invalid_image")),
    Case("corrupt-png-data-url", "data_url", BYTES["corrupt_png"], ("failed", "invalid_image")),
    # From S3 the API sees only a URL: the worker fails the job with the code.
    Case("empty-s3", "s3", BYTES["empty"], ("failed", "invalid_image")),
    Case("random-s3", "s3", BYTES["random"], ("failed", "invalid_image")),
    Case("html-s3", "s3", BYTES["html"], ("failed", "invalid_image")),
    Case("svg-s3", "s3", BYTES["svg"], ("failed", "invalid_image")),
    Case("pdf-s3", "s3", BYTES["pdf"], ("failed", "invalid_image")),
    Case("truncated-png-s3", "s3", BYTES["truncated_png"], ("failed", "invalid_image")),
    Case("corrupt-jpeg-s3", "s3", BYTES["corrupt_jpeg"], ("failed", "invalid_image")),
    Case("png-40000x40000-s3", "s3", BYTES["png_40000x40000"], ("failed", "image_too_large")),
    Case("missing-s3-key", "json", {"input": "s3://faceparse-stack/in/no-such-key.png"},
         ("failed", "input_not_found")),
    Case("missing-s3-bucket", "json", {"input": "s3://fp-no-such-bucket-7f3a/in/a.png"},
         ("failed", "input_not_found")),
    # Bodies of the wrong kind or shape.
    Case("text-plain-body", "raw", ("text/plain", b"input=s3://b/k.png"), (415, "unsupported_media_type")),
    Case("xml-body", "raw", ("application/xml", b"<job><input>s3://b/k.png</input></job>"),
         (415, "unsupported_media_type")),
    Case("image-as-body", "raw", ("image/png", PNG), (415, "unsupported_media_type")),
    Case("malformed-json", "raw", ("application/json", b'{"input": "s3://b/k.png",'), (400, "bad_request")),
    Case("json-array", "raw", ("application/json", b'["s3://b/k.png"]'), INVALID),
    Case("missing-input", "json", {"outputs": ["mask"]}, INVALID),
    Case("input-not-a-string", "json", {"input": 42}, INVALID),
    Case("empty-input", "json", {"input": ""}, INVALID),
    Case("unknown-output", "json", {"input": "s3://b/k.png", "outputs": ["depth"]}, INVALID),
    Case("outputs-not-a-list", "json", {"input": "s3://b/k.png", "outputs": "mask"}, INVALID),
    Case("empty-outputs", "json", {"input": "s3://b/k.png", "outputs": []}, INVALID),
    Case("unknown-event", "json", {"input": "s3://b/k.png", "webhook_events_filter": ["done"]},
         INVALID),
    Case("unknown-field", "json", {"input": "s3://b/k.png", "priority": 9}, INVALID),
    Case("prefix-escape", "json", {"input": "s3://b/k.png", "output_prefix": "a/../../jobs/x/"},
         (422, "invalid_url")),
    # Input URLs: schemes, local files, and targets inside the network.
    Case("ftp-scheme", "json", {"input": "ftp://example.com/a.png"}, SCHEME),
    Case("file-url", "json", {"input": "file:///etc/passwd"}, SCHEME),
    Case("gopher-scheme", "json", {"input": "gopher://127.0.0.1:6379/_FLUSHALL"}, SCHEME),
    Case("no-scheme", "json", {"input": "/etc/passwd"}, SCHEME),
    Case("http-input", "json", {"input": "http://93.184.215.14/a.png"}, SCHEME),
    Case("s3-without-key", "json", {"input": "s3://faceparse-stack/"}, (422, "invalid_url")),
    Case("https-loopback", "json", {"input": "https://127.0.0.1/a.png"}, FORBIDDEN),
    Case("https-loopback-v6", "json", {"input": "https://[::1]/a.png"}, FORBIDDEN),
    Case("https-v4-mapped-v6", "json", {"input": "https://[::ffff:127.0.0.1]/a.png"}, FORBIDDEN),
    Case("https-private", "json", {"input": "https://10.1.2.3/a.png"}, FORBIDDEN),
    Case("https-link-local", "json", {"input": "https://169.254.10.20/a.png"}, FORBIDDEN),
    Case("https-metadata", "json", {"input": "https://169.254.169.254/latest/meta-data/"},
         FORBIDDEN),
    Case("https-name-to-loopback", "json", {"input": "https://localhost:8443/a.png"}, FORBIDDEN),
    Case("redirect-to-metadata", "stack_json", "redirect", ("failed", "input_forbidden")),
    # Webhooks pointing inside the network.
    Case("webhook-loopback", "json", _webhook("https://127.0.0.1/hook"), FORBIDDEN),
    Case("webhook-private", "json", _webhook("https://192.168.1.10/hook"), FORBIDDEN),
    Case("webhook-link-local", "json", _webhook("https://169.254.1.1/hook"), FORBIDDEN),
    Case("webhook-metadata", "json", _webhook("https://169.254.169.254/hook"), FORBIDDEN),
    Case("webhook-name-to-loopback", "json", _webhook("https://localhost/hook"), FORBIDDEN),
    Case("webhook-http", "json", _webhook("http://93.184.215.14/hook"), (422, "invalid_webhook")),
    Case("webhook-file", "json", _webhook("file:///etc/passwd"), (422, "invalid_webhook")),
    # data: URLs.
    Case("data-url-bad-base64", "json", {"input": "data:image/png;base64,!!!not-base64!!!"},
         (422, "invalid_data_url")),
    Case("data-url-no-comma", "json", {"input": "data:image/png;base64"}, (422, "invalid_data_url")),
    Case("data-url-bad-mime", "json", {"input": "data:im age/png;base64,AAAA"}, (422, "invalid_data_url")),
    Case("data-url-text", "json", {"input": "data:text/plain,hello"}, (415, "unsupported_format")),
    Case("data-url-over-limit", "data_url", BYTES["over_limit"], (413, "image_too_large")),
    # Ids and queries that name nothing.
    Case("job-id-not-one", "get", "/v1/jobs/not-a-job-id", (404, "not_found")),
    Case("job-id-traversal", "get", "/v1/jobs/..%2f..%2fetc%2fpasswd", (404, "not_found")),
    Case("job-id-huge", "get", "/v1/jobs/" + "a" * 4000, (404, "not_found")),
    Case("cancel-not-a-job", "post", "/v1/jobs/not-a-job-id/cancel", (404, "not_found")),
    Case("batch-id-not-one", "get", "/v1/batches/not-a-batch", (404, "not_found")),
    Case("list-bad-limit", "get", "/v1/jobs?limit=many", INVALID),
    Case("list-bad-status", "get", "/v1/jobs?status=exploded", INVALID),
    Case("list-bad-cursor", "get", "/v1/jobs?cursor=%%%", (422, "invalid_cursor")),
]


# --- fixtures -------------------------------------------------------------------------------------
@dataclass
class StrictApi:
    url: str
    proc: ManagedProcess
    worker_pids: list[int]  # the stack's workers when the table started


@pytest.fixture(scope="module")
def strict_api(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrictApi]:
    """A second API on the stack's Redis and bucket with production guards."""
    env = {**stack.env, "FACEPARSE_WEBHOOK_ALLOW_PRIVATE": "false",
           "FACEPARSE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD)}
    proc, url = start_api(env, tmp_path_factory.mktemp("strict-api"))
    try:
        yield StrictApi(url, proc, [w.pid for w in stack.workers])
    finally:
        proc.stop()


def _access_statuses(proc: ManagedProcess) -> list[int]:
    """The status of every request in the API's (JSON) access log."""
    statuses = []
    for line in proc.log().splitlines():
        if line.startswith("{") and '"gunicorn.access"' in line:
            statuses.append(int(json.loads(line)["status"]))
    return statuses


@pytest.fixture(scope="module")
def redirect_server() -> Iterator[str]:
    """A loopback HTTP server whose every answer is a 302 to the cloud metadata address."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/iam/")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/face.png"
    finally:
        server.shutdown()
        server.server_close()


# --- the test -------------------------------------------------------------------------------------
def _submit(case: Case, api: str, stack: Stack, redirect_url: str) -> requests.Response:
    how, payload = case.how, case.payload
    if how == "upload":
        return requests.post(f"{api}/v1/jobs", files={"image": ("in.bin", payload)}, headers=AUTH, timeout=30)
    if how == "s3":
        key = f"bad/{uuid.uuid4().hex}"
        stack.s3().put_object(Bucket=stack.bucket, Key=key, Body=payload)
        return requests.post(f"{api}/v1/jobs", json={"input": f"s3://{stack.bucket}/{key}"}, headers=AUTH,
                             timeout=30)
    if how == "data_url":
        return requests.post(f"{api}/v1/jobs", json={"input": data_url(payload)}, headers=AUTH, timeout=30)
    if how == "json":
        return requests.post(f"{api}/v1/jobs", json=payload, headers=AUTH, timeout=30)
    if how == "stack_json":
        return requests.post(f"{stack.api_url}/v1/jobs", json={"input": redirect_url}, headers=AUTH,
                             timeout=30)
    if how == "raw":
        content_type, body = payload
        return requests.post(f"{api}/v1/jobs", data=body, headers={**AUTH, "Content-Type": content_type},
                             timeout=30)
    if how in ("get", "post"):
        return requests.request(how, f"{api}{payload}", headers=AUTH, timeout=30)
    raise AssertionError(f"unknown submission {how!r}")


def _assert_error_body(resp: requests.Response, status: int, code: str) -> None:
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code and body["error"]["message"], body


def _good_input(stack: Stack) -> str:
    key = f"good/{uuid.uuid4().hex}.png"
    stack.s3().put_object(Bucket=stack.bucket, Key=key, Body=png_bytes(20, 16))
    return f"s3://{stack.bucket}/{key}"


def _terminal(stack: Stack, job_id: str) -> Any:
    job = stack.jobs.get(job_id)
    return job if job is not None and job.status.is_terminal() else None


def test_the_cases_are_many_and_distinct() -> None:
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, stack: Stack, strict_api: StrictApi, redirect_server: str) -> None:
    api = strict_api.url
    resp = _submit(case, api, stack, redirect_server)
    assert resp.status_code < 500, (resp.status_code, resp.text[:500])
    expected_status, code = case.expect
    if expected_status != "failed":
        _assert_error_body(resp, int(expected_status), code)
        return
    assert resp.status_code == 202, resp.text[:500]
    bad_id = resp.json()["id"]
    good = requests.post(f"{api}/v1/jobs", json={"input": _good_input(stack)}, headers=AUTH, timeout=30)
    assert good.status_code == 202, good.text
    bad = wait_until(lambda: _terminal(stack, bad_id), timeout=TIMEOUT, what=f"{case.name} to finish")
    assert bad.status.value == "failed" and bad.error is not None, bad
    assert bad.error.code == code, bad.error
    assert bad.attempts == 1, "a bad input is final: never retried"
    assert bad.outputs == {}
    done = wait_until(lambda: _terminal(stack, good.json()["id"]), timeout=TIMEOUT, what="the good job")
    assert done.status.value == "succeeded", done
    # The client sees the same failure through the API, in the job's documented shape.
    shown = requests.get(f"{api}/v1/jobs/{bad_id}", headers=AUTH, timeout=30).json()
    assert shown["status"] == "failed" and shown["error"]["code"] == code


def test_no_5xx_and_no_worker_died(stack: Stack, strict_api: StrictApi) -> None:
    """After the table (pytest runs this module in order): no 5xx was answered, no worker restarted."""
    statuses = _access_statuses(strict_api.proc)
    assert statuses, "the access log recorded nothing"
    assert [s for s in statuses if s >= 500] == [], strict_api.proc.log()[-3000:]
    assert [w.pid for w in stack.workers] == strict_api.worker_pids
    assert all(w.proc.poll() is None for w in stack.workers), "a worker died"
