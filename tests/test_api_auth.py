"""API keys and tenant isolation: 401 without a valid key, 404 for another tenant's anything."""

from __future__ import annotations

import io

import pytest
from structlog.testing import capture_logs

from api import create_app
from faceparse.settings import Settings
from storage.jobs import ANONYMOUS_TENANT
from tests.fixtures.api import (
    assert_error,
    png_bytes,
)

V1_ENDPOINTS = [
    ("post", "/v1/jobs"),
    ("get", "/v1/jobs"),
    ("get", "/v1/jobs/some-id"),
    ("post", "/v1/jobs/some-id/cancel"),
    ("post", "/v1/batches"),
    ("get", "/v1/batches/some-id"),
    ("get", "/v1/files/jobs/some-id/mask.png"),
]

BAD_AUTH = [
    ("missing", None),
    ("empty-bearer", "Bearer "),
    ("wrong-key", "Bearer not-a-key"),
    ("basic-scheme", "Basic dXNlcjpwYXNz"),
    ("key-without-scheme", "{key}"),
    ("key-prefix", "Bearer {key_prefix}"),
]


@pytest.mark.parametrize("case,header", BAD_AUTH, ids=[c[0] for c in BAD_AUTH])
def test_every_v1_endpoint_needs_a_valid_key(client, tenants, queue, case, header):
    key = tenants["acme"].key
    headers = {} if header is None else {"Authorization": header.format(key=key, key_prefix=key[:-1])}
    for method, path in V1_ENDPOINTS:
        resp = getattr(client, method)(path, headers=headers, json={"input": "s3://inputs-bucket/a.jpg"})
        assert_error(resp, 401, "unauthorized")
    assert queue.sent == []


def test_bearer_scheme_is_case_insensitive(client, tenants):
    resp = client.get("/v1/jobs", headers={"Authorization": f"bearer {tenants['acme'].key}"})
    assert resp.status_code == 200


def test_keys_are_never_logged(app, tenants):
    client = app.test_client()
    with capture_logs() as logs:
        client.get("/v1/jobs", headers={"Authorization": "Bearer wrong-secret-value"})
        client.post("/v1/jobs", json={"input": "s3://inputs-bucket/a.jpg"}, headers=tenants["acme"].headers)
    text = repr(logs)
    assert "wrong-secret-value" not in text and tenants["acme"].key not in text


@pytest.fixture(name="acme_job")
def acme_job_fixture(client, tenants):
    """A queued job of acme's."""
    resp = client.post(
        "/v1/jobs", json={"input": "s3://inputs-bucket/a.jpg"}, headers=tenants["acme"].headers
    )
    return resp.get_json()


def test_other_tenants_see_nothing(client, tenants, acme_job, queue):
    globex = tenants["globex"].headers
    job_id = acme_job["id"]
    assert_error(client.get(f"/v1/jobs/{job_id}", headers=globex), 404, "not_found")
    assert_error(client.post(f"/v1/jobs/{job_id}/cancel", headers=globex), 404, "not_found")
    assert client.get("/v1/jobs", headers=globex).get_json() == {"jobs": [], "next_cursor": None}
    # Still queued: globex's cancel changed nothing.
    assert client.get(f"/v1/jobs/{job_id}", headers=tenants["acme"].headers).get_json()["status"] == "queued"

    batch = client.post(
        "/v1/batches", json={"inputs": ["s3://inputs-bucket/b.jpg"]}, headers=tenants["acme"].headers
    ).get_json()
    assert_error(client.get(f"/v1/batches/{batch['id']}", headers=globex), 404, "not_found")
    assert client.get(f"/v1/batches/{batch['id']}", headers=tenants["acme"].headers).status_code == 200


def test_other_tenants_files_are_404(redis_url, tenants, tmp_path):
    # Local storage: the case /v1/files serves.
    settings = create_settings(redis_url, tenants, f"file://{tmp_path}/data")
    client = create_app(settings).test_client()
    job = client.post(
        "/v1/jobs", data={"image": (io.BytesIO(png_bytes()), "f.png")}, headers=tenants["acme"].headers
    ).get_json()
    key = f"uploads/{job['id']}/f.png"
    assert client.get(f"/v1/files/{key}", headers=tenants["acme"].headers).status_code == 200
    assert_error(client.get(f"/v1/files/{key}", headers=tenants["globex"].headers), 404, "not_found")


def create_settings(redis_url, tenants, storage_url, api_keys=None):
    keys = ",".join(f"{t.name}:{t.key}" for t in tenants.values()) if api_keys is None else api_keys
    return Settings(redis_url=redis_url, storage_url=storage_url, api_keys=keys)


def test_auth_off_warns_once_and_serves_anonymous(redis_url, tenants, s3_bucket):
    settings = create_settings(redis_url, tenants, f"s3://{s3_bucket}", api_keys="")
    with capture_logs() as logs:
        app = create_app(settings)
        client = app.test_client()
        job = client.post("/v1/jobs", json={"input": "s3://inputs-bucket/a.jpg"}).get_json()
        client.get("/v1/jobs")
    warnings = [entry for entry in logs if "AUTH IS OFF" in entry["event"]]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
    assert app.extensions["faceparse"].job_store.get(job["id"]).tenant == ANONYMOUS_TENANT
    # Any Authorization header is ignored while auth is off.
    assert client.get(f"/v1/jobs/{job['id']}", headers={"Authorization": "Bearer x"}).status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.json"])
def test_ops_endpoints_need_no_key(client, path):
    assert client.get(path).status_code == 200
