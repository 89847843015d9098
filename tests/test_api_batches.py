"""Batches: a list of inputs or every image under an S3 prefix, counts by status, limits."""

from __future__ import annotations

import boto3
import pytest

from storage.jobs import JobStatus
from tests.fixtures.api import (
    assert_error,
    data_url,
    png_bytes,
)
from tests.test_api_jobs import fail_queue_writes


def test_batch_of_inputs(client, tenants, queue, s3_bucket):
    acme = tenants["acme"]
    inputs = ["s3://inputs-bucket/a.jpg", "s3://inputs-bucket/b.jpg", data_url(png_bytes())]
    resp = client.post(
        "/v1/batches",
        json={"inputs": inputs, "outputs": ["mask"], "output_prefix": "runs/r1/"},
        headers=acme.headers,
    )
    assert resp.status_code == 202, resp.get_json()
    batch = resp.get_json()
    assert batch["total"] == 3 and len(batch["job_ids"]) == 3
    assert resp.headers["Location"] == f"/v1/batches/{batch['id']}"
    assert queue.job_ids() == batch["job_ids"]

    store = client.application.extensions["faceparse"].job_store
    jobs = [store.get(job_id) for job_id in batch["job_ids"]]
    assert [job.input for job in jobs[:2]] == inputs[:2]
    # The data: URL became an upload; the record holds its key.
    assert jobs[2].input == f"s3://{s3_bucket}/store/uploads/{jobs[2].id}/input.png"
    for job in jobs:
        assert job.batch_id == batch["id"] and job.tenant == acme.name and job.requested_outputs == ["mask"]
        # One folder per job under the batch's prefix, so outputs never collide.
        assert job.output_prefix == f"s3://{s3_bucket}/store/runs/r1/{job.id}/"
    assert client.get(f"/v1/jobs/{jobs[0].id}", headers=acme.headers).get_json()["batch_id"] == batch["id"]

    client.post(f"/v1/jobs/{jobs[0].id}/cancel", headers=acme.headers)
    store.transition(jobs[1].id, JobStatus.PROCESSING)
    got = client.get(f"/v1/batches/{batch['id']}", headers=acme.headers).get_json()
    assert got["id"] == batch["id"] and got["job_ids"] == batch["job_ids"] and got["total"] == 3
    assert got["counts"] == {"queued": 1, "processing": 1, "succeeded": 0, "failed": 0, "canceled": 1}


def test_batch_from_s3_prefix_keeps_images(client, tenants, queue, s3_bucket):
    s3 = boto3.client("s3")
    for key in ("in/a.jpg", "in/b.PNG", "in/notes.txt", "in/sub/c.jpeg", "in/d.webp", "other/e.jpg"):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=b"x")
    resp = client.post(
        "/v1/batches", json={"prefix": f"s3://{s3_bucket}/in/"}, headers=tenants["acme"].headers
    )
    assert resp.status_code == 202, resp.get_json()
    batch = resp.get_json()
    store = client.application.extensions["faceparse"].job_store
    inputs = sorted(store.get(job_id).input for job_id in batch["job_ids"])
    assert inputs == [f"s3://{s3_bucket}/in/{k}" for k in ("a.jpg", "b.PNG", "d.webp", "sub/c.jpeg")]
    assert batch["total"] == 4 and len(queue.sent) == 4


@pytest.mark.parametrize(
    "body,status,code",
    [
        ({"inputs": [f"s3://inputs-bucket/{i}.jpg" for i in range(5)]}, 422, "batch_too_large"),
        ({"inputs": []}, 422, "invalid_request"),
        (
            {"inputs": ["s3://inputs-bucket/a.jpg"], "prefix": "s3://inputs-bucket/in/"},
            422,
            "invalid_request",
        ),
        ({"outputs": ["mask"]}, 422, "invalid_request"),
        ({"inputs": ["s3://inputs-bucket/a.jpg", "file:///etc/passwd"]}, 422, "unsupported_scheme"),
        ({"inputs": "s3://inputs-bucket/a.jpg"}, 422, "invalid_request"),
        ({"prefix": "https://example.com/dir/"}, 422, "invalid_url"),
        ({"prefix": "s3://{bucket}/empty/"}, 422, "empty_batch"),
        ({"prefix": "s3://{bucket}/many/"}, 422, "batch_too_large"),
        ({"inputs": ["s3://inputs-bucket/a.jpg"], "webhook": "https://10.0.0.1/h"}, 422, "input_forbidden"),
        ({"inputs": [data_url(png_bytes()), data_url(b"not an image")]}, 415, "unsupported_format"),
    ],
)
def test_batch_refusals(client, tenants, queue, s3_bucket, body, status, code):
    s3 = boto3.client("s3")
    for i in range(5):
        s3.put_object(Bucket=s3_bucket, Key=f"many/{i}.jpg", Body=b"x")
    s3.put_object(Bucket=s3_bucket, Key="empty/readme.txt", Body=b"x")
    if "prefix" in body:
        body = {**body, "prefix": body["prefix"].format(bucket=s3_bucket)}
    resp = client.post("/v1/batches", json=body, headers=tenants["acme"].headers)
    assert_error(resp, status, code)
    assert queue.sent == []
    # Nothing half-created either: no job, no stored upload.
    assert client.get("/v1/jobs", headers=tenants["acme"].headers).get_json()["jobs"] == []
    assert s3.list_objects_v2(Bucket=s3_bucket, Prefix="store/")["KeyCount"] == 0


def test_a_redis_failure_midway_leaves_no_stranded_job(client, tenants, queue, monkeypatch):
    """Jobs stored before the failure are queued with their messages; the rest never exist."""
    acme = tenants["acme"]
    fail_queue_writes(monkeypatch, after=1)
    inputs = [f"s3://inputs-bucket/{i}.jpg" for i in range(3)]
    assert_error(client.post("/v1/batches", json={"inputs": inputs}, headers=acme.headers), 503)
    jobs = client.get("/v1/jobs", headers=acme.headers).get_json()["jobs"]
    assert [job["input"] for job in jobs] == inputs[:1]
    assert jobs[0]["status"] == "queued" and queue.job_ids() == [jobs[0]["id"]]
