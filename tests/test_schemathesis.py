"""Property-based API testing with schemathesis against the app's own /openapi.json.

Every operation is called with generated valid and invalid requests (bounded: a couple of dozen
examples each, no deadline), authenticated as a real tenant, on a real Redis and the moto S3
server; the Celery producer is the recording fake of tests/fixtures/api.py (no worker runs). Each
answer must not be a 5xx, must use a documented status code and content type, and must match its
schema.

schemathesis' own pytest loader (`schemathesis.pytest.from_fixture`) does not run under pytest 9
(it writes `request.node._nodeid`), so the test loads the schema itself and drives each
operation's hypothesis strategy; the operation list below is checked against the document, so a
new endpoint cannot be skipped silently.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api import create_app
from faceparse.settings import Settings
from tests.fixtures.api import png_bytes

KEY = f"key-fuzz-{uuid.uuid4().hex}"
EXAMPLES = 20  # per operation and generation mode
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
OPERATIONS = [
    "POST /v1/jobs",
    "GET /v1/jobs",
    "GET /v1/jobs/{job_id}",
    "POST /v1/jobs/{job_id}/cancel",
    "POST /v1/batches",
    "GET /v1/batches/{batch_id}",
    "GET /v1/files/{key}",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
]


@pytest.fixture
def app(redis_url: str, s3_bucket: str) -> Flask:
    settings_ = Settings(redis_url=redis_url, storage_url=f"s3://{s3_bucket}/store", api_keys=f"fuzz:{KEY}",
                         max_upload_bytes=64 * 1024)
    return create_app(settings_)


@dataclass
class Known:
    """Real things of the fuzzing tenant, so generated requests also reach the success paths."""

    input: str
    job_id: str
    batch_id: str


@pytest.fixture
def known(app: Flask, s3_bucket: str) -> Known:
    boto3.session.Session().client("s3").put_object(Bucket=s3_bucket, Key="in/face.png", Body=png_bytes())
    client, auth = app.test_client(), {"Authorization": f"Bearer {KEY}"}
    url = f"s3://{s3_bucket}/in/face.png"
    job = client.post("/v1/jobs", json={"input": url}, headers=auth).get_json()["id"]
    batch = client.post("/v1/batches", json={"inputs": [url]}, headers=auth).get_json()["id"]
    return Known(url, job, batch)


def test_every_operation_is_fuzzed(app: Flask) -> None:
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    assert sorted(op.ok().label for op in schema.get_all_operations()) == sorted(OPERATIONS)


def _strategy(operation: Any, mode: str, known: Known) -> Any:
    """`positive`/`negative`: schemathesis' own; `known`: positive, with real ids and a real input."""
    if mode != "known":
        return operation.as_strategy(generation_mode=GenerationMode(mode))
    params = {name: value for name, value in (("job_id", known.job_id), ("batch_id", known.batch_id))
              if "{" + name + "}" in operation.path}
    strategy = operation.as_strategy(path_parameters=params or None)

    def with_real_input(case: Any) -> Any:
        if isinstance(case.body, dict) and case.media_type == "application/json":
            if "input" in case.body or operation.path == "/v1/jobs":
                case.body["input"] = known.input
            if "inputs" in case.body:
                case.body["inputs"] = [known.input]
        return case

    return strategy.map(with_real_input)


MODES = [(label, mode) for label in OPERATIONS for mode in ("positive", "negative", "known")
         # Operations without parameters or a body have nothing to get wrong, or to know.
         if mode == "positive" or not label.endswith(("/healthz", "/readyz", "/metrics"))]


@pytest.mark.slow
@pytest.mark.parametrize("label,mode", MODES, ids=[f"{label}-{mode}" for label, mode in MODES])
def test_operation_conforms_to_its_schema(app: Flask, known: Known, label: str, mode: str) -> None:
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    operation = schema.find_operation_by_label(label)
    assert operation is not None, label
    calls: list[int] = []

    @given(case=_strategy(operation, mode, known))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
              derandomize=True, database=None)
    def run(case: Any) -> None:
        response = case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=CHECKS)
        calls.append(response.status_code)

    run()
    assert calls, "no request was generated"
