"""Leases on running jobs and the reaper of dead workers' jobs, on a real Redis (no worker processes)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from celery import Celery

from storage import keys
from storage.jobs import Job, JobStatus
from storage.jobstore import WORKER_LOST, ClaimScope, JobStore, claim_scope
from storage.queue import PARSE_QUEUE, PARSE_TASK, make_celery, unacked_parse_messages
from worker.lease import LeaseKeeper, Reaper, _retry_delay_s, lease_owner, retry_marker, taken_marker

LONG_AGO = "2020-01-01T00:00:00.000Z"


@pytest.fixture
def jobs(job_store: JobStore) -> JobStore:
    return job_store


@pytest.fixture
def scope() -> Iterator[ClaimScope]:
    """A claim scope set as a parse task's `task_prerun` sets it, reset afterwards."""
    sc = ClaimScope(owner="host/1/task-a", lease_ms=5_000, takeover=("retry:task-a",), max_attempts=4)
    token = claim_scope.set(sc)
    try:
        yield sc
    finally:
        claim_scope.reset(token)


class Collector:
    """The reaper's collaborators, recorded: re-enqueued ids and announced events."""

    def __init__(self, app: Celery | None = None) -> None:
        self.sent: list[str] = []
        self.events: list[tuple[str, str, str]] = []
        self.app = app  # when given, re-enqueued ids are really sent, as the worker's reaper does

    def requeue(self, job_id: str) -> None:
        self.sent.append(job_id)
        if self.app is not None:
            self.app.send_task(PARSE_TASK, args=[job_id], queue=PARSE_QUEUE)

    def notify(self, job: Job, event: str) -> None:
        self.events.append((job.id, event, job.status.value))


def _reaper(jobs: JobStore, calls: Collector, *, max_lost: int = 3, lease_s: float = 0.3) -> Reaper:
    return Reaper(lambda: jobs, lease_s=lease_s, interval_s=0.5, max_lost=max_lost,
                  requeue=calls.requeue, notify=calls.notify)


def _processing_without_lease(jobs: JobStore, started_at: str = LONG_AGO) -> Job:
    """A job claimed by a worker that is gone: processing, no lease, started long ago."""
    job, _ = jobs.create(Job(input="s3://b/in.png"))
    claimed = jobs.claim(job.id)
    assert claimed is not None and claimed.attempts == 1
    jobs.update(job.id, started_at=started_at)
    return claimed


# --- the lease itself ----------------------------------------------------------------------------
def test_a_lease_is_held_by_one_owner_until_released(jobs: JobStore) -> None:
    assert jobs.acquire_lease("j1", "w1", 5_000) is None
    assert jobs.acquire_lease("j1", "w1", 5_000) is None  # the holder may take it again
    assert jobs.acquire_lease("j1", "w2", 5_000) == "w1"
    assert jobs.release_lease("j1", "w2") is False  # only the holder releases
    assert jobs.lease_owner("j1") == "w1"
    assert jobs.release_lease("j1", "w1") is True
    assert jobs.lease_owner("j1") is None
    assert jobs.acquire_lease("j1", "w2", 5_000) is None


def test_a_lease_expires_unless_renewed_by_its_owner(jobs: JobStore) -> None:
    jobs.acquire_lease("a", "w1", 300)
    jobs.acquire_lease("b", "w1", 300)
    jobs.redis.set(keys.lease_key("c"), "someone-else", px=5_000)
    time.sleep(0.2)
    assert jobs.renew_leases({"a": "w1", "c": "w1"}, 300) == ["c"]  # c is not ours to renew
    time.sleep(0.2)
    assert jobs.lease_owner("a") == "w1"  # renewed
    assert jobs.lease_owner("b") is None  # expired
    assert jobs.lease_owner("c") == "someone-else"


def test_a_retry_leaves_a_marker_only_its_retry_takes(jobs: JobStore) -> None:
    owner = lease_owner("task-1")
    jobs.acquire_lease("j", owner, 5_000)
    assert jobs.release_lease("j", owner, keep_as=retry_marker("task-1"), keep_ms=5_000)
    assert jobs.lease_owner("j") == "retry:task-1"
    other = jobs.acquire_lease("j", "other/2/task-2", 5_000, takeover=(retry_marker("task-2"),))
    assert other == "retry:task-1"
    assert jobs.acquire_lease("j", "other/3/task-1", 5_000, takeover=(retry_marker("task-1"),)) is None
    assert jobs.lease_owner("j") == "other/3/task-1"


def test_a_received_message_is_leased_until_its_task_takes_over(jobs: JobStore) -> None:
    job, _ = jobs.create(Job(input="s3://b/in.png"))
    assert jobs.acquire_lease(job.id, taken_marker("t1"), 5_000) is None  # task_received
    sc = ClaimScope(owner=lease_owner("t1"), lease_ms=5_000, takeover=(taken_marker("t1"),))
    token = claim_scope.set(sc)
    try:
        assert jobs.claim(job.id) is not None  # task_prerun's run, any process of this host
    finally:
        claim_scope.reset(token)
    assert jobs.lease_owner(job.id) == lease_owner("t1")
    stranger = ClaimScope(owner=lease_owner("t2"), lease_ms=5_000, takeover=(taken_marker("t2"),))
    token = claim_scope.set(stranger)
    try:
        assert jobs.claim(job.id) is None  # a second message for the job waits its turn
    finally:
        claim_scope.reset(token)
    assert stranger.refused_by == lease_owner("t1") and jobs.get(job.id).attempts == 1


def test_the_heartbeat_keeps_a_lease_alive_past_its_ttl(jobs: JobStore) -> None:
    keeper = LeaseKeeper(lambda: jobs, lease_s=0.3)
    try:
        assert keeper.hold("j", "w1") is None
        time.sleep(1.0)  # three lease lifetimes: only renewals (every 0.1 s) keep it
        assert jobs.lease_owner("j") == "w1"
        keeper.release("j", "w1")
        assert jobs.lease_owner("j") is None and keeper.held() == {}
    finally:
        keeper.stop()


def test_retry_delay_comes_from_celerys_retry() -> None:
    from celery.exceptions import Retry

    assert _retry_delay_s(Retry(when=2.5)) == 2.5
    assert _retry_delay_s(Retry()) == 0.0
    assert _retry_delay_s(None) == 0.0


# --- the claim -------------------------------------------------------------------------------------
def test_claim_refuses_while_another_run_holds_the_lease(jobs: JobStore) -> None:
    job, _ = jobs.create(Job(input="s3://b/in.png"))
    jobs.acquire_lease(job.id, "w1", 5_000)
    assert jobs.claim(job.id, lease_owner="w2") is None
    assert jobs.get(job.id).status == JobStatus.QUEUED and jobs.get(job.id).attempts == 0
    claimed = jobs.claim(job.id, lease_owner="w1")
    assert claimed is not None and claimed.attempts == 1


def test_claim_takes_a_free_lease_and_indexes_it(jobs: JobStore, scope: ClaimScope) -> None:
    job, _ = jobs.create(Job(input="s3://b/in.png"))
    claimed = jobs.claim(job.id)  # no keywords: the task's scope speaks
    assert claimed is not None and claimed.status == JobStatus.PROCESSING
    assert jobs.lease_owner(job.id) == scope.owner
    assert 0 < jobs.redis.pttl(keys.lease_key(job.id)) <= 5_000
    assert jobs.redis.zscore(keys.leased_jobs_key(), job.id) is not None


def test_claim_fails_a_job_started_too_often(jobs: JobStore, scope: ClaimScope) -> None:
    job, _ = jobs.create(Job(input="s3://b/in.png"))
    for _ in range(4):
        jobs.redis.delete(keys.lease_key(job.id))  # each start by a worker that then died
        assert jobs.claim(job.id) is not None
    assert jobs.claim(job.id) is None
    failed = jobs.get(job.id)
    assert failed.status == JobStatus.FAILED and failed.attempts == 4
    assert failed.error is not None and failed.error.code == WORKER_LOST
    assert scope.failed is not None and scope.failed.id == job.id  # the task announces it


def test_claim_without_limits_keeps_its_old_behaviour(jobs: JobStore) -> None:
    job, _ = jobs.create(Job(input="s3://b/in.png"))
    for n in range(1, 7):
        assert jobs.claim(job.id).attempts == n
    assert jobs.lease_owner(job.id) is None


# --- the reaper ------------------------------------------------------------------------------------
def test_reaper_requeues_a_job_whose_worker_is_gone(jobs: JobStore) -> None:
    calls = Collector()
    job = _processing_without_lease(jobs)
    leased, _ = jobs.create(Job(input="s3://b/in.png"))
    jobs.claim(leased.id)
    jobs.update(leased.id, started_at=LONG_AGO)
    jobs.acquire_lease(leased.id, "alive", 5_000)  # a live worker's job is left alone

    result = _reaper(jobs, calls).reap_once()
    assert result.requeued == [job.id] and calls.sent == [job.id]
    back = jobs.get(job.id)
    assert back.status == JobStatus.QUEUED and back.attempts == 1 and back.started_at == LONG_AGO
    assert jobs.lost_count(job.id) == 1
    assert jobs.get(leased.id).status == JobStatus.PROCESSING
    assert _reaper(jobs, calls).reap_once().requeued == []  # queued now: nothing to do twice


def test_reaper_leaves_a_job_just_started(jobs: JobStore) -> None:
    calls = Collector()
    job, _ = jobs.create(Job(input="s3://b/in.png"))
    jobs.claim(job.id)  # started now, no lease (a worker between its claim and its lease)
    assert _reaper(jobs, calls, lease_s=30).reap_once().requeued == []
    assert calls.sent == [] and jobs.get(job.id).status == JobStatus.PROCESSING


def test_a_job_that_keeps_losing_its_worker_fails_worker_lost(jobs: JobStore) -> None:
    calls = Collector()
    reaper = _reaper(jobs, calls, max_lost=3)
    job = _processing_without_lease(jobs)
    for attempt in (1, 2):
        assert reaper.reap_once().requeued == [job.id]
        again = jobs.claim(job.id)  # the re-enqueued message, taken by the next (doomed) worker
        assert again is not None and again.attempts == attempt + 1
    result = reaper.reap_once()
    assert result.failed == [job.id] and result.requeued == []
    failed = jobs.get(job.id)
    assert failed.status == JobStatus.FAILED and failed.attempts == 3
    assert failed.error is not None and failed.error.code == WORKER_LOST
    assert failed.completed_at is not None
    assert jobs.lost_count(job.id) == 3
    assert calls.sent == [job.id, job.id]
    assert calls.events == [(job.id, "completed", "failed")]
    assert reaper.reap_once().failed == []  # terminal is final


def test_reaper_resends_a_message_taken_by_a_worker_lost_before_claiming(jobs: JobStore) -> None:
    calls = Collector()
    job, _ = jobs.create(Job(input="s3://b/in.png"))
    jobs.acquire_lease(job.id, "doomed", 200)  # taken at task start, never claimed, never renewed
    assert _reaper(jobs, calls).reap_once().requeued == []  # alive for now
    time.sleep(0.3)
    result = _reaper(jobs, calls).reap_once()
    assert result.requeued == [job.id] and calls.sent == [job.id]
    assert jobs.get(job.id).status == JobStatus.QUEUED and jobs.lost_count(job.id) == 0
    assert jobs.redis.zscore(keys.leased_jobs_key(), job.id) is None


def test_reaper_resends_a_message_stranded_unacked_without_any_lease(jobs: JobStore, redis_url: str) -> None:
    """A worker took the message (kombu moved it to `unacked`) but never leased it: its broker
    connection died with Redis. The copy would wait an hour for the visibility timeout."""
    app = make_celery(redis_url)
    calls = Collector(app)
    job, _ = jobs.create(Job(input="s3://b/in.png"))
    done, _ = jobs.create(Job(input="s3://b/done.png"))
    jobs.transition(done.id, JobStatus.SUCCEEDED)
    with app.connection() as conn:
        for job_id in (job.id, done.id):
            app.send_task(PARSE_TASK, args=[job_id], queue=PARSE_QUEUE)
            # Taken and never acked; the channel is not closed, so kombu never restores it.
            assert conn.default_channel.basic_get(PARSE_QUEUE, no_ack=False) is not None
        assert {j for _, j in unacked_parse_messages(jobs.redis, older_than_s=0)} == {job.id, done.id}
        assert _reaper(jobs, calls, lease_s=60).reap_once().requeued == []  # too recent to judge
        time.sleep(0.4)
        result = _reaper(jobs, calls).reap_once()
        assert result.requeued == [job.id] and calls.sent == [job.id]
        # Both stale copies are gone: the transport will not redeliver them in an hour.
        assert unacked_parse_messages(jobs.redis, older_than_s=0) == []
        assert _reaper(jobs, calls).reap_once().requeued == [] and calls.sent == [job.id]


def test_reaper_leaves_a_leased_unacked_message_alone(jobs: JobStore, redis_url: str) -> None:
    calls = Collector()
    job, _ = jobs.create(Job(input="s3://b/in.png"))
    app = make_celery(redis_url)
    with app.connection() as conn:
        app.send_task(PARSE_TASK, args=[job.id], queue=PARSE_QUEUE)
        assert conn.default_channel.basic_get(PARSE_QUEUE, no_ack=False) is not None
        jobs.acquire_lease(job.id, taken_marker("t-1"), 60_000)  # a live worker holds it
        time.sleep(0.4)
        assert _reaper(jobs, calls).reap_once().requeued == [] and calls.sent == []
        assert [j for _, j in unacked_parse_messages(jobs.redis, older_than_s=0)] == [job.id]


def test_reaper_resends_a_queued_job_whose_message_is_gone(jobs: JobStore, redis_url: str) -> None:
    """A worker killed between popping a message and recording it as unacked takes it along."""
    app = make_celery(redis_url)
    calls = Collector(app)
    lost, _ = jobs.create(Job(input="s3://b/lost.png", created_at=LONG_AGO))
    waiting, _ = jobs.create(Job(input="s3://b/waiting.png", created_at=LONG_AGO))
    fresh, _ = jobs.create(Job(input="s3://b/fresh.png"))  # may still be on its way to the queue
    app.send_task(PARSE_TASK, args=[waiting.id], queue=PARSE_QUEUE)
    result = _reaper(jobs, calls).reap_once()
    assert result.requeued == [lost.id] and calls.sent == [lost.id]
    time.sleep(0.4)  # `fresh` is now older than the lease, and has no message either
    assert _reaper(jobs, calls).reap_once().requeued == [fresh.id]
    assert _reaper(jobs, calls).reap_once().requeued == []  # every queued job has its message now
    assert calls.sent == [lost.id, fresh.id]


def test_a_released_lease_leaves_nothing_to_reap(jobs: JobStore) -> None:
    calls = Collector()
    job, _ = jobs.create(Job(input="s3://b/in.png"))
    jobs.acquire_lease(job.id, "w", 5_000)
    jobs.release_lease(job.id, "w")
    assert _reaper(jobs, calls).reap_once().requeued == [] and calls.sent == []


def test_one_reaper_scans_per_interval(jobs: JobStore) -> None:
    calls = Collector()
    _processing_without_lease(jobs)
    first, second = _reaper(jobs, calls), _reaper(jobs, calls)
    assert first.tick() is not None
    assert second.tick() is None  # the lock is held for the interval
    time.sleep(0.6)
    assert second.tick() is not None
