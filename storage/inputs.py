"""Reading a job's input image, whatever the URL: s3://, file:// (uploads), https://, data:.

`validate_input_url` is the API's cheap syntactic check at submit time; `read_input` is the
worker's fetch, with size limits, a bucket allow-list and the network guard on every hop.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from urllib.parse import unquote, unquote_to_bytes, urljoin, urlsplit

import requests

from storage import keys, netguard
from storage.errors import (
    FetchFailed,
    ImageTooLarge,
    InputForbidden,
    InputNotFound,
    InvalidInput,
)
from storage.objects import FILE_SCHEME, S3_SCHEME, ObjectStore, split_s3_url

MAX_REDIRECTS = 3
MAX_URL_LENGTH = 8192  # data: URLs excepted; their size is bounded by max_bytes
_CHUNK = 64 * 1024
_MIME_RE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]$")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = "faceparse-fetch/0.1"


def parse_data_url(url: str, *, max_bytes: int) -> tuple[str, bytes]:
    """(mime, bytes) of a `data:` URL; InvalidInput(code="invalid_data_url") or ImageTooLarge."""
    if url[:5].lower() != "data:":
        raise InvalidInput("not a data: URL", code="invalid_data_url")
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise InvalidInput("data: URL without a comma before the data", code="invalid_data_url")
    params = [p.strip() for p in header.split(";")]
    mime = params[0].lower() or "text/plain"  # RFC 2397's default
    if not _MIME_RE.match(mime):
        raise InvalidInput(f"data: URL with an invalid media type {params[0]!r}", code="invalid_data_url")
    if any(p.lower() == "base64" for p in params[1:]):
        if "%" in payload:  # some clients percent-encode '+', '/' and '='
            payload = unquote(payload)
        payload = "".join(payload.split())
        # Decoded size from the text length, checked before decoding anything.
        size = len(payload) * 3 // 4 - payload[-2:].count("=")
        if size > max_bytes:
            raise ImageTooLarge(f"data: URL holds about {size} bytes, the limit is {max_bytes}")
        try:
            data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidInput("data: URL with invalid base64", code="invalid_data_url") from exc
    else:
        data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise ImageTooLarge(f"data: URL holds {len(data)} bytes, the limit is {max_bytes}")
    if not data:
        raise InvalidInput("data: URL is empty", code="invalid_data_url")
    return mime, data


def validate_input_url(url: str, *, allow_private: bool = False) -> None:
    """Cheap syntactic check for the API (scheme and form; no network). Raises InvalidInput."""
    if not isinstance(url, str) or not url:
        raise InvalidInput("input URL is empty", code="invalid_url")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        header, sep, payload = url[5:].partition(",")
        media = header.split(";", 1)[0].strip().lower()
        if not sep or not payload or (media and not _MIME_RE.match(media)):
            raise InvalidInput("malformed data: URL", code="invalid_data_url")
        return
    if len(url) > MAX_URL_LENGTH:
        raise InvalidInput(f"input URL longer than {MAX_URL_LENGTH} characters", code="invalid_url")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise InvalidInput("input URL contains whitespace or control characters", code="invalid_url")
    if scheme == "s3":
        bucket, key = split_s3_url(url)
        if not _BUCKET_RE.match(bucket):
            raise InvalidInput(f"invalid bucket name {bucket!r}", code="invalid_url")
        if not key or key.endswith("/"):
            raise InvalidInput("s3 input must name an object: s3://bucket/key", code="invalid_url")
        return
    if scheme == "http" and not allow_private:
        raise InvalidInput("http:// inputs are refused; use https://", code="unsupported_scheme")
    if scheme in ("http", "https"):
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise InvalidInput(f"malformed URL: {exc}", code="invalid_url") from exc
        if not parts.hostname:
            raise InvalidInput("input URL without a host", code="invalid_url")
        return
    raise InvalidInput(
        "input must be s3://bucket/key, https://… or a data: URL", code="unsupported_scheme"
    )


def check_bucket(url: str, allowed_buckets: set[str] | frozenset[str]) -> None:
    """Refuse an s3:// URL outside the bucket allow-list (`FACEPARSE_INPUT_BUCKETS`; empty allows any)."""
    bucket, _ = split_s3_url(url)
    if allowed_buckets and bucket not in allowed_buckets:
        raise InputForbidden(f"bucket {bucket!r} is not an allowed input bucket")


def read_input(
    url: str,
    store: ObjectStore,
    *,
    max_bytes: int,
    timeout: float,
    allow_private: bool,
    allowed_buckets: set[str] | frozenset[str] = frozenset(),
) -> bytes:
    """The input's bytes, at most `max_bytes`, from s3://, file:// (inside the store), https:// or data:.

    InputNotFound, InputForbidden, ImageTooLarge and InvalidInput are final; FetchFailed and
    StorageUnavailable are transient (the worker retries).
    """
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return parse_data_url(url, max_bytes=max_bytes)[1]
    if url.startswith(S3_SCHEME):
        if not _is_upload(url, store):
            check_bucket(url, allowed_buckets)
        return store.get(url, max_bytes=max_bytes)
    if url.startswith(FILE_SCHEME):
        store.local_path(url)  # InputForbidden outside the storage root
        return store.get(url, max_bytes=max_bytes)
    if scheme == "https" or (scheme == "http" and allow_private):
        return _fetch_http(url, max_bytes=max_bytes, timeout=timeout, allow_private=allow_private)
    raise InvalidInput(f"unsupported input URL scheme {scheme or url[:16]!r}", code="unsupported_scheme")


def _is_upload(url: str, store: ObjectStore) -> bool:
    # The API writes uploads and data: URLs under the store's own root; they are always readable.
    return url.startswith(keys.uploads_prefix(store.storage_url))


def _fetch_http(url: str, *, max_bytes: int, timeout: float, allow_private: bool) -> bytes:
    deadline = time.monotonic() + timeout
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        scheme = urlsplit(current).scheme.lower()
        if not (scheme == "https" or (scheme == "http" and allow_private)):
            raise InvalidInput(f"redirect to an unsupported URL {current[:200]!r}", code="unsupported_scheme")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchFailed(f"fetching {url} took longer than {timeout}s")
        try:
            resp = netguard.guarded_request(
                "GET",
                current,
                allow_private=allow_private,
                timeout=(min(remaining, 10.0), remaining),
                headers={"Accept": "image/*", "Accept-Encoding": "identity", "User-Agent": _USER_AGENT},
                stream=True,
            )
        except requests.exceptions.SSLError as exc:
            raise InvalidInput(f"TLS failure fetching {current}: {exc}", code="fetch_tls_error") from exc
        except (requests.exceptions.Timeout, requests.exceptions.ConnectionError) as exc:
            raise FetchFailed(f"could not fetch {current}: {exc}") from exc
        except requests.exceptions.RequestException as exc:
            raise InvalidInput(f"cannot fetch {current}: {exc}", code="invalid_url") from exc
        with resp:
            if resp.status_code in _REDIRECTS and resp.headers.get("Location"):
                current = urljoin(current, resp.headers["Location"])
                continue
            _raise_for_status(resp, current)
            return _read_limited(resp, current, max_bytes=max_bytes, deadline=deadline, timeout=timeout)
    raise InvalidInput(f"more than {MAX_REDIRECTS} redirects fetching {url}", code="too_many_redirects")


def _raise_for_status(resp: requests.Response, url: str) -> None:
    status = resp.status_code
    if 200 <= status < 300:
        return
    if status in (404, 410):
        raise InputNotFound(f"{url} answered {status}")
    if status >= 500 or status in (408, 425, 429):
        raise FetchFailed(f"{url} answered {status}")
    raise InvalidInput(f"{url} answered {status}", code="fetch_rejected")


def _read_limited(
    resp: requests.Response, url: str, *, max_bytes: int, deadline: float, timeout: float
) -> bytes:
    declared = resp.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ImageTooLarge(f"{url} is {declared} bytes, the limit is {max_bytes}")
    body = bytearray()
    try:
        for chunk in resp.iter_content(_CHUNK):
            body += chunk
            if len(body) > max_bytes:
                raise ImageTooLarge(f"{url} is larger than the limit of {max_bytes} bytes")
            # A server trickling bytes must not hold a worker past the fetch timeout.
            if time.monotonic() > deadline:
                raise FetchFailed(f"fetching {url} took longer than {timeout}s")
    except (requests.exceptions.RequestException, OSError) as exc:
        raise FetchFailed(f"connection lost while reading {url}: {exc}") from exc
    return bytes(body)
