"""Object storage by full URL: `s3://bucket/key` through boto3, or `file:///abs/path` in a local directory.

S3 endpoint and credentials come from boto3's own variables (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`), so AWS, MinIO, R2 and
Ceph work unchanged. Local paths are confined to the store's root directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage.errors import (
    FaceparseError,
    ImageTooLarge,
    InputForbidden,
    InputNotFound,
    InvalidInput,
    StorageUnavailable,
)

if TYPE_CHECKING:
    from botocore.client import BaseClient

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"

# S3 error codes, grouped by what they mean to a caller.
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "404", "NotFound"})
_DENIED_CODES = frozenset({"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"})
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling", "503", "500"}
)
# Credentials the server rejects: an operator problem, surfaced as "storage unavailable" so
# /readyz fails and the job is retried once the configuration is fixed.
_CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"})


def split_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key); the key may be empty (a bucket or prefix root)."""
    if not url.startswith(S3_SCHEME):
        raise InvalidInput(f"not an s3:// URL: {url!r}", code="unsupported_scheme")
    bucket, _, key = url[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise InvalidInput(f"s3 URL without a bucket: {url!r}", code="invalid_url")
    return bucket, key


def file_url_to_path(url: str) -> Path:
    """`file:///abs/path` -> Path; `file://./rel` and `file://rel` resolve against the CWD."""
    if not url.startswith(FILE_SCHEME):
        raise InvalidInput(f"not a file:// URL: {url!r}", code="unsupported_scheme")
    rest = url[len(FILE_SCHEME):]
    if rest.startswith("localhost/"):
        rest = rest[len("localhost"):]
    if not rest:
        raise InvalidInput(f"file URL without a path: {url!r}", code="invalid_url")
    return Path(os.path.abspath(rest))  # abspath: relative paths against the CWD, '..' collapsed


def path_to_file_url(path: Path) -> str:
    """An absolute path -> `file:///abs/path`."""
    return FILE_SCHEME + path.as_posix()


def normalize_storage_url(storage_url: str) -> str:
    """`file://./data` -> `file:///cwd/data`; `s3://bucket/prefix/` -> `s3://bucket/prefix`."""
    if storage_url.startswith(FILE_SCHEME):
        # realpath: the root's URL is the prefix of every URL the store hands out, even when
        # the directory sits behind a symlink; it never ends in a slash (except "/" itself).
        return path_to_file_url(Path(os.path.realpath(file_url_to_path(storage_url))))
    if storage_url.startswith(S3_SCHEME):
        bucket, prefix = split_s3_url(storage_url)
        prefix = prefix.strip("/")
        return f"{S3_SCHEME}{bucket}/{prefix}" if prefix else f"{S3_SCHEME}{bucket}"
    raise InvalidInput(
        f"storage URL must be s3://bucket[/prefix] or file:///dir, got {storage_url!r}",
        code="invalid_storage_url",
    )


class ObjectStore:
    """Reads/writes objects by full URL: s3://bucket/key or file:///abs/path.

    One boto3 client per store, built lazily (so after any fork) and shared by threads.
    """

    def __init__(
        self,
        storage_url: str,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 4,
    ) -> None:
        self.storage_url = normalize_storage_url(storage_url)
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_attempts = max_attempts
        self._client: BaseClient | None = None
        self._ping_client: BaseClient | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._root: Path | None = (
            file_url_to_path(self.storage_url) if self.storage_url.startswith(FILE_SCHEME) else None
        )

    def __repr__(self) -> str:
        return f"ObjectStore({self.storage_url!r})"

    @property
    def is_local(self) -> bool:
        """True when the default root is a local directory (outputs served by the API)."""
        return self._root is not None

    # --- boto3 ------------------------------------------------------------------------------
    def _build_client(self, *, max_attempts: int, connect_timeout: float, read_timeout: float) -> BaseClient:
        import boto3
        from botocore.config import Config

        config = Config(
            # total_max_attempts counts the first try too (botocore's max_attempts would not).
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            signature_version="s3v4",
            # Uploads/outputs are small and many threads (batcher, webhooks) share the client.
            max_pool_connections=32,
        )
        # A fresh session per store: boto3's default session is not thread-safe to build lazily.
        return boto3.session.Session().client("s3", config=config)

    def _after_fork(self) -> None:
        # A client built before a fork (gunicorn --preload, Celery prefork) shares sockets with
        # its parent; each process must build its own.
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._client = self._ping_client = None
                    self._pid = os.getpid()

    @property
    def client(self) -> BaseClient:
        """The shared boto3 S3 client, built on first use in each process from the environment."""
        self._after_fork()
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._build_client(
                        max_attempts=self._max_attempts,
                        connect_timeout=self._connect_timeout,
                        read_timeout=self._read_timeout,
                    )
        return self._client

    def _fast_client(self) -> BaseClient:
        # /readyz must answer quickly: one attempt, short timeouts.
        self._after_fork()
        if self._ping_client is None:
            with self._lock:
                if self._ping_client is None:
                    self._ping_client = self._build_client(
                        max_attempts=1, connect_timeout=2.0, read_timeout=3.0
                    )
        return self._ping_client

    # --- local paths ------------------------------------------------------------------------
    def local_path(self, url: str) -> Path:
        """The path of a file:// URL inside the storage root; InputForbidden anywhere else."""
        if self._root is None:
            raise InputForbidden(f"local files are not served by this store: {url!r}")
        path = file_url_to_path(url)
        root = self._root.resolve()
        # resolve() follows symlinks, so a link inside the root pointing outside is refused too.
        resolved = path.resolve()
        if resolved != root and not resolved.is_relative_to(root):
            raise InputForbidden(f"path outside the storage root: {url!r}")
        return resolved

    def relative_key(self, url: str) -> str | None:
        """Key of `url` relative to the storage root (for /v1/files/{key}); None when outside it."""
        if self._root is not None:
            if not url.startswith(FILE_SCHEME):
                return None
            try:
                path = self.local_path(url)
            except InvalidInput:
                return None
            key = path.relative_to(self._root.resolve()).as_posix()
            return None if key == "." else key
        root = self.storage_url + "/"
        if not url.startswith(root) or len(url) == len(root):
            return None
        return url[len(root):]

    def url_for_key(self, key: str) -> str:
        """Inverse of relative_key: the full URL of a key under the storage root."""
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise InputForbidden(f"invalid storage key: {key!r}")
        base = self.storage_url if self.storage_url.endswith("/") else self.storage_url + "/"
        return base + key

    # --- operations -------------------------------------------------------------------------
    def get(self, url: str, *, max_bytes: int | None = None) -> bytes:
        """The object's bytes: InputNotFound, ImageTooLarge (checked before download), StorageUnavailable."""
        if url.startswith(FILE_SCHEME):
            return self._get_local(url, max_bytes)
        bucket, key = self._s3_object(url)
        with self._s3_errors(url):
            resp = self.client.get_object(Bucket=bucket, Key=key)
            body = resp["Body"]
            try:
                size = resp.get("ContentLength")
                if max_bytes is not None and size is not None and size > max_bytes:
                    raise ImageTooLarge(f"{url} is {size} bytes, the limit is {max_bytes}")
                # Read one byte past the limit: a server that lied about the length is caught too.
                data = body.read() if max_bytes is None else body.read(max_bytes + 1)
            finally:
                body.close()
        if max_bytes is not None and len(data) > max_bytes:
            raise ImageTooLarge(f"{url} is larger than the limit of {max_bytes} bytes")
        return data

    def _get_local(self, url: str, max_bytes: int | None) -> bytes:
        path = self.local_path(url)
        try:
            with path.open("rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if max_bytes is not None and size > max_bytes:
                    raise ImageTooLarge(f"{url} is {size} bytes, the limit is {max_bytes}")
                return fh.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise InputNotFound(f"no such object: {url}") from exc
        except PermissionError as exc:
            raise InputForbidden(f"cannot read {url}") from exc

    def put(self, url: str, data: bytes, content_type: str) -> None:
        """Write the whole object or nothing (local: a temp file renamed into place)."""
        if url.startswith(FILE_SCHEME):
            self._put_local(url, data)
            return
        bucket, key = self._s3_object(url)
        with self._s3_errors(url):
            self.client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)

    def _put_local(self, url: str, data: bytes) -> None:
        path = self.local_path(url)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise StorageUnavailable(f"cannot write {url}: {exc.strerror or exc}") from exc

    def delete(self, url: str) -> None:
        """Remove the object; deleting a missing object is not an error."""
        if url.startswith(FILE_SCHEME):
            path = self.local_path(url)
            try:
                path.unlink(missing_ok=True)
            except IsADirectoryError as exc:
                raise InvalidInput(f"{url} is a directory", code="invalid_url") from exc
            return
        bucket, key = self._s3_object(url)
        with self._s3_errors(url):
            self.client.delete_object(Bucket=bucket, Key=key)

    def exists(self, url: str) -> bool:
        """True when the object exists."""
        if url.startswith(FILE_SCHEME):
            return self.local_path(url).is_file()
        bucket, key = self._s3_object(url)
        try:
            with self._s3_errors(url):
                self.client.head_object(Bucket=bucket, Key=key)
        except InputNotFound:
            return False
        return True

    def list(self, prefix_url: str, *, limit: int = 1000) -> list[str]:
        """Full URLs of the objects under a prefix (`.../dir/` or a partial name), sorted, at most `limit`."""
        if limit <= 0:
            return []
        if prefix_url.startswith(FILE_SCHEME):
            return self._list_local(prefix_url, limit)
        bucket, prefix = split_s3_url(prefix_url)
        urls: list[str] = []
        with self._s3_errors(prefix_url):
            paginator = self.client.get_paginator("list_objects_v2")
            pages = paginator.paginate(
                Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": min(limit, 1000)}
            )
            for page in pages:
                for item in page.get("Contents", []):
                    if item["Key"].endswith("/"):  # "folder" placeholders made by consoles
                        continue
                    urls.append(f"{S3_SCHEME}{bucket}/{item['Key']}")
                    if len(urls) >= limit:
                        return urls
        return urls

    def _list_local(self, prefix_url: str, limit: int) -> list[str]:
        # A trailing slash lists a directory; otherwise the last part is a name prefix.
        if prefix_url.endswith("/"):
            directory, name_prefix = self.local_path(prefix_url), ""
        else:
            path = self.local_path(prefix_url)
            directory, name_prefix = path.parent, path.name
            # The parent itself must be inside the root (the root's own parent is not).
            self.local_path(path_to_file_url(directory))
        if not directory.is_dir():
            return []
        urls: list[str] = []
        for dirpath, dirnames, filenames in os.walk(directory):
            dirnames.sort()
            base = Path(dirpath)
            for name in sorted(filenames):
                if name.startswith(".") and name.endswith(".tmp"):  # a put still in flight
                    continue
                full = base / name
                if name_prefix and not full.relative_to(directory).as_posix().startswith(name_prefix):
                    continue
                urls.append(path_to_file_url(full))
        urls.sort()
        return urls[:limit]

    def presign(self, url: str, expires: int = 3600) -> str | None:
        """A presigned GET URL for an s3:// object; None for file:// (the API serves those)."""
        if url.startswith(FILE_SCHEME):
            return None
        bucket, key = self._s3_object(url)
        with self._s3_errors(url):
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires
            )

    def ping(self) -> None:
        """Check the storage root is reachable and usable; StorageUnavailable if not (for /readyz)."""
        if self._root is not None:
            try:
                self._root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageUnavailable(f"storage directory {self._root} unusable: {exc}") from exc
            if not os.access(self._root, os.W_OK | os.X_OK):
                raise StorageUnavailable(f"storage directory {self._root} is not writable")
            return
        bucket, _ = split_s3_url(self.storage_url)
        try:
            with self._s3_errors(self.storage_url, client_name="ping"):
                self._fast_client().head_bucket(Bucket=bucket)
        except StorageUnavailable:
            raise
        except FaceparseError as exc:
            raise StorageUnavailable(f"storage bucket {bucket!r}: {exc.message}") from exc

    # --- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _s3_object(url: str) -> tuple[str, str]:
        if not url.startswith(S3_SCHEME):
            raise InvalidInput(f"unsupported storage URL: {url!r}", code="unsupported_scheme")
        bucket, key = split_s3_url(url)
        if not key or key.endswith("/"):
            raise InvalidInput(f"s3 URL does not name an object: {url!r}", code="invalid_url")
        return bucket, key

    @contextlib.contextmanager
    def _s3_errors(self, url: str, client_name: str = "main") -> Any:
        """Map botocore failures to the domain errors (missing, forbidden, transient)."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            ParamValidationError,
        )

        try:
            yield
        except ClientError as exc:
            raise _map_client_error(exc, url) from exc
        except NoCredentialsError as exc:
            raise StorageUnavailable(f"no S3 credentials configured for {url}") from exc
        except ParamValidationError as exc:
            raise InvalidInput(f"invalid S3 request for {url}: {exc}", code="invalid_url") from exc
        except BotoCoreError as exc:
            # Endpoint down, connection reset, connect/read timeouts: all worth a retry.
            log.warning("s3 request failed", extra={"url": url, "error": str(exc), "client": client_name})
            raise StorageUnavailable(f"object storage unreachable for {url}: {exc}") from exc


def _map_client_error(exc: Any, url: str) -> FaceparseError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    message = error.get("Message") or code or "error"
    if code in _MISSING_CODES or status == 404:
        return InputNotFound(f"no such object: {url}")
    if code in _CREDENTIAL_CODES:
        return StorageUnavailable(f"object storage rejected the credentials ({code}) for {url}")
    if code in _DENIED_CODES or status == 403:
        return InputForbidden(f"access denied to {url}")
    if code in _TRANSIENT_CODES or status >= 500 or status in (408, 429):
        return StorageUnavailable(f"object storage error {code or status} for {url}: {message}")
    return InvalidInput(f"object storage refused {url}: {code} {message}", code="storage_rejected")
