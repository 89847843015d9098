"""Inputs: data: URLs, the API's syntactic check and the worker's fetch from s3, file, http(s)."""

from __future__ import annotations

import base64
import ipaddress
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from storage import keys, netguard
from storage.errors import (
    FetchFailed,
    ImageTooLarge,
    InputForbidden,
    InputNotFound,
    InvalidInput,
)
from storage.inputs import parse_data_url, read_input, validate_input_url
from storage.objects import ObjectStore
from tests.fixtures.services import free_port

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
PNG_B64 = base64.b64encode(PNG).decode()


# --- data: URLs ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "mime", "data"),
    [
        (f"data:image/png;base64,{PNG_B64}", "image/png", PNG),
        (f"data:IMAGE/PNG;base64,{PNG_B64[:40]}\n{PNG_B64[40:]}", "image/png", PNG),  # wrapped lines
        (f"data:image/jpeg;name=a.jpg;base64,{PNG_B64.replace('+', '%2B').replace('/', '%2F')}",
         "image/jpeg", PNG),
        ("data:image/png;base64,AAE", "image/png", b"\x00\x01"),  # padding left off
        ("data:,hello%20world", "text/plain", b"hello world"),
    ],
)
def test_parse_data_url(url: str, mime: str, data: bytes) -> None:
    assert parse_data_url(url, max_bytes=10_000) == (mime, data)


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64",  # no comma
        "data:image/png;base64,",  # empty
        "data:image/png;base64,@@@@",
        "data:image/png;base64,AA=A",
        "data:not a type;base64,AAAA",
        "https://example.com/a.png",
    ],
)
def test_parse_data_url_rejects_malformed(url: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_data_url(url, max_bytes=10_000)
    assert info.value.code == "invalid_data_url"


def test_parse_data_url_size_limit() -> None:
    assert parse_data_url(f"data:image/png;base64,{PNG_B64}", max_bytes=len(PNG))[1] == PNG
    with pytest.raises(ImageTooLarge):
        parse_data_url(f"data:image/png;base64,{PNG_B64}", max_bytes=len(PNG) - 1)
    # Judged from the text length, before decoding (this payload is not even valid base64).
    with pytest.raises(ImageTooLarge):
        parse_data_url("data:image/png;base64," + "!" * 4000, max_bytes=100)
    with pytest.raises(ImageTooLarge):
        parse_data_url("data:," + "a" * 101, max_bytes=100)


# --- the API's check -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "s3://my-bucket/faces/a.jpg",
        "s3://bucket.with.dots/a b.jpg".replace(" ", "%20"),
        "https://example.com/a.jpg?x=1",
        "https://example.com:8443/a.jpg",
        f"data:image/png;base64,{PNG_B64}",
    ],
)
def test_validate_input_url_accepts(url: str) -> None:
    validate_input_url(url)


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("", "invalid_url"),
        ("ftp://example.com/a.jpg", "unsupported_scheme"),
        ("file:///etc/passwd", "unsupported_scheme"),
        ("/etc/passwd", "unsupported_scheme"),
        ("javascript:alert(1)", "unsupported_scheme"),
        ("http://example.com/a.jpg", "unsupported_scheme"),
        ("s3://bucket/", "invalid_url"),
        ("s3://bucket", "invalid_url"),
        ("s3://Bad_Bucket!/a.jpg", "invalid_url"),
        ("s3:///a.jpg", "invalid_url"),
        ("https:///a.jpg", "invalid_url"),
        ("https://example.com:99999/a.jpg", "invalid_url"),
        ("https://exa mple.com/a.jpg", "invalid_url"),
        ("https://example.com/\r\nX-Injected: 1", "invalid_url"),
        ("https://example.com/" + "a" * 9000, "invalid_url"),
        ("data:image/png;base64", "invalid_data_url"),
    ],
)
def test_validate_input_url_rejects(url: str, code: str) -> None:
    with pytest.raises(InvalidInput) as info:
        validate_input_url(url)
    assert info.value.code == code


def test_validate_input_url_allows_http_only_when_private_is_allowed() -> None:
    validate_input_url("http://127.0.0.1:8000/a.jpg", allow_private=True)


# --- read_input: storage ---------------------------------------------------------------------
def test_read_input_from_s3_with_bucket_allow_list(s3_bucket: str) -> None:
    store = ObjectStore(f"s3://{s3_bucket}/svc")
    store.put(f"s3://{s3_bucket}/in/a.png", PNG, "image/png")
    url = f"s3://{s3_bucket}/in/a.png"
    common = {"timeout": 5.0, "allow_private": False}
    assert read_input(url, store, max_bytes=len(PNG), **common) == PNG
    assert read_input(url, store, max_bytes=len(PNG), allowed_buckets={s3_bucket}, **common) == PNG
    with pytest.raises(InputForbidden):
        read_input(url, store, max_bytes=len(PNG), allowed_buckets={"other-bucket"}, **common)
    with pytest.raises(ImageTooLarge):
        read_input(url, store, max_bytes=len(PNG) - 1, **common)
    with pytest.raises(InputNotFound):
        read_input(f"s3://{s3_bucket}/in/missing.png", store, max_bytes=len(PNG), **common)
    # The service's own uploads stay readable whatever the allow-list says.
    upload = keys.upload_url(store.storage_url, "job1", "input.png")
    store.put(upload, PNG, "image/png")
    assert read_input(upload, store, max_bytes=len(PNG), allowed_buckets={"other-bucket"}, **common) == PNG


def test_read_input_file_only_inside_the_store(tmp_path: Path) -> None:
    store = ObjectStore(f"file://{tmp_path}/data")
    upload = keys.upload_url(store.storage_url, "job1", "input.png")
    store.put(upload, PNG, "image/png")
    common = {"max_bytes": 10_000, "timeout": 5.0, "allow_private": False}
    assert read_input(upload, store, **common) == PNG
    (tmp_path / "secret.png").write_bytes(PNG)
    for url in (f"file://{tmp_path}/secret.png", f"{store.storage_url}/../secret.png", "file:///etc/passwd"):
        with pytest.raises(InputForbidden):
            read_input(url, store, **common)


def test_read_input_data_url_and_unknown_schemes(tmp_path: Path) -> None:
    store = ObjectStore(f"file://{tmp_path}")
    common = {"timeout": 5.0, "allow_private": False}
    assert read_input(f"data:image/png;base64,{PNG_B64}", store, max_bytes=10_000, **common) == PNG
    for url in ("ftp://example.com/a.png", "gopher://x", "relative/path.png"):
        with pytest.raises(InvalidInput) as info:
            read_input(url, store, max_bytes=10_000, **common)
        assert info.value.code == "unsupported_scheme"
    with pytest.raises(InvalidInput) as info:
        read_input("http://example.com/a.png", store, max_bytes=10_000, **common)
    assert info.value.code == "unsupported_scheme"  # plain http only where private targets are allowed


# --- read_input: http(s) ---------------------------------------------------------------------
Route = Callable[[BaseHTTPRequestHandler], None]


class _Site(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, Route]] = {}
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        route = self.routes.get(self.path)
        if route is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        route(self)

    def log_message(self, *args: object) -> None:
        pass


def _answer(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return route


def _redirect(location: str, status: int = 302) -> Route:
    return _answer(status, headers={"Location": location})


def _chunked(body: bytes, *, delay: float = 0.0) -> Route:
    """Sends the body chunk by chunk with no Content-Length (optionally trickling)."""

    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for start in range(0, len(body), 1024):
            part = body[start:start + 1024]
            h.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            h.wfile.flush()
            if delay:
                time.sleep(delay)
        h.wfile.write(b"0\r\n\r\n")

    return route


@pytest.fixture
def site() -> Iterator[tuple[str, dict[str, Route], list[str]]]:
    """A local web server: (base URL, routes to fill in, paths requested)."""
    handler = type("Site", (_Site,), {"routes": {}, "hits": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler.routes, handler.hits
    server.shutdown()
    server.server_close()


def _fetch(url: str, tmp_path: Path, *, max_bytes: int = 100_000, timeout: float = 5.0,
           allow_private: bool = True) -> bytes:
    return read_input(url, ObjectStore(f"file://{tmp_path}"), max_bytes=max_bytes, timeout=timeout,
                      allow_private=allow_private)


def test_fetch_http_ok(site: tuple, tmp_path: Path) -> None:
    base, routes, _ = site
    routes["/a.png"] = _answer(200, PNG, {"Content-Type": "image/png"})
    assert _fetch(f"{base}/a.png", tmp_path) == PNG


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        (404, InputNotFound, "input_not_found"),
        (410, InputNotFound, "input_not_found"),
        (500, FetchFailed, "fetch_failed"),
        (503, FetchFailed, "fetch_failed"),
        (429, FetchFailed, "fetch_failed"),
        (403, InvalidInput, "fetch_rejected"),
        (401, InvalidInput, "fetch_rejected"),
    ],
)
def test_fetch_http_status_mapping(site: tuple, tmp_path: Path, status: int, error: type, code: str) -> None:
    base, routes, _ = site
    routes["/x"] = _answer(status, b"nope")
    with pytest.raises(error) as info:
        _fetch(f"{base}/x", tmp_path)
    assert info.value.code == code
    assert info.value.retryable == (error is FetchFailed)


def test_fetch_follows_up_to_three_redirects(site: tuple, tmp_path: Path) -> None:
    base, routes, hits = site
    routes["/final.png"] = _answer(200, PNG)
    routes["/r1"] = _redirect("/r2", 301)
    routes["/r2"] = _redirect(f"{base}/r3", 307)
    routes["/r3"] = _redirect("final.png", 308)
    assert _fetch(f"{base}/r1", tmp_path) == PNG
    assert hits == ["/r1", "/r2", "/r3", "/final.png"]
    routes["/r0"] = _redirect("/r1")
    with pytest.raises(InvalidInput) as info:
        _fetch(f"{base}/r0", tmp_path)
    assert info.value.code == "too_many_redirects"


def test_fetch_checks_every_redirect_hop(
    site: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, routes, _ = site
    checked: list[str] = []
    real_check = netguard.check_url

    def spy(url: str, *, allow_private: bool) -> str:
        checked.append(url)
        return real_check(url, allow_private=allow_private)

    monkeypatch.setattr(netguard, "check_url", spy)
    routes["/to-metadata"] = _redirect("http://169.254.169.254/latest/meta-data/iam/")
    with pytest.raises(InputForbidden):
        _fetch(f"{base}/to-metadata", tmp_path)
    assert checked == [f"{base}/to-metadata", "http://169.254.169.254/latest/meta-data/iam/"]

    # A name that resolves to a forbidden address is refused at its hop too.
    monkeypatch.setattr(netguard, "resolve", lambda host, port: [ipaddress.ip_address("169.254.169.254")])
    routes["/to-name"] = _redirect("http://innocent.example/a.png")
    with pytest.raises(InputForbidden):
        _fetch(f"{base}/to-name", tmp_path)


@pytest.mark.parametrize("location", ["file:///etc/passwd", "s3://bucket/key.png", "ftp://x/y", "gopher://z"])
def test_fetch_refuses_redirects_off_http(site: tuple, tmp_path: Path, location: str) -> None:
    base, routes, _ = site
    routes["/r"] = _redirect(location)
    with pytest.raises(InvalidInput) as info:
        _fetch(f"{base}/r", tmp_path)
    assert info.value.code == "unsupported_scheme"


def test_fetch_refuses_loopback_without_allow_private(site: tuple, tmp_path: Path) -> None:
    base, routes, hits = site
    routes["/a.png"] = _answer(200, PNG)
    https_url = base.replace("http://", "https://") + "/a.png"
    with pytest.raises(InputForbidden):
        _fetch(https_url, tmp_path, allow_private=False)
    assert hits == []  # refused before any connection


def test_fetch_size_limits(site: tuple, tmp_path: Path) -> None:
    base, routes, _ = site
    big = b"x" * 50_000
    routes["/declared"] = _answer(200, big)
    routes["/chunked"] = _chunked(big)
    assert _fetch(f"{base}/declared", tmp_path, max_bytes=50_000) == big
    assert _fetch(f"{base}/chunked", tmp_path, max_bytes=50_000) == big
    with pytest.raises(ImageTooLarge):
        _fetch(f"{base}/declared", tmp_path, max_bytes=49_999)
    with pytest.raises(ImageTooLarge):
        _fetch(f"{base}/chunked", tmp_path, max_bytes=49_999)


def test_fetch_gives_up_on_a_trickling_server(site: tuple, tmp_path: Path) -> None:
    base, routes, _ = site
    routes["/slow"] = _chunked(b"x" * 40 * 1024, delay=0.1)  # about 4 s in all, never idle for long
    started = time.monotonic()
    with pytest.raises(FetchFailed):
        _fetch(f"{base}/slow", tmp_path, timeout=1.0)
    assert time.monotonic() - started < 3.0


def test_fetch_connection_refused_is_transient(tmp_path: Path) -> None:
    with pytest.raises(FetchFailed) as info:
        _fetch(f"http://127.0.0.1:{free_port()}/a.png", tmp_path)
    assert info.value.retryable
