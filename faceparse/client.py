"""A small Python client of the faceparse HTTP API, and webhook verification for receivers.

    client = Client("http://127.0.0.1:8000", api_key="...")
    job = client.submit("photo.jpg")               # a local file is uploaded (multipart)
    job = client.submit("s3://bucket/face.jpg")    # anything else is passed as the input URL
    done = client.wait([job["id"]])[0]
    client.download(done, Path("out/photo"))

`submit_command` and `status_command` back the `faceparse submit` and `faceparse status` verbs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

import requests

TERMINAL = ("succeeded", "failed", "canceled")
WEBHOOK_TOLERANCE_S = 300


class ApiError(Exception):
    """An error answer of the API: HTTP status plus the stable error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class Client:
    """Talks to one faceparse API."""

    def __init__(self, api_url: str, api_key: str | None = None, *, timeout: float = 30.0,
                 session: requests.Session | None = None) -> None:
        self.api_url = api_url.rstrip("/") + "/"
        self.timeout = timeout
        self.session = session or requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    # --- jobs ---------------------------------------------------------------------------
    def submit(self, image: str | Path, *, idempotency_key: str | None = None,
               **fields: Any) -> dict[str, Any]:
        """Create a job from a local file (uploaded) or an s3://, https:// or data: input."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        path = Path(image)
        if not _is_url(str(image)) and path.is_file():
            form = {k: _form_value(v) for k, v in fields.items() if v is not None}
            with path.open("rb") as fh:
                return self._request("POST", "v1/jobs", headers=headers, data=form,
                                     files={"image": (path.name, fh)})
        body = {"input": str(image), **{k: v for k, v in fields.items() if v is not None}}
        return self._request("POST", "v1/jobs", headers=headers, json=body)

    def get(self, job_id: str) -> dict[str, Any]:
        """The job."""
        return self._request("GET", f"v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel the job (no effect once it has finished)."""
        return self._request("POST", f"v1/jobs/{job_id}/cancel")

    def list(self, *, status: str | None = None, limit: int | None = None,
             cursor: str | None = None) -> dict[str, Any]:
        """One page of the tenant's jobs, newest first."""
        params = {k: v for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v}
        return self._request("GET", "v1/jobs", params=params)

    def submit_batch(self, *, inputs: list[str] | None = None, prefix: str | None = None,
                     **fields: Any) -> dict[str, Any]:
        """Create a batch from a list of inputs or every image under an s3:// prefix."""
        body: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
        if inputs is not None:
            body["inputs"] = inputs
        if prefix is not None:
            body["prefix"] = prefix
        return self._request("POST", "v1/batches", json=body)

    def batch(self, batch_id: str) -> dict[str, Any]:
        """A batch: counts by status and its job ids."""
        return self._request("GET", f"v1/batches/{batch_id}")

    def wait(self, job_ids: Iterable[str], *, timeout: float | None = None, poll_s: float = 0.3,
             progress: bool = False) -> list[dict[str, Any]]:
        """Poll until every job is terminal; returns them in the order asked (TimeoutError past `timeout`).

        Jobs finish roughly in the order they were submitted, so only the first unfinished one is
        polled; once it is done the next is checked at once. A thousand waiting jobs cost one
        request per `poll_s`, not a thousand.
        """
        ids = list(job_ids)
        done: list[dict[str, Any]] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _progress(len(ids)) if progress else None
        try:
            for job_id in ids:
                while True:
                    job = self.get(job_id)
                    if job["status"] in TERMINAL:
                        break
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"{len(ids) - len(done)} of {len(ids)} jobs still running")
                    time.sleep(poll_s)
                done.append(job)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return done

    def download(self, job: Mapping[str, Any], out_dir: Path) -> list[Path]:
        """Write a succeeded job's outputs into `out_dir` (mask.png, overlay.png, summary.json, masks/)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        for name, ref in (job.get("outputs") or {}).items():
            if name == "masks":
                for label, mref in ref.items():
                    written.append(self._fetch(mref, out_dir / "masks" / f"{label}.png"))
            else:
                written.append(self._fetch(ref, out_dir / Path(urlparse(ref["key"]).path).name))
        return written

    # --- plumbing -----------------------------------------------------------------------
    def _fetch(self, ref: Mapping[str, Any], dest: Path) -> Path:
        url = ref.get("url")
        if not url:
            raise ApiError(0, "no_url", f"output {ref.get('key')} has no download URL")
        # API file URLs are relative when FACEPARSE_PUBLIC_URL is unset; presigned ones are absolute.
        absolute = urljoin(self.api_url, url)
        same_api = absolute.startswith(self.api_url)
        resp = (self.session.get(absolute, timeout=self.timeout) if same_api
                else requests.get(absolute, timeout=self.timeout))
        if resp.status_code != 200:
            raise ApiError(resp.status_code, "download_failed", f"GET {absolute}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(resp.content)
        return dest

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        resp = self.session.request(method, urljoin(self.api_url, path), timeout=self.timeout, **kwargs)
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.status_code >= 400:
            err = (data or {}).get("error", {}) if isinstance(data, dict) else {}
            raise ApiError(resp.status_code, err.get("code", "http_error"),
                           err.get("message", resp.text[:200]))
        if not isinstance(data, dict):
            raise ApiError(resp.status_code, "bad_response", "the API did not answer JSON")
        return data


def verify_webhook(secret: str, headers: Mapping[str, str], body: bytes | str, *,
                   tolerance_s: int = WEBHOOK_TOLERANCE_S, now: float | None = None) -> bool:
    """Whether a delivery is authentic (Standard Webhooks v1): signature and timestamp both hold.

    `headers` is looked up case-insensitively; any of the space-separated `v1,` signatures may
    match (several are sent while a secret rotates).
    """
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id = lower.get("webhook-id")
    ts = lower.get("webhook-timestamp")
    sigs = lower.get("webhook-signature")
    if not msg_id or not ts or not sigs:
        return False
    try:
        timestamp = int(ts)
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False  # replayed or badly delayed
    payload = body.encode() if isinstance(body, str) else body
    expected = base64.b64encode(
        hmac.new(key, f"{msg_id}.{timestamp}.".encode() + payload, hashlib.sha256).digest()
    ).decode()
    ok = False
    for candidate in sigs.split():
        version, _, sig = candidate.partition(",")
        # No early exit: compare every candidate in constant time.
        if version == "v1" and hmac.compare_digest(sig.encode(), expected.encode()):
            ok = True
    return ok


# --- the CLI verbs --------------------------------------------------------------------------
def submit_command(images: list[str], *, api_url: str, api_key: str | None, wait: bool,
                   out: Path | None) -> int:
    """`faceparse submit`: submit each image, optionally wait and download. Returns the exit code."""
    client = Client(api_url, api_key)
    submitted: list[tuple[str, dict[str, Any]]] = []
    try:
        for image in images:
            job = client.submit(image)
            submitted.append((image, job))
            _say(f"{image}: job {job['id']} {job['status']}")
        if not wait:
            return 0
        finished = client.wait([job["id"] for _, job in submitted], progress=True)
    except (ApiError, requests.RequestException) as exc:
        _say(f"error: {exc}")
        return 1
    code = 0
    for (image, _), job in zip(submitted, finished, strict=True):
        if job["status"] != "succeeded":
            code = 1
            err = job.get("error") or {}
            _say(f"{image}: {job['status']} {err.get('code', '')} {err.get('message', '')}".rstrip())
            continue
        if out is not None:
            dest = out / _output_name(image)
            try:
                client.download(job, dest)
            except (ApiError, requests.RequestException) as exc:
                _say(f"{image}: download failed: {exc}")
                code = 1
                continue
            _say(f"{image}: succeeded -> {dest}")
        else:
            keys = {k: v.get("key") for k, v in job["outputs"].items() if k != "masks"}
            _say(f"{image}: succeeded {json.dumps(keys)}")
    return code


def status_command(job_id: str, *, api_url: str, api_key: str | None) -> int:
    """`faceparse status`: print the job as JSON."""
    try:
        job = Client(api_url, api_key).get(job_id)
    except (ApiError, requests.RequestException) as exc:
        _say(f"error: {exc}")
        return 1
    sys.stdout.write(json.dumps(job, indent=2) + "\n")
    return 0


def _output_name(image: str) -> str:
    # The whole file name, extension included, so a.jpg and a.png never collide.
    return Path(urlparse(image).path).name or "input"


def _is_url(value: str) -> bool:
    return value.startswith(("s3://", "https://", "http://", "data:"))


def _form_value(value: Any) -> str:
    # The API takes list fields of a form comma-separated (`outputs=mask,overlay`).
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _progress(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="job", desc="parsing", file=sys.stderr)


def _say(line: str) -> None:
    # The CLI's own output channel; library callers use the Client methods, which never print.
    sys.stdout.write(line + "\n")
