"""Metrics: the worker's figures over HTTP (one process, and prefork's multiprocess mode), the API's
/metrics across gunicorn workers, and Flower against the stack's broker."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.stack import ROOT, Stack, free_port, png_bytes, start_api, wait_until

TIMEOUT = 60

# Two "jobs" observed by two forked children (multiprocess mode) or by the process itself.
WORKER_SCRIPT = textwrap.dedent("""
    import multiprocessing, os, sys
    from worker import metrics

    def work(size):
        metrics.observe_batch(size, 0.25 * size)
        metrics.observe_webhook("delivered")
        metrics.observe_job({"queue_ms": 1500.0, "fetch_ms": 4.0, "decode_ms": 2.0,
                             "inference_ms": 20.0, "upload_ms": 6.0, "total_ms": 40.0}, "succeeded")

    if __name__ == "__main__":
        metrics.observe_model_load(2.5)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            for size in (2, 4):
                child = multiprocessing.get_context("fork").Process(target=work, args=(size,))
                child.start()
                child.join()
        else:
            work(2)
            work(4)
        metrics.observe_job({}, "failed")  # failed before any stage: counted, no timings
        print(metrics.start_metrics_server(0, "127.0.0.1"), flush=True)
        sys.stdin.read()  # serve until the test closes stdin
""")


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(params=["one-process", "multiprocess"])
def worker_metrics_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if request.param == "multiprocess":
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT], env=env, cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


def test_worker_metrics_are_served(worker_metrics_url: str) -> None:
    samples = _samples(requests.get(worker_metrics_url, timeout=5).text)
    assert samples[("faceparse_worker_jobs_total", (("status", "succeeded"),))] == 2
    assert samples[("faceparse_worker_jobs_total", (("status", "failed"),))] == 1
    assert samples[("faceparse_batch_size_count", ())] == 2
    assert samples[("faceparse_batch_size_sum", ())] == 6
    assert samples[("faceparse_forward_seconds_sum", ())] == 1.5
    assert samples[("faceparse_batch_size_bucket", (("le", "2.0"),))] == 1
    assert samples[("faceparse_webhook_deliveries_total", (("outcome", "delivered"),))] == 2
    assert samples[("faceparse_job_queue_wait_seconds_count", ())] == 2
    assert samples[("faceparse_job_queue_wait_seconds_sum", ())] == pytest.approx(3.0)
    assert samples[("faceparse_job_inference_seconds_sum", ())] == pytest.approx(0.04)
    assert samples[("faceparse_job_stage_seconds_count", (("stage", "upload"),))] == 2
    assert samples[("faceparse_job_processing_seconds_sum", ())] == pytest.approx(0.08)
    # End to end = queue wait + processing: 1.54 s each, in the 2.5 s bucket and not in the 1 s one.
    assert samples[("faceparse_job_end_to_end_seconds_sum", ())] == pytest.approx(3.08)
    assert samples[("faceparse_job_end_to_end_seconds_bucket", (("le", "1.0"),))] == 0
    assert samples[("faceparse_job_end_to_end_seconds_bucket", (("le", "2.5"),))] == 2
    assert samples[("faceparse_model_load_seconds", ())] == 2.5
    assert samples[("faceparse_model_loads_total", ())] == 1


def test_worker_port_is_offset_by_the_pool_index() -> None:
    from worker.metrics import process_index

    assert process_index() is None  # not a prefork child: the port is used as given


def test_api_metrics_report_jobs_and_queues(stack: Stack, tmp_path: Path) -> None:
    image = tmp_path / "face.png"
    image.write_bytes(png_bytes(24, 16, seed=5))
    client = stack.client("alice")
    [done] = client.wait([client.submit(image)["id"]], timeout=TIMEOUT)
    assert done["status"] == "succeeded"
    samples = _samples(requests.get(f"{stack.api_url}/metrics", timeout=5).text)
    assert samples[("faceparse_redis_up", ())] == 1
    assert samples[("faceparse_jobs", (("status", "succeeded"),))] >= 1
    assert ("faceparse_queue_depth", (("queue", "faceparse.parse"),)) in samples
    assert ("faceparse_queue_depth", (("queue", "faceparse.webhooks"),)) in samples


def test_api_metrics_sum_gunicorn_workers_in_multiprocess_mode(stack: Stack, tmp_path: Path) -> None:
    env = {**stack.env, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    api, url = start_api(env, tmp_path, workers=2)
    try:
        for _ in range(12):  # new connections: gunicorn spreads them over both workers
            requests.get(f"{url}/healthz", timeout=5, headers={"Connection": "close"})
        pids = {p.name for p in tmp_path.glob("*.db")}
        samples = _samples(requests.get(f"{url}/metrics", timeout=5).text)
    finally:
        api.stop()
    key = ("faceparse_http_requests_total", (("endpoint", "/healthz"), ("method", "GET"), ("status", "200")))
    # start_api's own readiness polls count too: at least the 12 here, from whichever worker answered.
    assert samples[key] >= 12
    assert pids, "no multiprocess files were written"
    assert samples[("faceparse_redis_up", ())] == 1  # the Redis-backed figures are still there, once


def test_flower_sees_the_stack_workers(stack: Stack, tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "flower.log").open("wb")
    cmd = [sys.executable, "-m", "celery", "--broker", stack.redis_url, "flower", f"--port={port}",
           "--address=127.0.0.1"]
    # Flower 2 serves its JSON API without auth only when told so (a test on loopback).
    env = {**stack.env, "FLOWER_UNAUTHENTICATED_API": "true"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            assert proc.poll() is None, (tmp_path / "flower.log").read_text()
            try:
                return requests.get(f"{base}/healthcheck", timeout=2).text == "OK"
            except requests.RequestException:
                return False

        wait_until(healthy, timeout=30, interval=0.2, what="flower's /healthcheck")

        def workers() -> dict:
            resp = requests.get(f"{base}/api/workers", params={"refresh": "1"}, timeout=10)
            assert resp.status_code == 200, resp.text
            return resp.json()

        found = wait_until(workers, timeout=20, interval=0.5, what="flower's /api/workers")
        names = sorted(found)
        assert any(n.startswith("worker-a@") for n in names) and any(n.startswith("worker-b@") for n in names)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
