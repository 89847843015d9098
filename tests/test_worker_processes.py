"""Real `faceparse worker` processes: work spread and done once, one model load per process."""

from __future__ import annotations

import base64
import sys
import uuid
from pathlib import Path

import pytest

from faceparse.client import Client
from storage.jobs import Job
from storage.jobstore import JobStore
from storage.queue import PARSE_QUEUE, PARSE_TASK, make_celery
from tests.fixtures.stack import (
    MODEL_LOADED_RE,
    InputServer,
    ManagedProcess,
    Stack,
    png_bytes,
    stack_env,
    start_worker,
    wait_until,
)

TIMEOUT = 60


def _data_url(seed: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(20, 16, seed=seed)).decode()


def test_two_workers_share_the_queue_and_run_each_job_once(stack: Stack, input_server: InputServer) -> None:
    client: Client = stack.client("alice")
    # Two fetches held open at once can only be two different (solo-pool) worker processes.
    held = [client.submit(input_server.url(f"spread-{i}.png", gated=True)) for i in range(2)]
    wait_until(lambda: len(input_server.waiting()) == 2, timeout=TIMEOUT, what="both workers fetching")
    more = [client.submit(_data_url(i), outputs=["mask"]) for i in range(10)]
    for i in range(2):
        input_server.release(f"spread-{i}.png")
    jobs = client.wait([j["id"] for j in held + more], timeout=TIMEOUT)
    assert {j["status"] for j in jobs} == {"succeeded"}
    assert all(j["attempts"] == 1 for j in jobs)  # claimed exactly once each
    worker_pids = {w.pid for w in stack.workers}
    ran_on = [int(j["metrics"]["worker_pid"]) for j in jobs]
    assert {ran_on[0], ran_on[1]} == worker_pids
    assert set(ran_on) <= worker_pids
    for job in jobs:  # every job finished once: its own worker logged it once
        assert "".join(w.log() for w in stack.workers).count(f"job {job['id']} succeeded") == 1


def test_each_worker_process_loaded_the_model_once(stack: Stack) -> None:
    client = stack.client("alice")
    jobs = client.wait([client.submit(_data_url(100 + i), outputs=["mask"])["id"] for i in range(6)],
                       timeout=TIMEOUT)
    assert {j["status"] for j in jobs} == {"succeeded"}
    loads = stack.model_loads()
    assert loads == {w.pid: 1 for w in stack.workers}


def test_prefork_children_load_the_model_parent_never_does(
        redis_url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    storage = tmp_path / "data"
    storage.mkdir()
    env = stack_env(redis_url=redis_url, storage_url=f"file://{storage}", model_dir=tiny_model_dir, s3_env={})
    worker = start_worker(f"prefork-{uuid.uuid4().hex[:6]}", env, tmp_path, concurrency=2,
                          queues=PARSE_QUEUE)
    try:
        jobs = JobStore.from_url(redis_url)
        app = make_celery(redis_url)
        ids = []
        for i in range(6):
            job, _ = jobs.create(Job(input=_data_url(200 + i), requested_outputs=["mask"]))
            app.send_task(PARSE_TASK, args=[job.id], queue=PARSE_QUEUE)
            ids.append(job.id)

        def all_done() -> list[Job] | None:
            got = [jobs.get(i) for i in ids]
            return got if all(j is not None and j.status.is_terminal() for j in got) else None

        done = wait_until(all_done, timeout=120, what="prefork jobs")
        assert {j.status.value for j in done} == {"succeeded"}
        assert all((storage / "jobs" / j.id / "mask.png").is_file() for j in done)
        loads = [(int(pid), int(n)) for pid, n in MODEL_LOADED_RE.findall(worker.log())]
        pids = {pid for pid, _ in loads}
        assert len(loads) == 2 and len(pids) == 2, loads  # one load in each of the two children
        assert all(n == 1 for _, n in loads)
        assert worker.pid not in pids  # never in the parent that forks them
        assert {int(j.metrics["worker_pid"]) for j in done} <= pids
    finally:
        assert worker.stop() in (0, -15), worker.log()[-2000:]


def test_worker_without_its_model_exits_loudly(redis_url: str, tmp_path: Path) -> None:
    env = stack_env(redis_url=redis_url, storage_url=f"file://{tmp_path}",
                    model_dir=tmp_path / "no-such-model", s3_env={})
    proc = ManagedProcess("no-model", [sys.executable, "-m", "faceparse.cli", "worker"], env, tmp_path)
    try:
        code = proc.proc.wait(timeout=120)
    except Exception:
        proc.stop()
        raise
    proc.stop()
    assert code == 3
    assert "Cannot load the face-parsing model" in proc.log()
    assert "faceparse worker ready" not in proc.log()


@pytest.mark.parametrize("bad", ["not-a-url", "ftp://example.com/a.png"])
def test_unsupported_inputs_fail_without_retry(stack: Stack, bad: str) -> None:
    jobs = stack.jobs
    job, _ = jobs.create(Job(input=bad))
    make_celery(stack.redis_url).send_task(PARSE_TASK, args=[job.id], queue=PARSE_QUEUE)
    done = wait_until(lambda: (j := jobs.get(job.id)) and j.status.is_terminal() and j, timeout=TIMEOUT,
                      what="the job to fail")
    assert done.status.value == "failed" and done.attempts == 1
    assert done.error is not None and done.error.code in ("unsupported_scheme", "invalid_input")


def test_transient_fetch_failures_are_retried_then_fail(stack: Stack) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: every fetch is refused (a transient fault)
    client = stack.client("alice")
    job = client.submit(f"http://127.0.0.1:{port}/face.png")
    [done] = client.wait([job["id"]], timeout=TIMEOUT)
    assert done["status"] == "failed" and done["error"]["code"] == "fetch_failed", done
    assert done["attempts"] == 3  # FACEPARSE_MAX_RETRIES=2 in the stack: 1 try + 2 retries
