"""Fault: Redis (broker and job store) killed and restarted while jobs run.

The isolated stack's redis-server writes an append-only file synced on every write; it is
SIGKILLed while the worker is in the middle of a job with more queued behind it, stays down for a
few seconds, and comes back on the same port from that file. While it is down the API answers 503
in the contract's error shape, quickly; the worker reconnects by itself (same process, never
restarted), and every job the API accepted before the kill ends `succeeded`.

The job running at the kill (and those the worker had prefetched) lose their Celery ack with the
connection; they are recovered by the worker lease (worker/lease.py: the lease lapses, the reaper
re-enqueues), which the isolated stack runs with 5 s leases. Without it they would wait for the
broker's visibility timeout (1 h): see docs/RELIABILITY.md.
"""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import requests
from PIL import Image

from tests.fixtures.faults import IsolatedStack, timed
from tests.fixtures.stack import API_KEYS, png_bytes, wait_until

QUEUED_JOBS = 6
DOWN_S = 4.0
RECOVERY_TIMEOUT_S = 60.0
AUTH = {"Authorization": f"Bearer {API_KEYS['alice']}"}


def _statuses(stack: IsolatedStack, ids: list[str]) -> dict[str, str]:
    store = stack.jobs
    try:
        return {i: (job.status.value if (job := store.get(i)) else "missing") for i in ids}
    finally:
        store.redis.close()


def _large_png(width: int, height: int) -> bytes:
    """A large but highly compressible PNG (a gradient): slow to parse, quick to upload."""
    ramp = np.linspace(0, 255, width, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (height, 1))] * 3, axis=-1)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _outage_answers(stack: IsolatedStack, input_url: str, job_id: str) -> list[tuple[str, int, dict, float]]:
    """Hit the API for DOWN_S seconds: (request, status, body, seconds) for each answer."""
    answers = []
    start = time.monotonic()
    while time.monotonic() - start < DOWN_S:
        for method, path, kwargs in (
            ("post", "/v1/jobs", {"json": {"input": input_url}}),
            ("get", f"/v1/jobs/{job_id}", {}),
            ("get", "/v1/jobs", {}),
            ("post", f"/v1/jobs/{job_id}/cancel", {}),
        ):
            resp, took = timed(requests.request, method, stack.api_url + path, headers=AUTH, timeout=30,
                               **kwargs)
            answers.append((f"{method.upper()} {path}", resp.status_code, resp.json(), took))
        time.sleep(0.2)
    return answers


@pytest.mark.slow
def test_redis_restart_loses_no_accepted_job(isolated_stack: IsolatedStack) -> None:
    stack = isolated_stack
    client = stack.client("alice")
    worker_pid = stack.worker.pid
    # A large first image keeps the worker busy for a second or two: the kill lands mid-job.
    big, small = stack.put_input(_large_png(2400, 2000)), stack.put_input(png_bytes(96, 80))
    running = client.submit(big)["id"]
    queued = [client.submit(small)["id"] for _ in range(QUEUED_JOBS)]
    ids = [running, *queued]
    wait_until(lambda: _statuses(stack, [running])[running] == "processing", timeout=60, interval=0.02,
               what="the large job to start")

    stack.redis.kill()
    try:
        answers = _outage_answers(stack, f"s3://{stack.bucket}/in/x.png", running)
        ready = requests.get(stack.api_url + "/readyz", timeout=30)
    finally:
        stack.redis.start()
    restarted_at = time.monotonic()

    # While Redis was down: 503 in the contract's shape, fast, for reads and writes alike.
    assert answers
    for what, status, body, _took in answers:
        assert status == 503, (what, status, body)
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
        assert body["error"]["code"] == "unavailable" and "Redis" in body["error"]["message"], body
        assert "127.0.0.1" not in body["error"]["message"], "internal addresses leak into answers"
    took = sorted(t for *_, t in answers)
    assert took[-1] < 2.0, f"a 503 took {took[-1]:.2f}s while Redis was down"
    assert ready.status_code == 503 and ready.json()["checks"]["redis"] != "ok"

    # After the restart: the same worker process reconnects and takes new work.
    job = client.submit(stack.put_input(png_bytes(32, 32, seed=99)))
    [done] = client.wait([job["id"]], timeout=60)
    assert done["status"] == "succeeded", done
    assert stack.worker.pid == worker_pid and stack.worker.proc.poll() is None, "the worker was restarted"

    # Every job accepted before the kill, the one running at the kill included, ends succeeded.
    def all_succeeded() -> dict[str, str] | None:
        now = _statuses(stack, ids)
        return now if set(now.values()) == {"succeeded"} else None

    wait_until(all_succeeded, timeout=RECOVERY_TIMEOUT_S, interval=0.2,
               what="every job accepted before the kill to succeed")
    recovered_s = time.monotonic() - restarted_at
    median_ms, slowest_ms = took[len(took) // 2] * 1000, took[-1] * 1000
    print(f"\nredis down {DOWN_S:.0f}s: {len(answers)} answers, all 503, median {median_ms:.1f} ms, slowest "
          f"{slowest_ms:.1f} ms; all {len(ids)} accepted jobs succeeded {recovered_s:.1f}s after the restart")
