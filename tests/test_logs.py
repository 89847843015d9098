"""Structured logs: JSON lines from stdlib and structlog alike, the job id on every line of a job."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import structlog

from faceparse.logs import bind_task_context, clear_task_context, configure_logging
from tests.fixtures.stack import Stack, png_bytes, wait_until

TIMEOUT = 60
RECEIVED_LOGGER = "celery.worker.strategy"


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """configure_logging into a buffer; the process's logging is restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    configure_logging("test", stream=stream)
    try:
        yield stream
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.contextvars.clear_contextvars()
        structlog.reset_defaults()


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_stdlib_and_structlog_lines_are_json_with_bound_job_id(log_stream: io.StringIO) -> None:
    structlog.contextvars.bind_contextvars(job_id="job-1")
    logging.getLogger("worker.jobrunner").info("job %s claimed (attempt %d)", "job-1", 2)
    structlog.get_logger("api.v1").warning("submitted", tenant="acme")
    structlog.contextvars.clear_contextvars()
    logging.getLogger("worker.tasks").info("between jobs")

    claimed, submitted, between = _lines(log_stream)
    assert claimed["event"] == "job job-1 claimed (attempt 2)"
    assert claimed["job_id"] == "job-1" and claimed["logger"] == "worker.jobrunner"
    assert claimed["level"] == "info" and claimed["service"] == "test" and claimed["pid"] > 0
    assert claimed["timestamp"].endswith("Z")
    assert submitted["job_id"] == "job-1" and submitted["tenant"] == "acme"
    assert submitted["level"] == "warning" and submitted["logger"] == "api.v1"
    assert "job_id" not in between


def test_exceptions_stay_on_one_line(log_stream: io.StringIO) -> None:
    try:
        raise ValueError("bad pixel")
    except ValueError:
        logging.getLogger("worker").exception("job failed")
    [line] = log_stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "error"
    assert "ValueError: bad pixel" in record["exception"] and "Traceback" in record["exception"]


def test_console_format_and_bad_format() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging("test", fmt="console", stream=stream)
        logging.getLogger("x").warning("hello %s", "there")
        assert "hello there" in stream.getvalue() and not stream.getvalue().startswith("{")
        with pytest.raises(ValueError, match="log format"):
            configure_logging("test", fmt="xml", stream=stream)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.reset_defaults()


@pytest.mark.parametrize(("task", "args", "job_id"), [
    ("faceparse.parse", ["job-a"], "job-a"),
    ("faceparse.deliver_webhook", ["job-b", "completed", "msg_1"], "job-b"),
    ("celery.ping", ["not-a-job"], None),
])
def test_task_context_binds_the_job_id_of_faceparse_tasks(log_stream: io.StringIO, task: str,
                                                          args: list[str], job_id: str | None) -> None:
    bind_task_context(task_id="t-1", task=SimpleNamespace(name=task), args=args)
    logging.getLogger("worker").info("inside")
    clear_task_context()
    logging.getLogger("worker").info("after")
    inside, after = _lines(log_stream)
    assert inside.get("job_id") == job_id and inside["task_id"] == "t-1" and inside["task"] == task
    assert "task_id" not in after and "job_id" not in after


# --- the real processes ---------------------------------------------------------------------------
def _json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))  # a line that starts as JSON must be whole JSON
    return out


def test_worker_and_api_logs_are_json_with_the_job_id(stack: Stack, tmp_path: Any) -> None:
    image = tmp_path / "face.png"
    image.write_bytes(png_bytes(32, 24, seed=3))
    client = stack.client("alice")
    job = client.submit(image)
    [done] = client.wait([job["id"]], timeout=TIMEOUT)
    assert done["status"] == "succeeded"

    def job_lines() -> list[dict[str, Any]]:
        lines = [rec for w in stack.workers for rec in _json_lines(w.log())]
        # Celery's "Task … received" line is written on arrival, before the task (and its context) runs.
        mine = [rec for rec in lines if job["id"] in json.dumps(rec) and rec["logger"] != RECEIVED_LOGGER]
        return mine if any("succeeded" in rec["event"] for rec in mine) else []

    mine = wait_until(job_lines, timeout=10, what="the worker's lines about the job")
    # Every line written while the worker processed the job carries its id as a field.
    assert all(rec.get("job_id") == job["id"] for rec in mine), mine
    assert {rec["service"] for rec in mine} == {"worker"}
    events = [rec["event"] for rec in mine]
    assert any(e.startswith(f"job {job['id']} claimed") for e in events), events
    assert all(rec.get("task") == "faceparse.parse" and rec.get("task_id") for rec in mine), mine

    # The API (gunicorn) writes JSON too, its access log with structured fields.
    access = [rec for rec in _json_lines(stack.api.log()) if rec.get("path") == "/v1/jobs"
              and rec.get("method") == "POST"]
    assert access and access[-1]["status"] == 202 and access[-1]["duration_ms"] >= 0
    assert access[-1]["service"] == "api"
