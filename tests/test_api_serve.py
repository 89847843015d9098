"""The API as deployed: gunicorn serving `faceparse.wsgi:app` over real HTTP, enqueueing into real Redis."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis
import requests

from storage.queue import PARSE_QUEUE, PARSE_TASK
from tests.fixtures.api import png_bytes
from tests.fixtures.services import free_port

KEY = "serve-test-key"


def test_api_process_never_imports_torch_or_worker(tmp_path):
    code = (
        "import sys, faceparse.wsgi\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'worker', 'transformers'))\n"
        "assert not bad, bad\n"
    )
    env = {
        **os.environ,
        "FACEPARSE_STORAGE_URL": f"file://{tmp_path}",
        "FACEPARSE_REDIS_URL": "redis://127.0.0.1:1/0",
    }
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


@pytest.fixture(name="served")
def served_fixture(redis_url: str, tmp_path) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "FACEPARSE_REDIS_URL": redis_url,
        "FACEPARSE_STORAGE_URL": f"file://{tmp_path}/data",
        "FACEPARSE_API_KEYS": f"serve-tenant:{KEY}",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-w", "1", "-b", f"127.0.0.1:{port}", "faceparse.wsgi:app"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"gunicorn did not start: {proc.stdout.read().decode(errors='replace')[-2000:]}")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_gunicorn_serves_and_enqueues_by_task_name(served, redis_url):
    auth = {"Authorization": f"Bearer {KEY}"}
    assert requests.get(f"{served}/readyz", timeout=10).json()["status"] == "ok"
    assert requests.get(f"{served}/v1/jobs", timeout=10).status_code == 401

    resp = requests.post(
        f"{served}/v1/jobs", files={"image": ("face.png", png_bytes(), "image/png")}, headers=auth, timeout=10
    )
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert (
        requests.get(f"{served}/v1/jobs/{job['id']}", headers=auth, timeout=10).json()["status"] == "queued"
    )
    stored = requests.get(f"{served}/v1/files/uploads/{job['id']}/face.png", headers=auth, timeout=10)
    assert stored.content == png_bytes()

    # The message in the broker names the task and carries the job id only, never the bytes.
    messages = redis.Redis.from_url(redis_url).lrange(PARSE_QUEUE, 0, -1)
    assert len(messages) == 1
    envelope = json.loads(messages[0])
    assert envelope["headers"]["task"] == PARSE_TASK
    args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
    assert args == [job["id"]]
    assert len(messages[0]) < 4096
