"""JobStore against a real redis-server: records, tenants, cursors, idempotency, atomic transitions."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from storage import keys
from storage.errors import InvalidInput, NotFound, Unavailable
from storage.jobs import Job, JobStatus, WebhookDelivery, WebhookInfo, utcnow
from storage.jobstore import JobStore
from tests.fixtures.services import free_port


def make_job(tenant: str = "acme", **fields: object) -> Job:
    return Job(input="s3://in/face.jpg", tenant=tenant, **fields)


def run_concurrently(n: int, fn: Callable[[int], object]) -> list[object]:
    """Run fn(0..n-1) on n threads released together by a barrier."""
    barrier = threading.Barrier(n)

    def call(i: int) -> object:
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(call, range(n)))


def test_create_and_get_roundtrip(job_store: JobStore) -> None:
    job = make_job(webhook=WebhookInfo(url="https://hooks.example/x"))
    stored, created = job_store.create(job)
    assert created and stored == job
    assert job_store.get(job.id) == job
    assert job_store.get("missing") is None
    raw = job_store.redis.get(keys.job_key(job.id))
    assert json.loads(raw)["tenant"] == "acme"
    assert 0 < job_store.redis.ttl(keys.job_key(job.id)) <= job_store.ttl_seconds
    assert job_store.redis.zscore(keys.tenant_jobs_key("acme"), job.id) is not None


def test_get_for_tenant_hides_other_tenants(job_store: JobStore) -> None:
    job, _ = job_store.create(make_job("acme"))
    assert job_store.get_for_tenant(job.id, "acme").id == job.id
    with pytest.raises(NotFound):
        job_store.get_for_tenant(job.id, "globex")
    with pytest.raises(NotFound):
        job_store.get_for_tenant("nope", "acme")


def test_idempotency_key_returns_the_same_job_per_tenant(job_store: JobStore) -> None:
    first, created = job_store.create(make_job("acme"), idempotency_key="order-1")
    assert created
    again, created = job_store.create(make_job("acme"), idempotency_key="order-1")
    assert not created and again.id == first.id
    other, created = job_store.create(make_job("globex"), idempotency_key="order-1")
    assert created and other.id != first.id
    fresh, created = job_store.create(make_job("acme"), idempotency_key="order-2")
    assert created and fresh.id != first.id
    assert len(job_store.list("acme")[0]) == 2  # the duplicate was never stored


def test_idempotency_key_race_creates_exactly_one_job(job_store: JobStore) -> None:
    results = run_concurrently(8, lambda i: job_store.create(make_job("acme"), idempotency_key="k"))
    created = [job for job, was_created in results if was_created]
    assert len(created) == 1
    assert {job.id for job, _ in results} == {created[0].id}
    assert job_store.counts_by_status()["queued"] == 1


def test_idempotency_key_whose_job_expired_is_reused(job_store: JobStore) -> None:
    first, _ = job_store.create(make_job("acme"), idempotency_key="k")
    job_store.redis.delete(keys.job_key(first.id))  # as if the record expired first
    second, created = job_store.create(make_job("acme"), idempotency_key="k")
    assert created and second.id != first.id


def test_list_newest_first_with_cursor(job_store: JobStore) -> None:
    ids = []
    for _ in range(7):
        ids.append(job_store.create(make_job("acme"))[0].id)
        time.sleep(0.002)  # distinct creation milliseconds
    job_store.create(make_job("globex"))
    page, cursor = job_store.list("acme", limit=3)
    assert [j.id for j in page] == ids[::-1][:3]
    assert cursor is not None
    # A job created between pages shows up on a fresh first page, never inside the walk.
    job_store.create(make_job("acme"))
    page2, cursor = job_store.list("acme", limit=3, cursor=cursor)
    assert [j.id for j in page2] == ids[::-1][3:6]
    page3, cursor = job_store.list("acme", limit=3, cursor=cursor)
    assert [j.id for j in page3] == ids[::-1][6:]
    assert cursor is None


def test_list_exact_last_page_has_no_cursor(job_store: JobStore) -> None:
    for _ in range(4):
        job_store.create(make_job("acme"))
    page, cursor = job_store.list("acme", limit=4)
    assert len(page) == 4 and cursor is None
    assert job_store.list("nobody") == ([], None)


def test_list_same_millisecond_jobs_are_neither_lost_nor_repeated(job_store: JobStore) -> None:
    created_at = utcnow()
    ids = {job_store.create(make_job("acme", created_at=created_at))[0].id for _ in range(25)}
    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = job_store.list("acme", limit=4, cursor=cursor)
        seen += [j.id for j in page]
        if cursor is None:
            break
    assert len(seen) == 25 and set(seen) == ids


def test_list_filters_by_status_across_pages(job_store: JobStore) -> None:
    ids = [job_store.create(make_job("acme"))[0].id for _ in range(30)]
    done = set(ids[::3])
    for job_id in done:
        job_store.transition(job_id, JobStatus.SUCCEEDED)
    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = job_store.list("acme", status=JobStatus.SUCCEEDED, limit=4, cursor=cursor)
        assert all(j.status == JobStatus.SUCCEEDED for j in page)
        seen += [j.id for j in page]
        if cursor is None:
            break
    assert set(seen) == done and len(seen) == len(done)
    queued, _ = job_store.list("acme", status=JobStatus.QUEUED, limit=100)
    assert len(queued) == 20


@pytest.mark.parametrize("cursor", ["garbage!", "", "bm9jb2xvbg", "MTIz"])
def test_list_rejects_bad_cursors(job_store: JobStore, cursor: str) -> None:
    job_store.create(make_job("acme"))
    if cursor == "":
        assert len(job_store.list("acme", cursor=cursor)[0]) == 1  # empty means "from the start"
        return
    with pytest.raises(InvalidInput) as info:
        job_store.list("acme", cursor=cursor)
    assert info.value.code == "invalid_cursor"


def test_expired_jobs_vanish_from_get_list_and_counts(redis_url: str) -> None:
    store = JobStore.from_url(redis_url, ttl_seconds=1)
    job, _ = store.create(make_job("acme"))
    store.create(make_job("acme"), idempotency_key="k")
    assert store.counts_by_status()["queued"] == 2
    time.sleep(1.2)
    assert store.get(job.id) is None
    assert store.list("acme") == ([], None)
    assert store.redis.zcard(keys.tenant_jobs_key("acme")) == 0  # trimmed lazily
    assert store.counts_by_status()["queued"] == 0
    _, created = store.create(make_job("acme"), idempotency_key="k")
    assert created


def test_list_skips_and_trims_missing_records(job_store: JobStore) -> None:
    ids = [job_store.create(make_job("acme"))[0].id for _ in range(5)]
    job_store.redis.delete(keys.job_key(ids[2]))
    page, _ = job_store.list("acme", limit=10)
    assert ids[2] not in [j.id for j in page] and len(page) == 4
    assert job_store.redis.zscore(keys.tenant_jobs_key("acme"), ids[2]) is None


def test_claim_counts_attempts_and_keeps_first_start(job_store: JobStore) -> None:
    job, _ = job_store.create(make_job())
    first = job_store.claim(job.id)
    assert first is not None and first.status == JobStatus.PROCESSING and first.attempts == 1
    assert first.started_at is not None
    second = job_store.claim(job.id)  # a redelivered message after a lost worker
    assert second is not None and second.attempts == 2 and second.started_at == first.started_at
    assert job_store.claim("missing") is None


def test_transition_to_terminal_sets_fields_and_is_final(job_store: JobStore) -> None:
    job, _ = job_store.create(make_job())
    job_store.claim(job.id)
    done = job_store.transition(
        job.id,
        JobStatus.SUCCEEDED,
        summary={"image": {"width": 4, "height": 4}, "labels": []},
        outputs={"mask": {"url": None, "key": "s3://b/jobs/x/mask.png"}},
        metrics={"total_ms": 12.5},
    )
    assert done is not None and done.status == JobStatus.SUCCEEDED and done.completed_at is not None
    assert job_store.get(job.id) == done
    # Nothing leaves a terminal state: not a late failure, a cancel, a retry or a claim.
    assert job_store.transition(job.id, JobStatus.FAILED, error={"code": "x", "message": "y"}) is None
    assert job_store.transition(job.id, JobStatus.CANCELED) is None
    assert job_store.transition(job.id, JobStatus.QUEUED) is None
    assert job_store.claim(job.id) is None
    assert job_store.get(job.id) == done
    assert job_store.transition("missing", JobStatus.FAILED) is None


def test_transition_keeps_the_ttl(job_store: JobStore) -> None:
    job, _ = job_store.create(make_job())
    job_store.redis.expire(keys.job_key(job.id), 500)
    job_store.transition(job.id, JobStatus.FAILED, error={"code": "invalid_image", "message": "bad"})
    assert 0 < job_store.redis.ttl(keys.job_key(job.id)) <= 500


def test_racing_terminal_transitions_have_exactly_one_winner(job_store: JobStore) -> None:
    for _ in range(5):
        job, _ = job_store.create(make_job())
        targets = [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED] * 3
        results = run_concurrently(len(targets), lambda i, t=targets, j=job: job_store.transition(j.id, t[i]))
        winners = [r for r in results if r is not None]
        assert len(winners) == 1
        assert job_store.get(job.id).status == winners[0].status
    counts = job_store.counts_by_status()
    assert sum(counts.values()) == 5 and counts["queued"] == 0 and counts["processing"] == 0


def test_concurrent_updates_lose_nothing(job_store: JobStore) -> None:
    job, _ = job_store.create(make_job(webhook=WebhookInfo(url="https://hooks.example/x")))

    def deliver(i: int) -> object:
        return job_store.append_delivery(job.id, WebhookDelivery(event="completed", attempt=i, at=utcnow()))

    run_concurrently(12, deliver)
    attempts = sorted(d.attempt for d in job_store.get(job.id).webhook.deliveries)
    assert attempts == list(range(12))


def test_update_sets_fields_even_on_terminal_jobs(job_store: JobStore) -> None:
    job, _ = job_store.create(make_job())
    job_store.transition(job.id, JobStatus.CANCELED)
    updated = job_store.update(job.id, metrics={"webhook_ms": 3.0})
    assert updated is not None and updated.metrics == {"webhook_ms": 3.0}
    assert updated.status == JobStatus.CANCELED
    assert job_store.update("missing", metrics={}) is None


@pytest.mark.parametrize(
    ("call", "fields"),
    [
        ("update", {"status": JobStatus.FAILED}),
        ("update", {"id": "other"}),
        ("update", {"tenant": "globex"}),
        ("update", {"no_such_field": 1}),
        ("transition", {"status": JobStatus.FAILED}),
        ("transition", {"bogus": 1}),
    ],
)
def test_bad_fields_are_refused(job_store: JobStore, call: str, fields: dict) -> None:
    job, _ = job_store.create(make_job())
    with pytest.raises(TypeError):
        if call == "update":
            job_store.update(job.id, **fields)
        else:
            job_store.transition(job.id, JobStatus.PROCESSING, **fields)
    assert job_store.get(job.id) == job


def test_append_delivery_without_webhook_leaves_job_unchanged(job_store: JobStore) -> None:
    job, _ = job_store.create(make_job())
    after = job_store.append_delivery(job.id, WebhookDelivery(event="completed", attempt=1, at=utcnow()))
    assert after == job
    delivery = WebhookDelivery(event="start", attempt=1, at=utcnow())
    assert job_store.append_delivery("missing", delivery) is None


def test_batches_count_their_jobs_by_status(job_store: JobStore) -> None:
    ids = [job_store.create(make_job("acme"))[0].id for _ in range(4)]
    batch_id = job_store.create_batch("acme", ids)
    job_store.transition(ids[0], JobStatus.SUCCEEDED)
    job_store.claim(ids[1])
    batch = job_store.get_batch(batch_id, "acme")
    assert batch["id"] == batch_id and batch["job_ids"] == ids and batch["total"] == 4
    assert batch["counts"] == {"queued": 2, "processing": 1, "succeeded": 1, "failed": 0, "canceled": 0}
    assert batch["created_at"].endswith("Z")
    with pytest.raises(NotFound):
        job_store.get_batch(batch_id, "globex")
    with pytest.raises(NotFound):
        job_store.get_batch("missing", "acme")
    chosen = job_store.create_batch("acme", ids[:1], batch_id="b-chosen")
    assert chosen == "b-chosen" and job_store.get_batch("b-chosen", "acme")["total"] == 1
    with pytest.raises(ValueError):
        job_store.create_batch("acme", ids, batch_id="b-chosen")


def test_counts_by_status_follow_transitions(job_store: JobStore) -> None:
    ids = [job_store.create(make_job())[0].id for _ in range(6)]
    job_store.claim(ids[0])
    job_store.claim(ids[1])
    job_store.transition(ids[1], JobStatus.SUCCEEDED)
    job_store.transition(ids[2], JobStatus.FAILED)
    job_store.transition(ids[3], JobStatus.CANCELED)
    job_store.transition(ids[3], JobStatus.SUCCEEDED)  # refused: counts must not move
    assert job_store.counts_by_status() == {
        "queued": 2, "processing": 1, "succeeded": 1, "failed": 1, "canceled": 1,
    }


def test_redis_down_is_unavailable() -> None:
    store = JobStore.from_url(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(Unavailable) as info:
        store.get("x")
    assert info.value.code == "redis_unavailable" and info.value.retryable
    with pytest.raises(Unavailable):
        store.ping()
    with pytest.raises(Unavailable):
        store.create(make_job())
