"""Operations endpoints and the API's description: healthz, readyz, metrics, /openapi.json, /docs."""

from __future__ import annotations

import socket

import pytest
import redis
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families

from api import create_app
from storage.queue import PARSE_QUEUE, PARSE_TASK, WEBHOOK_QUEUE, make_celery
from tests.fixtures.api import (
    assert_error,
)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_healthz(client):
    resp = client.get("/healthz")
    assert resp.status_code == 200 and resp.get_json() == {"status": "ok"}


def test_healthz_does_no_io(settings):
    """Alive even when every dependency is gone."""
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{closed_port()}/0"})
    assert create_app(down).test_client().get("/healthz").status_code == 200


def test_readyz_ok(client):
    resp = client.get("/readyz")
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "ok", "checks": {"redis": "ok", "storage": "ok"}}


def test_readyz_redis_down(settings):
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{closed_port()}/0"})
    resp = create_app(down).test_client().get("/readyz")
    body = assert_error(resp, 503, "unavailable")
    assert "redis" in body["error"]["message"]
    assert body["checks"]["storage"] == "ok" and body["checks"]["redis"].startswith("unreachable")


def test_readyz_storage_down(settings, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    resp = create_app(settings).test_client().get("/readyz")
    body = assert_error(resp, 503, "unavailable")
    assert body["checks"]["redis"] == "ok" and body["checks"]["storage"].startswith("unreachable")
    assert "storage" in body["error"]["message"]


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics(client, tenants, settings, redis_url):
    acme = tenants["acme"]
    job_id = client.post(
        "/v1/jobs", json={"input": "s3://inputs-bucket/a.jpg"}, headers=acme.headers
    ).get_json()["id"]
    client.post(f"/v1/jobs/{job_id}/cancel", headers=acme.headers)
    client.post("/v1/jobs", json={"input": "s3://inputs-bucket/b.jpg"}, headers=acme.headers)
    client.get("/v1/jobs/nope", headers=acme.headers)
    # Real messages in the real broker, as kombu stores them: the depth gauge must see them, with
    # the two the API queued above (a canceled job's message waits until a worker drops it).
    producer = make_celery(redis_url)
    for _ in range(3):
        producer.send_task(PARSE_TASK, args=["x"], queue=PARSE_QUEUE)
    producer.send_task("faceparse.deliver_webhook", args=["y"], queue=WEBHOOK_QUEUE)

    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.mimetype == "text/plain"
    samples = metric_samples(resp.get_data(as_text=True))
    assert samples[("faceparse_redis_up", ())] == 1
    assert samples[("faceparse_jobs", (("status", "queued"),))] == 1
    assert samples[("faceparse_jobs", (("status", "canceled"),))] == 1
    assert samples[("faceparse_jobs", (("status", "succeeded"),))] == 0
    assert samples[("faceparse_queue_depth", (("queue", PARSE_QUEUE),))] == 2 + 3
    assert samples[("faceparse_queue_depth", (("queue", WEBHOOK_QUEUE),))] == 1
    assert redis.Redis.from_url(redis_url).llen(PARSE_QUEUE) == 2 + 3  # what the gauge claims to read
    created = (
        "faceparse_http_requests_total",
        (("endpoint", "/v1/jobs"), ("method", "POST"), ("status", "202")),
    )
    assert samples[created] == 2
    missing = (
        "faceparse_http_requests_total",
        (("endpoint", "/v1/jobs/<job_id>"), ("method", "GET"), ("status", "404")),
    )
    assert samples[missing] == 1
    count = ("faceparse_http_request_duration_seconds_count", (("endpoint", "/v1/jobs"), ("method", "POST")))
    assert samples[count] == 2


def test_metrics_answer_while_redis_is_down(settings):
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{closed_port()}/0"})
    resp = create_app(down).test_client().get("/metrics")
    assert resp.status_code == 200
    assert metric_samples(resp.get_data(as_text=True))[("faceparse_redis_up", ())] == 0


EXPECTED_OPERATIONS = {
    ("/v1/jobs", "post"),
    ("/v1/jobs", "get"),
    ("/v1/jobs/{job_id}", "get"),
    ("/v1/jobs/{job_id}/cancel", "post"),
    ("/v1/batches", "post"),
    ("/v1/batches/{batch_id}", "get"),
    ("/v1/files/{key}", "get"),
    ("/healthz", "get"),
    ("/readyz", "get"),
    ("/metrics", "get"),
}


def test_openapi_is_valid_and_describes_every_endpoint(client):
    resp = client.get("/openapi.json")
    assert resp.status_code == 200
    doc = resp.get_json()
    validate(doc)  # raises on an invalid OpenAPI 3 document
    operations = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert operations == EXPECTED_OPERATIONS

    create = doc["paths"]["/v1/jobs"]["post"]
    content = create["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    schemas = doc["components"]["schemas"]

    def schema(ref: dict) -> dict:
        return schemas[ref["$ref"].rsplit("/", 1)[1]]

    assert schema(content["application/json"]["schema"])["required"] == ["input"]
    assert schema(content["multipart/form-data"]["schema"])["properties"]["image"]["format"] == "binary"
    assert {"200", "202", "401", "413", "415", "422", "503"} <= set(create["responses"])
    assert create["security"] == [{"bearer": []}]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    job_schema = schema(create["responses"]["202"]["content"]["application/json"]["schema"])
    assert {"id", "status", "outputs", "webhook", "error"} <= set(job_schema["properties"])
    listing = doc["paths"]["/v1/jobs"]["get"]
    assert {p["name"] for p in listing["parameters"]} == {"status", "limit", "cursor"}
    error_schema = schema(create["responses"]["422"]["content"]["application/json"]["schema"])
    assert error_schema["required"] == ["error"]
    assert (
        "security" not in doc["paths"]["/healthz"]["get"] or doc["paths"]["/healthz"]["get"]["security"] == []
    )


@pytest.mark.parametrize("path", ["/docs"])
def test_docs_page_renders_the_document(client, path):
    resp = client.get(path, follow_redirects=True)
    assert resp.status_code == 200 and resp.mimetype == "text/html"
    page = resp.get_data(as_text=True)
    assert "swagger" in page.lower() and "openapi.json" in page
