"""Jobs through the API: create (JSON, multipart, data URL), idempotency, get, list, cancel, output URLs,
enqueue failures. Real Redis and real S3 (moto); the Celery producer is a recorder."""

from __future__ import annotations

import io
import socket
import time
import urllib.request
from typing import Any

import boto3
import pytest
import redis

from api import create_app
from storage.jobs import JobStatus
from tests.fixtures.api import (
    assert_error,
    data_url,
    png_bytes,
)

PUBLIC_HOOK = "https://93.184.215.14/hook"  # a public address literal: no DNS needed


def create(client, tenant, **body):
    body.setdefault("input", "s3://inputs-bucket/faces/a.jpg")
    return client.post("/v1/jobs", json=body, headers=tenant.headers)


def test_create_json_queues_the_job_by_id(client, tenants, queue, s3_bucket):
    acme = tenants["acme"]
    resp = create(
        client,
        acme,
        webhook=PUBLIC_HOOK,
        webhook_events_filter=["start", "completed"],
        outputs=["mask", "masks"],
    )
    assert resp.status_code == 202, resp.get_json()
    job = resp.get_json()
    assert resp.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["input"] == "s3://inputs-bucket/faces/a.jpg"
    assert job["webhook"] == {"url": PUBLIC_HOOK, "events_filter": ["start", "completed"], "deliveries": []}
    assert job["outputs"] == {} and job["error"] is None and job["attempts"] == 0
    # Internal fields never reach the client.
    assert not {"tenant", "requested_outputs", "output_prefix"} & set(job)
    assert queue.job_ids() == [job["id"]]

    stored = client.application.extensions["faceparse"].job_store.get(job["id"])
    assert stored.tenant == acme.name and stored.requested_outputs == ["mask", "masks"]
    assert client.get(f"/v1/jobs/{job['id']}", headers=acme.headers).get_json() == job


def test_create_defaults(client, tenants):
    job = create(client, tenants["acme"]).get_json()
    stored = client.application.extensions["faceparse"].job_store.get(job["id"])
    assert stored.requested_outputs == ["mask", "overlay", "summary"]
    assert stored.webhook is None and stored.output_prefix is None


def test_create_multipart_stores_the_upload(client, tenants, queue, s3_bucket):
    image = png_bytes((10, 7))
    resp = client.post(
        "/v1/jobs",
        data={
            "image": (io.BytesIO(image), "my face.png"),
            "outputs": "mask,masks",
            "webhook_events_filter": ["start", "completed"],
            "webhook": PUBLIC_HOOK,
        },
        headers=tenants["acme"].headers,
        content_type="multipart/form-data",
    )
    assert resp.status_code == 202, resp.get_json()
    job = resp.get_json()
    assert job["input"] == f"s3://{s3_bucket}/store/uploads/{job['id']}/my_face.png"
    body = boto3.client("s3").get_object(Bucket=s3_bucket, Key=f"store/uploads/{job['id']}/my_face.png")
    assert body["Body"].read() == image and body["ContentType"] == "image/png"
    assert job["webhook"]["events_filter"] == ["start", "completed"]
    stored = client.application.extensions["faceparse"].job_store.get(job["id"])
    assert stored.requested_outputs == ["mask", "masks"]
    assert queue.job_ids() == [job["id"]]


def test_create_multipart_with_input_url(client, tenants):
    resp = client.post(
        "/v1/jobs", data={"input": "s3://inputs-bucket/b.png"}, headers=tenants["acme"].headers
    )
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["input"] == "s3://inputs-bucket/b.png"


def test_create_data_url_is_written_to_storage(client, tenants, s3_bucket):
    image = png_bytes(fmt="JPEG")
    resp = create(client, tenants["acme"], input=data_url(image, "image/jpeg"))
    assert resp.status_code == 202, resp.get_json()
    job = resp.get_json()
    # The record holds a key, never the bytes.
    assert job["input"] == f"s3://{s3_bucket}/store/uploads/{job['id']}/input.jpeg"
    obj = boto3.client("s3").get_object(Bucket=s3_bucket, Key=f"store/uploads/{job['id']}/input.jpeg")
    assert obj["Body"].read() == image


def test_idempotency_key_returns_the_same_job(client, tenants, queue, s3_bucket):
    acme, globex = tenants["acme"], tenants["globex"]
    headers = {**acme.headers, "Idempotency-Key": "order-42"}
    first = client.post("/v1/jobs", json={"input": "s3://inputs-bucket/x.jpg"}, headers=headers)
    again = client.post("/v1/jobs", json={"input": "s3://inputs-bucket/x.jpg"}, headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert queue.job_ids() == [first.get_json()["id"]]  # enqueued once
    # The same key from another tenant is another job.
    other = client.post(
        "/v1/jobs",
        json={"input": "s3://inputs-bucket/x.jpg"},
        headers={**globex.headers, "Idempotency-Key": "order-42"},
    )
    assert other.status_code == 202 and other.get_json()["id"] != first.get_json()["id"]


def test_idempotent_upload_replay_leaves_no_orphan_upload(client, tenants, s3_bucket):
    headers = {**tenants["acme"].headers, "Idempotency-Key": "upload-1"}
    ids = set()
    for _ in range(2):
        resp = client.post("/v1/jobs", json={"input": data_url(png_bytes())}, headers=headers)
        ids.add(resp.get_json()["id"])
    assert len(ids) == 1
    listed = boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix=f"store/uploads/{ids.pop()}/")
    assert listed["KeyCount"] == 1


def test_list_is_newest_first_with_cursor_and_status(client, tenants):
    acme = tenants["acme"]
    ids = []
    for i in range(5):
        ids.append(create(client, acme, input=f"s3://inputs-bucket/{i}.jpg").get_json()["id"])
        # The store orders by creation time in milliseconds; jobs of the same millisecond tie.
        time.sleep(0.002)
    create(client, tenants["globex"])  # another tenant's job never shows
    seen, cursor = [], None
    while True:
        query = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", query_string=query, headers=acme.headers).get_json()
        assert len(page["jobs"]) <= 2
        seen += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]

    client.post(f"/v1/jobs/{ids[1]}/cancel", headers=acme.headers)
    canceled = client.get("/v1/jobs?status=canceled", headers=acme.headers).get_json()
    assert [job["id"] for job in canceled["jobs"]] == [ids[1]] and canceled["next_cursor"] is None
    queued = client.get("/v1/jobs?status=queued&limit=100", headers=acme.headers).get_json()
    assert [job["id"] for job in queued["jobs"]] == [i for i in ids[::-1] if i != ids[1]]


def test_cancel_queued_job_and_terminal_jobs_stay(client, tenants):
    acme = tenants["acme"]
    store = client.application.extensions["faceparse"].job_store
    job_id = create(client, acme).get_json()["id"]
    resp = client.post(f"/v1/jobs/{job_id}/cancel", headers=acme.headers)
    assert resp.status_code == 200
    assert resp.get_json()["status"] == "canceled" and resp.get_json()["completed_at"]
    assert store.get(job_id).status == JobStatus.CANCELED
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=acme.headers).get_json()["status"] == "canceled"

    done_id = create(client, acme).get_json()["id"]
    store.transition(done_id, JobStatus.PROCESSING)
    store.transition(done_id, JobStatus.SUCCEEDED)
    resp = client.post(f"/v1/jobs/{done_id}/cancel", headers=acme.headers)
    assert resp.status_code == 200 and resp.get_json()["status"] == "succeeded"


def test_output_urls_are_presigned_and_download(client, tenants, s3_bucket):
    acme = tenants["acme"]
    store = client.application.extensions["faceparse"].job_store
    job_id = create(client, acme).get_json()["id"]
    s3 = boto3.client("s3")
    prefix = f"store/jobs/{job_id}"
    s3.put_object(Bucket=s3_bucket, Key=f"{prefix}/mask.png", Body=b"mask-bytes")
    s3.put_object(Bucket=s3_bucket, Key=f"{prefix}/masks/skin.png", Body=b"skin-bytes")
    outputs = {
        "mask": {"key": f"s3://{s3_bucket}/{prefix}/mask.png"},
        "masks": {"skin": {"key": f"s3://{s3_bucket}/{prefix}/masks/skin.png"}},
    }
    store.transition(job_id, JobStatus.SUCCEEDED, outputs=outputs)
    for path in (f"/v1/jobs/{job_id}", "/v1/jobs"):
        body = client.get(path, headers=acme.headers).get_json()
        job = body if "id" in body else body["jobs"][0]
        mask, skin = job["outputs"]["mask"], job["outputs"]["masks"]["skin"]
        assert mask["key"] == outputs["mask"]["key"] and "X-Amz-Signature=" in mask["url"]
        with urllib.request.urlopen(mask["url"], timeout=10) as r:
            assert r.read() == b"mask-bytes"
        with urllib.request.urlopen(skin["url"], timeout=10) as r:
            assert r.read() == b"skin-bytes"


def fail_queue_writes(monkeypatch: pytest.MonkeyPatch, after: int = 0) -> None:
    """Redis drops the connection at the EXEC of every transaction that pushes a queue message,
    from the (after+1)-th on: the moment between a job's record and its message, if they were two."""
    execute, seen = redis.client.Pipeline.execute, {"n": 0}

    def failing(self: redis.client.Pipeline, *args: Any, **kwargs: Any) -> Any:
        if any(command[0][0] == "LPUSH" for command in self.command_stack):
            seen["n"] += 1
            if seen["n"] > after:
                self.reset()
                raise redis.ConnectionError("Connection reset by peer (injected)")
        return execute(self, *args, **kwargs)

    monkeypatch.setattr(redis.client.Pipeline, "execute", failing)


def test_a_failed_write_leaves_neither_the_job_nor_its_message(client, tenants, queue, monkeypatch):
    """The job's record and its queue message are one Redis transaction: both or neither."""
    acme = tenants["acme"]
    fail_queue_writes(monkeypatch)
    assert_error(create(client, acme), 503)
    assert client.get("/v1/jobs", headers=acme.headers).get_json()["jobs"] == []
    assert queue.job_ids() == []
    monkeypatch.undo()
    job = create(client, acme).get_json()  # Redis back: the next submission is queued as usual
    assert queue.job_ids() == [job["id"]]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method,path", [("post", "/v1/jobs"), ("get", "/v1/jobs/abc"), ("get", "/v1/jobs")])
def test_redis_down_is_503(settings, tenants, method, path):
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{closed_port()}/0"})
    client = create_app(down).test_client()
    kwargs = {"json": {"input": "s3://inputs-bucket/a.jpg"}} if method == "post" else {}
    resp = getattr(client, method)(path, headers=tenants["acme"].headers, **kwargs)
    body = assert_error(resp, 503)
    assert body["error"]["code"] in ("unavailable", "redis_unavailable")
    assert "redis" in body["error"]["message"].lower()
