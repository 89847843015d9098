"""ObjectStore against a real S3-compatible server over HTTP (moto) and a real local directory."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from storage import keys
from storage.errors import (
    ImageTooLarge,
    InputForbidden,
    InputNotFound,
    InvalidInput,
    StorageUnavailable,
)
from storage.objects import ObjectStore
from tests.fixtures.services import free_port


# --- S3 --------------------------------------------------------------------------------------
@pytest.fixture
def s3_store(s3_bucket: str) -> ObjectStore:
    return ObjectStore(f"s3://{s3_bucket}/root/")


def test_s3_storage_url_is_normalised(s3_bucket: str) -> None:
    assert ObjectStore(f"s3://{s3_bucket}/root/").storage_url == f"s3://{s3_bucket}/root"
    assert ObjectStore(f"s3://{s3_bucket}").storage_url == f"s3://{s3_bucket}"


def test_s3_put_get_exists_delete_roundtrip(s3_store: ObjectStore, s3_bucket: str) -> None:
    url = keys.output_url(keys.job_output_prefix(s3_store.storage_url, "j1"), "mask.png")
    assert url == f"s3://{s3_bucket}/root/jobs/j1/mask.png"
    assert not s3_store.exists(url)
    s3_store.put(url, b"\x89PNG-bytes", "image/png")
    assert s3_store.exists(url)
    assert s3_store.get(url) == b"\x89PNG-bytes"
    head = s3_store.client.head_object(Bucket=s3_bucket, Key="root/jobs/j1/mask.png")
    assert head["ContentType"] == "image/png"
    s3_store.delete(url)
    assert not s3_store.exists(url)
    s3_store.delete(url)  # deleting twice is fine


def test_s3_missing_key_and_bucket_are_input_not_found(s3_store: ObjectStore, s3_bucket: str) -> None:
    with pytest.raises(InputNotFound):
        s3_store.get(f"s3://{s3_bucket}/nope.jpg")
    with pytest.raises(InputNotFound) as info:
        s3_store.get("s3://no-such-bucket-fp/x.jpg")
    assert info.value.code == "input_not_found"
    assert not s3_store.exists("s3://no-such-bucket-fp/x.jpg")


def test_s3_max_bytes_is_enforced(s3_store: ObjectStore, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/big.bin"
    s3_store.put(url, b"x" * 1000, "application/octet-stream")
    assert s3_store.get(url, max_bytes=1000) == b"x" * 1000
    with pytest.raises(ImageTooLarge) as info:
        s3_store.get(url, max_bytes=999)
    assert info.value.code == "image_too_large"


@pytest.mark.parametrize("url", ["s3://bucket", "s3://bucket/", "s3://bucket/dir/", "s3:///key"])
def test_s3_urls_that_name_no_object_are_invalid(s3_store: ObjectStore, url: str) -> None:
    with pytest.raises(InvalidInput):
        s3_store.get(url)


def test_s3_list_returns_full_urls_under_prefix(s3_store: ObjectStore, s3_bucket: str) -> None:
    for name in ("in/a.jpg", "in/b.png", "in/sub/c.jpg", "in-other/d.jpg", "out/e.jpg"):
        s3_store.put(f"s3://{s3_bucket}/{name}", b"1", "image/jpeg")
    assert s3_store.list(f"s3://{s3_bucket}/in/") == [
        f"s3://{s3_bucket}/in/a.jpg",
        f"s3://{s3_bucket}/in/b.png",
        f"s3://{s3_bucket}/in/sub/c.jpg",
    ]
    assert len(s3_store.list(f"s3://{s3_bucket}/in", limit=2)) == 2
    assert len(s3_store.list(f"s3://{s3_bucket}/in")) == 4  # a partial name matches in-other/ too
    assert s3_store.list(f"s3://{s3_bucket}/nothing/") == []


def test_s3_list_pages_past_one_page(s3_store: ObjectStore, s3_bucket: str) -> None:
    # The paginator is asked for pages of `limit`, so 7 objects with limit 5 need one page;
    # with limit 1000 and a page size of 3 the client must follow continuation tokens.
    for i in range(7):
        s3_store.put(f"s3://{s3_bucket}/p/{i}.jpg", b"1", "image/jpeg")
    assert len(s3_store.list(f"s3://{s3_bucket}/p/", limit=5)) == 5
    paginator = s3_store.client.get_paginator("list_objects_v2")
    pages = list(paginator.paginate(Bucket=s3_bucket, Prefix="p/", PaginationConfig={"PageSize": 3}))
    assert len(pages) == 3  # the server really pages
    assert len(s3_store.list(f"s3://{s3_bucket}/p/")) == 7


def test_s3_presigned_url_downloads_without_credentials(s3_store: ObjectStore, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/root/jobs/j2/summary.json"
    s3_store.put(url, b'{"ok": true}', "application/json")
    signed = s3_store.presign(url, expires=60)
    assert signed is not None and "Signature" in signed
    resp = requests.get(signed, timeout=10)
    assert resp.status_code == 200
    assert resp.content == b'{"ok": true}'
    # moto does not verify signatures, so check the URL's shape: SigV4, the expiry, the endpoint.
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in signed and "X-Amz-Expires=60" in signed
    assert signed.startswith(os.environ["AWS_ENDPOINT_URL"])


def test_s3_relative_key_and_url_for_key(s3_store: ObjectStore, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/root/jobs/j3/mask.png"
    assert s3_store.relative_key(url) == "jobs/j3/mask.png"
    assert s3_store.url_for_key("jobs/j3/mask.png") == url
    assert s3_store.relative_key(f"s3://{s3_bucket}/rootless/x.png") is None
    assert s3_store.relative_key(f"s3://{s3_bucket}/other/x.png") is None
    assert s3_store.relative_key("file:///tmp/x.png") is None


def test_s3_ping(s3_store: ObjectStore) -> None:
    s3_store.ping()
    with pytest.raises(StorageUnavailable):
        ObjectStore("s3://no-such-bucket-fp/prefix").ping()


def test_s3_endpoint_down_is_storage_unavailable(monkeypatch: pytest.MonkeyPatch, s3_env: dict) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    store = ObjectStore("s3://bucket/prefix", connect_timeout=0.5, read_timeout=0.5, max_attempts=2)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable) as info:
        store.get("s3://bucket/prefix/a.jpg")
    assert info.value.retryable and info.value.code == "storage_unavailable"
    with pytest.raises(StorageUnavailable):
        store.put("s3://bucket/prefix/a.jpg", b"1", "image/jpeg")
    with pytest.raises(StorageUnavailable):
        store.ping()
    assert time.monotonic() - started < 20


class _FlakyS3(BaseHTTPRequestHandler):
    """Answers 503 SlowDown a set number of times, then a tiny object: the retry policy must cope."""

    failures_left = 0
    requests_seen = 0

    def do_GET(self) -> None:
        type(self).requests_seen += 1
        if type(self).failures_left > 0:
            type(self).failures_left -= 1
            body = b"<Error><Code>SlowDown</Code><Message>slow down</Message></Error>"
            self.send_response(503)
        else:
            body = b"hello"
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky_s3(monkeypatch: pytest.MonkeyPatch, s3_env: dict) -> Iterator[type[_FlakyS3]]:
    handler = type("Flaky", (_FlakyS3,), {"failures_left": 0, "requests_seen": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
    yield handler
    server.shutdown()
    server.server_close()


def test_s3_transient_5xx_is_retried(flaky_s3: type[_FlakyS3]) -> None:
    flaky_s3.failures_left = 2
    store = ObjectStore("s3://bucket", max_attempts=4)
    assert store.get("s3://bucket/k.jpg") == b"hello"
    assert flaky_s3.requests_seen == 3


def test_s3_persistent_5xx_is_storage_unavailable(flaky_s3: type[_FlakyS3]) -> None:
    flaky_s3.failures_left = 100
    store = ObjectStore("s3://bucket", max_attempts=2)
    with pytest.raises(StorageUnavailable):
        store.get("s3://bucket/k.jpg")
    assert flaky_s3.requests_seen == 2


# --- local directory -------------------------------------------------------------------------
@pytest.fixture
def local_store(tmp_path: Path) -> ObjectStore:
    return ObjectStore(f"file://{tmp_path}/data")


def test_local_default_root_resolves_against_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = ObjectStore("file://./faceparse-data")
    assert store.storage_url == f"file://{tmp_path}/faceparse-data"
    assert store.is_local
    assert store.presign(f"file://{tmp_path}/faceparse-data/x.png") is None


def test_local_roundtrip_and_listing(local_store: ObjectStore, tmp_path: Path) -> None:
    root = local_store.storage_url
    url = keys.output_url(keys.job_output_prefix(root, "j1"), "masks/skin.png")
    assert not local_store.exists(url)
    local_store.put(url, b"png", "image/png")
    assert (tmp_path / "data/jobs/j1/masks/skin.png").read_bytes() == b"png"
    assert local_store.exists(url)
    assert local_store.get(url) == b"png"
    local_store.put(keys.output_url(keys.job_output_prefix(root, "j1"), "mask.png"), b"m", "image/png")
    local_store.put(keys.output_url(keys.job_output_prefix(root, "j10"), "mask.png"), b"m", "image/png")
    assert local_store.list(f"{root}/jobs/j1/") == [
        f"{root}/jobs/j1/mask.png",
        f"{root}/jobs/j1/masks/skin.png",
    ]
    assert local_store.list(f"{root}/jobs/j1") == [
        f"{root}/jobs/j1/mask.png",
        f"{root}/jobs/j1/masks/skin.png",
        f"{root}/jobs/j10/mask.png",
    ]
    assert local_store.list(f"{root}/jobs/", limit=1) == [f"{root}/jobs/j1/mask.png"]
    assert local_store.list(f"{root}/missing/") == []
    local_store.delete(url)
    assert not local_store.exists(url)
    local_store.delete(url)


def test_local_errors(local_store: ObjectStore) -> None:
    root = local_store.storage_url
    with pytest.raises(InputNotFound):
        local_store.get(f"{root}/nope.png")
    local_store.put(f"{root}/big.bin", b"x" * 100, "application/octet-stream")
    with pytest.raises(ImageTooLarge):
        local_store.get(f"{root}/big.bin", max_bytes=99)
    assert local_store.get(f"{root}/big.bin", max_bytes=100) == b"x" * 100


def test_local_put_is_whole_or_nothing(local_store: ObjectStore, tmp_path: Path) -> None:
    url = f"{local_store.storage_url}/jobs/j/mask.png"
    local_store.put(url, b"old", "image/png")
    stop = threading.Event()
    torn: list[bytes] = []

    def reader() -> None:
        while not stop.is_set():
            data = local_store.get(url)
            if data not in (b"old", b"N" * 2_000_000):
                torn.append(data[:10])

    thread = threading.Thread(target=reader)
    thread.start()
    for _ in range(5):
        local_store.put(url, b"N" * 2_000_000, "image/png")
        local_store.put(url, b"old", "image/png")
    stop.set()
    thread.join()
    assert torn == []
    leftovers = [p.name for p in (tmp_path / "data/jobs/j").iterdir()]
    assert leftovers == ["mask.png"]  # no temp files left behind


@pytest.mark.parametrize(
    "suffix",
    ["/../outside.png", "/../data-evil/x.png", "/jobs/../../outside.png"],
)
def test_local_paths_outside_the_root_are_forbidden(local_store: ObjectStore, suffix: str) -> None:
    url = local_store.storage_url + suffix
    for op in (lambda: local_store.get(url), lambda: local_store.put(url, b"1", "x/y"),
               lambda: local_store.local_path(url), lambda: local_store.exists(url)):
        with pytest.raises(InputForbidden):
            op()
    assert local_store.relative_key(url) is None


def test_local_symlink_escaping_the_root_is_forbidden(local_store: ObjectStore, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    root = tmp_path / "data"
    root.mkdir()
    os.symlink(secret, root / "link.png")
    with pytest.raises(InputForbidden):
        local_store.get(f"{local_store.storage_url}/link.png")


def test_local_relative_key_and_url_for_key(local_store: ObjectStore) -> None:
    url = f"{local_store.storage_url}/jobs/j3/mask.png"
    assert local_store.relative_key(url) == "jobs/j3/mask.png"
    assert local_store.url_for_key("jobs/j3/mask.png") == url
    assert local_store.relative_key(local_store.storage_url) is None
    assert local_store.relative_key("s3://b/jobs/j3/mask.png") is None
    for key in ("../etc/passwd", "/etc/passwd", "jobs/../../x", "", "a//b"):
        with pytest.raises(InputForbidden):
            local_store.url_for_key(key)


def test_local_store_refuses_file_urls_when_root_is_s3(s3_store: ObjectStore, tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"1")
    with pytest.raises(InputForbidden):
        s3_store.get(f"file://{tmp_path}/a.png")


def test_local_ping_creates_root(tmp_path: Path) -> None:
    store = ObjectStore(f"file://{tmp_path}/new/root")
    store.ping()
    assert (tmp_path / "new/root").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageUnavailable):
        ObjectStore(f"file://{blocker}/sub").ping()


@pytest.mark.parametrize("url", ["http://x/y", "ftp://a", "/plain/path", "s3://"])
def test_invalid_storage_urls(url: str) -> None:
    with pytest.raises(InvalidInput):
        ObjectStore(url)



def test_local_root_behind_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    store = ObjectStore(f"file://{tmp_path}/link")
    assert store.storage_url == f"file://{tmp_path}/real"
    store.put(store.url_for_key("jobs/j/mask.png"), b"1", "image/png")
    [listed] = store.list(store.storage_url + "/")
    assert listed.startswith(store.storage_url + "/")
    assert store.relative_key(listed) == "jobs/j/mask.png"
    assert store.relative_key(f"file://{tmp_path}/link/jobs/j/mask.png") == "jobs/j/mask.png"


def test_s3_client_is_rebuilt_after_a_fork(s3_store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    parent_client = s3_store.client
    assert s3_store.client is parent_client  # shared within a process
    real_pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: real_pid + 1)  # as seen from a forked child
    assert s3_store.client is not parent_client
    s3_store.ping()
