"""Workers killed with `kill -9`: their jobs come back within the lease, and a job that keeps
killing workers ends `failed` with `worker_lost`.

Real `faceparse worker` processes (solo pool: a kill takes the whole process and its message
stays in kombu's unacked hash for the hour-long visibility timeout) on the session redis-server
and moto S3, with a 3 s lease and a 1 s reaper interval.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from storage.jobs import Job, JobStatus
from storage.jobstore import WORKER_LOST, JobStore
from storage.queue import PARSE_QUEUE, PARSE_TASK, make_celery
from tests.fixtures.stack import ManagedProcess, png_bytes, stack_env, wait_until

LEASE_S = 3
MAX_ATTEMPTS = 3
FETCH_DELAY_S = 0.25  # each input is served this slowly: a worker is mid-job most of the time


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a killed worker hangs up mid-response: expected here


class SlowInputs:
    """Serves one PNG at any path after a delay; paths under /hold/ wait until the server closes."""

    def __init__(self, image: bytes) -> None:
        closing = self.closing = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                closing.wait(60 if self.path.startswith("/hold/") else FETCH_DELAY_S)
                self.send_response(200)
                self.send_header("content-type", "image/png")
                self.send_header("content-length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{path}"

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Fleet:
    """Two workers with a short lease, and the means to feed, kill and replace them."""

    jobs: JobStore
    redis_url: str
    env: dict[str, str]
    log_dir: Path
    inputs: SlowInputs
    workers: list[ManagedProcess]

    def submit(self, input_url: str) -> str:
        job, _ = self.jobs.create(Job(input=input_url, requested_outputs=["mask", "summary"]))
        self._celery.send_task(PARSE_TASK, args=[job.id], queue=PARSE_QUEUE)
        return job.id

    def __post_init__(self) -> None:
        self._celery = make_celery(self.redis_url)

    def start(self, name: str) -> ManagedProcess:
        """Start a worker without waiting for it (its torch import overlaps the test)."""
        import sys

        from tests.fixtures.stack import ROOT  # noqa: F401  (cwd of every stack process)

        cmd = [sys.executable, "-m", "faceparse.cli", "worker", "--concurrency", "1",
               "--queues", PARSE_QUEUE, "--hostname", f"{name}@%h"]
        proc = ManagedProcess(name, cmd, self.env, self.log_dir)
        self.workers.append(proc)
        return proc

    def kill(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        for w in self.workers:
            if w.pid == pid:
                w.proc.wait(timeout=10)

    def logs(self) -> str:
        return "".join(w.log() for w in self.workers)


def _pid_of(owner: str | None) -> int | None:
    """The process in a lease value `host/pid/task-id`."""
    match = re.fullmatch(r".*/(\d+)/[^/]+", owner or "")
    return int(match.group(1)) if match else None


@pytest.fixture(scope="module")
def fleet(redis_server: str, s3_server: str, tiny_model_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    import boto3

    from tests.fixtures.services import S3_TEST_ENV

    redis_url = re.sub(r"/\d+$", "", redis_server.rstrip("/")) + "/11"
    s3_env = {"AWS_ENDPOINT_URL": s3_server, **S3_TEST_ENV}
    bucket = f"fp-kill-{uuid.uuid4().hex[:8]}"
    boto3.session.Session().client(
        "s3", endpoint_url=s3_server, region_name=S3_TEST_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=S3_TEST_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)
    env = stack_env(redis_url=redis_url, storage_url=f"s3://{bucket}/data", model_dir=tiny_model_dir,
                    s3_env=s3_env, FACEPARSE_LEASE_SECONDS=str(LEASE_S),
                    FACEPARSE_REAPER_INTERVAL_SECONDS="1", FACEPARSE_MAX_ATTEMPTS=str(MAX_ATTEMPTS))
    log_dir = tmp_path_factory.mktemp("kill-logs")
    inputs = SlowInputs(png_bytes(40, 30, seed=3))
    fleet = Fleet(jobs=JobStore.from_url(redis_url), redis_url=redis_url, env=env, log_dir=log_dir,
                  inputs=inputs, workers=[])
    fleet.jobs.redis.flushdb()  # db 11 is this module's alone
    try:
        for name in ("kill-a", "kill-b"):
            fleet.start(name)
        for w in fleet.workers:
            w.wait_for_log(r"faceparse worker ready", timeout=180)
        yield fleet
    finally:
        inputs.close()
        for w in fleet.workers:
            w.stop()
        fleet.jobs.redis.flushdb()


def test_a_killed_workers_jobs_come_back_within_the_lease(fleet: Fleet) -> None:
    jobs = fleet.jobs
    ids = [fleet.submit(fleet.inputs.url(f"slow/{i}.png")) for i in range(30)]
    victim_worker = fleet.workers[0]

    def victim_job() -> str | None:
        # A job the first worker has claimed and is running now.
        for job_id in ids:
            job = jobs.get(job_id)
            if (job is not None and job.status == JobStatus.PROCESSING and job.attempts == 1
                    and _pid_of(jobs.lease_owner(job_id)) == victim_worker.pid):
                return job_id
        return None

    victim = wait_until(victim_job, timeout=60, interval=0.02, what="the first worker mid-job")
    fleet.kill(victim_worker.pid)
    killed_at = time.monotonic()
    fleet.start("kill-a2")  # for the next test; its start-up overlaps this one

    reclaimed_at = None
    deadline = killed_at + 90
    while time.monotonic() < deadline:
        job = jobs.get(victim)
        if reclaimed_at is None and job.attempts >= 2:
            reclaimed_at = time.monotonic()
        done = [jobs.get(i) for i in ids]
        if all(j.status.is_terminal() for j in done):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"not all jobs finished: {[j.status.value for j in done]}")

    assert reclaimed_at is not None
    back_in_s = reclaimed_at - killed_at
    print(f"\nkill -9 mid-job: job back in work {back_in_s:.1f}s after the kill "
          f"(lease {LEASE_S}s, reaper every 1s)")
    assert back_in_s < 60
    assert back_in_s >= LEASE_S - 1  # it waited for the lease, not for a fluke redelivery
    assert {j.status for j in done} == {JobStatus.SUCCEEDED}
    by_id = {j.id: j for j in done}
    assert by_id[victim].attempts == 2 and jobs.lost_count(victim) == 1
    assert all(j.attempts <= 2 for j in done)
    # Exactly the jobs whose worker died ran twice; everything else ran once.
    assert {j.id for j in done if j.attempts == 2} == {i for i in ids if jobs.lost_count(i) == 1}
    logs = fleet.logs()
    for job_id in ids:  # one success recorded per job, and its outputs are in the bucket
        assert logs.count(f"job {job_id} succeeded") == 1, job_id
        assert set(by_id[job_id].outputs) == {"mask", "summary"}


def test_a_job_that_keeps_killing_workers_fails_worker_lost(fleet: Fleet) -> None:
    jobs = fleet.jobs
    for w in fleet.workers:
        if w.proc.poll() is None:
            w.wait_for_log(r"faceparse worker ready", timeout=180)
    poison = fleet.submit(fleet.inputs.url("hold/poison.png"))  # held open: mid-run until killed
    started = time.monotonic()
    for attempt in range(1, MAX_ATTEMPTS + 1):
        def running(attempt: int = attempt) -> int | None:
            job = jobs.get(poison)
            if job.status == JobStatus.PROCESSING and job.attempts == attempt:
                return _pid_of(jobs.lease_owner(poison))
            return None

        pid = wait_until(running, timeout=60, interval=0.05, what=f"attempt {attempt} of the poison job")
        fleet.kill(pid)
        if attempt < MAX_ATTEMPTS:
            fleet.start(f"kill-r{attempt}")  # keep two workers: the next one takes it and dies too
    failed = wait_until(lambda: (j := jobs.get(poison)).status.is_terminal() and j, timeout=60,
                        what="the poison job to fail")
    print(f"\npoison job failed worker_lost after {MAX_ATTEMPTS} killed workers, "
          f"{time.monotonic() - started:.1f}s")
    assert failed.status == JobStatus.FAILED
    assert failed.error is not None and failed.error.code == WORKER_LOST
    assert failed.attempts == MAX_ATTEMPTS and jobs.lost_count(poison) == MAX_ATTEMPTS
    time.sleep(2)  # a further reaper pass or redelivery changes nothing
    assert jobs.get(poison).status == JobStatus.FAILED and jobs.get(poison).attempts == MAX_ATTEMPTS
