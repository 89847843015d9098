"""`/v1/files/{key}` with local-directory storage: the tenant's uploads and outputs, nothing else."""

from __future__ import annotations

import io

import pytest

from api import create_app
from faceparse.settings import Settings
from storage.jobs import JobStatus
from tests.fixtures.api import (
    assert_error,
    png_bytes,
)


@pytest.fixture(name="local")
def local_fixture(redis_url, tenants, tmp_path):
    """An app whose storage is a local directory (with a secret file beside it to aim at)."""
    (tmp_path / "secret.txt").write_text("do not serve")
    settings = Settings(
        redis_url=redis_url,
        storage_url=f"file://{tmp_path}/data",
        api_keys=",".join(f"{t.name}:{t.key}" for t in tenants.values()),
        public_url="https://faces.example.com/",
    )
    app = create_app(settings)
    return app.test_client()


@pytest.fixture(name="job")
def job_fixture(local, tenants):
    image = png_bytes((9, 9))
    resp = local.post(
        "/v1/jobs", data={"image": (io.BytesIO(image), "face.png")}, headers=tenants["acme"].headers
    )
    assert resp.status_code == 202, resp.get_json()
    return {**resp.get_json(), "image": image}


def test_upload_is_stored_locally_and_served(local, tenants, job, tmp_path):
    assert job["input"] == f"file://{tmp_path}/data/uploads/{job['id']}/face.png"
    resp = local.get(f"/v1/files/uploads/{job['id']}/face.png", headers=tenants["acme"].headers)
    assert resp.status_code == 200 and resp.data == job["image"] and resp.mimetype == "image/png"


def test_output_urls_point_at_the_files_endpoint(local, tenants, job, tmp_path):
    store = local.application.extensions["faceparse"].job_store
    out = tmp_path / "data" / "jobs" / job["id"]
    (out / "masks").mkdir(parents=True)
    (out / "mask.png").write_bytes(b"mask")
    (out / "masks" / "skin.png").write_bytes(b"skin")
    (out / "summary.json").write_text('{"labels": []}')
    outputs = {
        "mask": {"key": f"file://{out}/mask.png"},
        "summary": {"key": f"file://{out}/summary.json"},
        "masks": {"skin": {"key": f"file://{out}/masks/skin.png"}},
    }
    store.transition(job["id"], JobStatus.SUCCEEDED, outputs=outputs)
    got = local.get(f"/v1/jobs/{job['id']}", headers=tenants["acme"].headers).get_json()
    base = f"https://faces.example.com/v1/files/jobs/{job['id']}"
    assert got["outputs"]["mask"] == {"key": outputs["mask"]["key"], "url": f"{base}/mask.png"}
    assert got["outputs"]["masks"]["skin"]["url"] == f"{base}/masks/skin.png"
    for name, body in (
        ("mask.png", b"mask"),
        ("masks/skin.png", b"skin"),
        ("summary.json", b'{"labels": []}'),
    ):
        resp = local.get(f"/v1/files/jobs/{job['id']}/{name}", headers=tenants["acme"].headers)
        assert resp.status_code == 200 and resp.data == body
    assert (
        local.get(f"/v1/files/jobs/{job['id']}/summary.json", headers=tenants["acme"].headers).mimetype
        == "application/json"
    )


@pytest.mark.parametrize(
    "path",
    [
        "/v1/files/uploads/{id}/../../../secret.txt",
        "/v1/files/uploads/{id}/%2e%2e/%2e%2e/%2e%2e/secret.txt",
        "/v1/files/uploads/{id}/..%2f..%2f..%2fsecret.txt",
        "/v1/files/jobs/{id}/./../../uploads/{id}/face.png",
        "/v1/files/uploads/{id}//etc/passwd",
        "/v1/files/secret.txt",
        "/v1/files/uploads/{id}",
        "/v1/files/elsewhere/{id}/face.png",
        "/v1/files/uploads/{id}/missing.png",
        "/v1/files/uploads/someone-elses-id/face.png",
    ],
)
def test_traversal_and_unknown_keys_are_404(local, tenants, job, path):
    resp = local.get(path.format(id=job["id"]), headers=tenants["acme"].headers)
    assert_error(resp, 404, "not_found")
    assert b"do not serve" not in resp.data


def test_symlink_out_of_the_root_is_refused(local, tenants, job, tmp_path):
    link = tmp_path / "data" / "uploads" / job["id"] / "link.txt"
    link.symlink_to(tmp_path / "secret.txt")
    resp = local.get(f"/v1/files/uploads/{job['id']}/link.txt", headers=tenants["acme"].headers)
    assert_error(resp, 404, "not_found")
    assert b"do not serve" not in resp.data


def test_files_are_404_when_storage_is_s3(client, tenants):
    job = client.post("/v1/jobs", json={"input": "s3://inputs-bucket/a.jpg"}, headers=tenants["acme"].headers)
    resp = client.get(f"/v1/files/jobs/{job.get_json()['id']}/mask.png", headers=tenants["acme"].headers)
    assert_error(resp, 404, "not_found")
