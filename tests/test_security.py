"""Security: API keys (constant-time, never logged), tenant isolation on every endpoint, unguessable ids,
per-tenant rate limits in Redis, and the input bucket allow-list at the API and in the worker.

Body and pixel limits (413) and the SSRF guard on inputs and webhooks are cases of
tests/test_bad_inputs.py; the in-process auth checks of tests/test_api_auth.py are not repeated.
"""

from __future__ import annotations

import io
import math
import string
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

import api.auth
from api import create_app
from api.auth import ApiKeys
from api.ratelimit import RateLimiter
from faceparse.settings import Settings
from storage import keys
from storage.errors import RateLimited, Unauthorized
from storage.jobs import Job, new_id
from storage.jobstore import JobStore
from storage.queue import PARSE_QUEUE, PARSE_TASK, make_celery
from tests.fixtures.api import assert_error, png_bytes
from tests.fixtures.faults import IsolatedStack
from tests.fixtures.stack import ManagedProcess, Stack, start_api, wait_until

GUARDED_RATE_LIMIT = 5


# --- API keys -------------------------------------------------------------------------------------
def test_every_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """hmac.compare_digest against every configured key, whichever matches (or none): no early exit."""
    calls: list[tuple[bytes, bytes]] = []
    real = api.auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(api.auth.hmac, "compare_digest", counting)
    tenant_keys = {f"key-{i}-{uuid.uuid4().hex}": f"tenant-{i}" for i in range(5)}
    checker = ApiKeys(tenant_keys)
    for key, tenant in [*tenant_keys.items()][::2]:
        calls.clear()
        assert checker.tenant_for(f"Bearer {key}") == tenant
        assert len(calls) == len(tenant_keys) and {b for _, b in calls} == {k.encode() for k in tenant_keys}
    calls.clear()
    with pytest.raises(Unauthorized):
        checker.tenant_for("Bearer " + next(iter(tenant_keys))[:-1])
    assert len(calls) == len(tenant_keys)


@dataclass
class GuardedApi:
    """A gunicorn API (2 processes) with its own keys and a small rate limit, on the stack's Redis."""

    url: str
    proc: ManagedProcess
    keys: dict[str, str]  # tenant -> key

    def auth(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}"}


@pytest.fixture(scope="module")
def guarded_api(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuardedApi]:
    tenant_keys = {t: f"sk-{t}-{uuid.uuid4().hex}" for t in ("logged", "limited", "other")}
    env = {**stack.env, "FACEPARSE_API_KEYS": ",".join(f"{t}:{k}" for t, k in tenant_keys.items()),
           "FACEPARSE_RATE_LIMIT_PER_MINUTE": str(GUARDED_RATE_LIMIT)}
    proc, url = start_api(env, tmp_path_factory.mktemp("guarded-api"), workers=2)
    try:
        yield GuardedApi(url, proc, tenant_keys)
    finally:
        proc.stop()


def test_keys_never_appear_in_the_api_logs(guarded_api: GuardedApi, stack: Stack) -> None:
    api_url, good = guarded_api.url, guarded_api.keys["logged"]
    wrong = f"sk-wrong-{uuid.uuid4().hex}"
    key = f"in/{uuid.uuid4().hex}.png"
    stack.s3().put_object(Bucket=stack.bucket, Key=key, Body=png_bytes())
    def call(method: str, path: str, authorization: str, headers: dict[str, str] | None = None,
             **kwargs: Any) -> int:
        headers = {"Authorization": authorization, **(headers or {})}
        return requests.request(method, api_url + path, headers=headers, timeout=30, **kwargs).status_code

    answers = [
        call("post", "/v1/jobs", f"Bearer {good}", json={"input": f"s3://{stack.bucket}/{key}"}),
        call("get", "/v1/jobs", f"Bearer {good}"),
        call("get", "/v1/jobs", f"Bearer {wrong}"),
        call("get", "/v1/jobs", wrong),
        call("get", "/v1/jobs/x", f"Basic {wrong}"),
        call("post", "/v1/jobs", f"Bearer {good}", data=b"{", headers={"Content-Type": "application/json"}),
    ]
    assert answers == [202, 200, 401, 401, 401, 400]
    # The access log lines for these requests are written before the answers return.
    def logged() -> str | None:
        text = guarded_api.proc.log()
        return text if text.count('"gunicorn.access"') >= len(answers) else None

    log = wait_until(logged, timeout=10, what="the access log")
    assert good not in log and wrong not in log
    assert good[3:20] not in log and wrong[3:20] not in log, "not even a fragment of a key"


# --- tenant isolation -----------------------------------------------------------------------------
ENDPOINTS = [
    ("get-job", "get", "/v1/jobs/{job}"),
    ("cancel-job", "post", "/v1/jobs/{job}/cancel"),
    ("get-batch", "get", "/v1/batches/{batch}"),
    ("get-upload", "get", "/v1/files/uploads/{job}/face.png"),
    ("get-output", "get", "/v1/files/jobs/{job}/mask.png"),
]


@dataclass
class TwoTenants:
    client: object
    headers: dict[str, dict[str, str]]
    job: str
    batch: str
    store: JobStore


@pytest.fixture
def two_tenants(redis_url: str, tmp_path) -> TwoTenants:
    """acme's job (an upload, with an output file) and batch, on local storage so /v1/files serves."""
    keys_ = {"acme": f"k-acme-{uuid.uuid4().hex}", "globex": f"k-globex-{uuid.uuid4().hex}"}
    settings = Settings(redis_url=redis_url, storage_url=f"file://{tmp_path}/data",
                        api_keys=",".join(f"{t}:{k}" for t, k in keys_.items()))
    app = create_app(settings)
    client = app.test_client()
    headers = {t: {"Authorization": f"Bearer {k}"} for t, k in keys_.items()}
    job = client.post("/v1/jobs", data={"image": (io.BytesIO(png_bytes()), "face.png")},
                      headers=headers["acme"]).get_json()["id"]
    out = tmp_path / "data" / "jobs" / job / "mask.png"
    out.parent.mkdir(parents=True)
    out.write_bytes(png_bytes())
    batch = client.post("/v1/batches", json={"inputs": ["s3://inputs-bucket/a.png"]},
                        headers=headers["acme"]).get_json()["id"]
    return TwoTenants(client, headers, job, batch, app.extensions["faceparse"].job_store)


@pytest.mark.parametrize("name,method,path", ENDPOINTS, ids=[e[0] for e in ENDPOINTS])
def test_another_tenant_gets_404_on_every_endpoint(two_tenants: TwoTenants, name: str, method: str,
                                                   path: str) -> None:
    url = path.format(job=two_tenants.job, batch=two_tenants.batch)
    client = two_tenants.client
    assert_error(getattr(client, method)(url, headers=two_tenants.headers["globex"]), 404, "not_found")
    # Nothing changed for the owner, who still sees it.
    assert two_tenants.store.get(two_tenants.job).status.value == "queued"
    assert getattr(client, method)(url, headers=two_tenants.headers["acme"]).status_code == 200


def test_lists_and_idempotency_keys_are_per_tenant(two_tenants: TwoTenants) -> None:
    client, headers = two_tenants.client, two_tenants.headers
    assert client.get("/v1/jobs", headers=headers["globex"]).get_json() == {"jobs": [], "next_cursor": None}
    assert {j["id"] for j in client.get("/v1/jobs", headers=headers["acme"]).get_json()["jobs"]} >= {
        two_tenants.job}
    same_key = {"Idempotency-Key": "order-1"}
    body = {"input": "s3://inputs-bucket/a.png"}
    a = client.post("/v1/jobs", json=body, headers={**headers["acme"], **same_key})
    g = client.post("/v1/jobs", json=body, headers={**headers["globex"], **same_key})
    assert a.status_code == g.status_code == 202 and a.get_json()["id"] != g.get_json()["id"]


# --- ids ------------------------------------------------------------------------------------------
ID_ALPHABET = set(string.ascii_lowercase + "234567")  # base32, lowercase


def test_job_ids_have_room_for_128_bits_and_do_not_repeat() -> None:
    ids = [new_id() for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    assert all(set(i) <= ID_ALPHABET for i in ids)  # URL-safe without escaping
    length = min(len(i) for i in ids)
    assert length * math.log2(len(ID_ALPHABET)) >= 128, length
    # Every position varies (no constant prefix or counter eating the entropy); the last of 26
    # base32 characters holds only 3 bits, so it takes 8 values.
    assert all(len({i[p] for i in ids}) >= 8 for p in range(length))
    assert all(len({i[p] for i in ids}) == 32 for p in range(length - 1))


def test_job_ids_keep_every_random_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    import storage.jobs

    draws = iter([b"\xff" * 16, b"\xff" * 15 + b"\xfe"])  # two 128-bit draws one bit apart
    monkeypatch.setattr(storage.jobs.secrets, "token_bytes", lambda _n: next(draws))
    assert new_id() != new_id()


# --- rate limits ----------------------------------------------------------------------------------
@pytest.fixture
def limited_app(redis_url: str, s3_bucket: str):
    """An app whose tenants may POST 3 times a minute."""
    keys_ = {"acme": f"k-acme-{uuid.uuid4().hex}", "globex": f"k-globex-{uuid.uuid4().hex}"}
    settings = Settings(redis_url=redis_url, storage_url=f"s3://{s3_bucket}",
                        api_keys=",".join(f"{t}:{k}" for t, k in keys_.items()), rate_limit_per_minute=3)
    app = create_app(settings)
    return app, {t: {"Authorization": f"Bearer {k}"} for t, k in keys_.items()}


def test_rate_limit_answers_429_with_retry_after_per_tenant(limited_app) -> None:
    app, headers = limited_app
    client = app.test_client()
    body = {"input": "s3://inputs-bucket/a.png"}
    accepted = [client.post("/v1/jobs", json=body, headers=headers["acme"]).status_code for _ in range(3)]
    assert accepted == [202] * 3
    refused = client.post("/v1/jobs", json=body, headers=headers["acme"])
    assert_error(refused, 429, "rate_limited")
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    # Every POST counts (cancel, batches), GETs do not, and other tenants have their own budget.
    assert_error(client.post("/v1/batches", json={"inputs": ["s3://b/k.png"]}, headers=headers["acme"]), 429)
    assert_error(client.post("/v1/jobs/x/cancel", headers=headers["acme"]), 429)
    assert client.get("/v1/jobs", headers=headers["acme"]).status_code == 200
    assert client.post("/v1/jobs", json=body, headers=headers["globex"]).status_code == 202
    # Unauthenticated requests are refused before they could spend anyone's budget.
    assert_error(client.post("/v1/jobs", json=body), 401)


def test_rate_limit_window_rolls_over_and_counters_expire(redis_url: str) -> None:
    store = JobStore.from_url(redis_url)
    now = [119.5]
    limiter = RateLimiter(store.redis, 2, clock=lambda: now[0])
    tenant = f"t-{uuid.uuid4().hex}"
    assert [limiter.hit(tenant), limiter.hit(tenant)] == [1, 2]
    with pytest.raises(RateLimited) as refused:
        limiter.hit(tenant)
    assert refused.value.retry_after == 1  # half a second left in the window, rounded up
    assert 0 < store.redis.ttl(keys.rate_limit_key(tenant, 1)) <= 65  # never a counter without expiry
    now[0] = 120.0  # the next window
    assert limiter.hit(tenant) == 1


def test_rate_limit_is_atomic_under_concurrency(redis_url: str) -> None:
    store = JobStore.from_url(redis_url, 60)
    limiter = RateLimiter(store.redis, 10)
    tenant = f"t-{uuid.uuid4().hex}"
    outcomes: list[bool] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            limiter.hit(tenant)
            ok = True
        except RateLimited:
            ok = False
        with lock:
            outcomes.append(ok)

    threads = [threading.Thread(target=one) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count(True) == 10 and outcomes.count(False) == 30


def test_rate_limit_zero_disables_it(redis_url: str, s3_bucket: str) -> None:
    settings = Settings(redis_url=redis_url, storage_url=f"s3://{s3_bucket}", rate_limit_per_minute=0)
    client = create_app(settings).test_client()
    body = {"input": "s3://inputs-bucket/a.png"}
    assert {client.post("/v1/jobs", json=body).status_code for _ in range(12)} == {202}


def test_rate_limit_is_shared_by_every_api_process(limited_app) -> None:
    """Two apps (two API processes' worth of state) on one Redis spend one budget."""
    app, headers = limited_app
    other = create_app(app.extensions["faceparse"].settings)
    clients = [app.test_client(), other.test_client()]
    body = {"input": "s3://inputs-bucket/a.png"}
    answers = [clients[i % 2].post("/v1/jobs", json=body, headers=headers["acme"]) for i in range(6)]
    assert [r.status_code for r in answers] == [202, 202, 202, 429, 429, 429]


def test_rate_limit_over_http(guarded_api: GuardedApi) -> None:
    """Through gunicorn (2 worker processes): exactly the limit is admitted, then 429 with Retry-After."""
    auth = guarded_api.auth("limited")
    answers = [requests.post(f"{guarded_api.url}/v1/jobs", json={"input": "s3://faceparse-stack/in/nope.png"},
                             headers=auth, timeout=30) for _ in range(GUARDED_RATE_LIMIT + 4)]
    assert [r.status_code for r in answers] == [202] * GUARDED_RATE_LIMIT + [429] * 4
    assert all(r.headers["Retry-After"].isdigit() for r in answers[GUARDED_RATE_LIMIT:])
    assert {r.json()["error"]["code"] for r in answers[GUARDED_RATE_LIMIT:]} == {"rate_limited"}


# --- input buckets --------------------------------------------------------------------------------
@pytest.fixture
def other_bucket(isolated_stack: IsolatedStack) -> Iterator[str]:
    """A bucket outside the isolated stack's FACEPARSE_INPUT_BUCKETS, holding one real image."""
    name = f"fp-other-{uuid.uuid4().hex[:12]}"
    s3 = isolated_stack.s3()
    s3.create_bucket(Bucket=name)
    s3.put_object(Bucket=name, Key="face.png", Body=png_bytes((24, 24)))
    yield name
    s3.delete_object(Bucket=name, Key="face.png")
    s3.delete_bucket(Bucket=name)


def test_api_refuses_inputs_outside_the_allowed_buckets(isolated_stack: IsolatedStack,
                                                        other_bucket: str) -> None:
    api_url, auth = isolated_stack.api_url, {"Authorization": "Bearer key-alice"}
    for path, body in (
        ("/v1/jobs", {"input": f"s3://{other_bucket}/face.png"}),
        ("/v1/batches", {"inputs": [f"s3://{other_bucket}/face.png"]}),
        ("/v1/batches", {"prefix": f"s3://{other_bucket}/"}),
        ("/v1/jobs", {"input": isolated_stack.put_input(png_bytes()), "output_prefix": f"s3://{other_bucket}/o/"}),
    ):
        resp = requests.post(api_url + path, json=body, headers=auth, timeout=30)
        assert (resp.status_code, resp.json()["error"]["code"]) == (422, "input_forbidden"), (path, resp.text)
    # Its own bucket is fine.
    ok = requests.post(api_url + "/v1/jobs", json={"input": isolated_stack.put_input(png_bytes())},
                       headers=auth, timeout=30)
    assert ok.status_code == 202, ok.text


@pytest.mark.parametrize("where", ["other-bucket", "loopback-https"])
def test_worker_refuses_what_the_api_would_have(isolated_stack: IsolatedStack, other_bucket: str,
                                                where: str) -> None:
    """A job record that never passed the API (an older record, another producer) is still refused."""
    url = f"s3://{other_bucket}/face.png" if where == "other-bucket" else "https://127.0.0.1:9/face.png"
    store = isolated_stack.jobs
    job = Job(input=url, tenant="alice")
    store.create(job)
    producer = make_celery(isolated_stack.redis.url)
    try:
        producer.send_task(PARSE_TASK, args=[job.id], queue=PARSE_QUEUE)
    finally:
        producer.close()
    done = wait_until(lambda: (j := store.get(job.id)) is not None and j.status.is_terminal() and j,
                      timeout=60, what="the worker to finish the job")
    assert done.status.value == "failed" and done.error.code == "input_forbidden", done
    assert done.attempts == 1 and done.outputs == {}
