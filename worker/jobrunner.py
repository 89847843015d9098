"""Processing of one job, in plain Python (no Celery): claim, fetch, decode, parse, write, record.

`JobRunner.run` is the one job boundary: it catches every failure of a job, records it on the
job and returns, so a worker never dies of a job. The Celery task (`worker.tasks`) only turns
the returned `RunResult` into a retry or an ack.

Many runs share one process (one per task thread). With a `Batcher`, a run's forward pass rides
in a batch with other jobs' images; everything else (fetch, decode, preprocess, postprocess,
encode, upload, record) runs in the run's own thread, overlapped with other batches' forwards.
With an `Admission`, a run claims its job only when the process can make progress on it soon.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from storage import keys
from storage.errors import FaceparseError
from storage.jobs import Job, JobStatus
from worker.metrics import observe_job

if TYPE_CHECKING:
    from faceparse.settings import Settings
    from storage.jobstore import JobStore
    from storage.objects import ObjectStore
    from worker.batcher import Admission, Batcher
    from worker.model import FaceParser

log = logging.getLogger(__name__)

RETRY_BACKOFF_BASE_S = 1.0
RETRY_BACKOFF_MAX_S = 60.0

# Events go to a callable so the runner stays free of Celery: (job, event) -> None.
Notify = Callable[[Job, str], None]


class JobCanceled(Exception):
    """Raised inside the runner when the job was canceled while it ran."""


@dataclass
class RunResult:
    """The end of one run: a terminal status, a skip (None), or a transient fault to retry."""

    status: JobStatus | None
    retry_in: float | None = None
    error_code: str | None = None


@dataclass
class _Stages:
    """Per-stage wall times in milliseconds, rounded for the job record."""

    ms: dict[str, float] = field(default_factory=dict)

    def timed(self, name: str, start: float) -> float:
        now = time.perf_counter()
        self.ms[name] = round((now - start) * 1000.0, 2)
        return now


def _parse_ts(ts: str) -> datetime:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


class JobRunner:
    """Runs parse jobs against a job store, an object store and a loaded `FaceParser`."""

    def __init__(self, settings: Settings, jobs: JobStore, store: ObjectStore,
                 parser: Callable[[], FaceParser], notify: Notify, *,
                 batcher: Callable[[], Batcher] | None = None, admission: Admission | None = None) -> None:
        self.settings = settings
        self.jobs = jobs
        self.store = store
        self._parser = parser  # a getter: the model is loaded once per process, elsewhere
        self.notify = notify
        # Without a batcher the run does its own forward pass at batch 1 (tests, tools).
        self._batcher = batcher
        self._admission = admission

    # --- the job boundary ---------------------------------------------------------------
    def run(self, job_id: str) -> RunResult:
        """Process the job; never raises for a job's own failure."""
        with self._admitted() as reached_forward:
            return self._run(job_id, reached_forward)

    def _run(self, job_id: str, reached_forward: Callable[[], None]) -> RunResult:
        job = self.jobs.claim(job_id)
        if job is None:
            self._skipped(job_id)
            return RunResult(status=None)
        log.info("job %s claimed (attempt %d)", job_id, job.attempts)
        if job.attempts == 1:
            self._emit(job, "start")
        written: list[str] = []
        try:
            return self._process(job, written, reached_forward)
        except JobCanceled:
            self._cleanup(job_id, written)
            log.info("job %s canceled while running; outputs removed", job_id)
            observe_job({}, "canceled")
            self._emit_canceled(job_id)
            return RunResult(status=JobStatus.CANCELED)
        except FaceparseError as exc:
            self._cleanup(job_id, written)
            if exc.retryable and job.attempts <= self.settings.max_retries:
                delay = min(RETRY_BACKOFF_MAX_S, RETRY_BACKOFF_BASE_S * 2 ** (job.attempts - 1))
                delay = random.uniform(delay / 2, delay)
                log.warning("job %s transient %s (attempt %d), retrying in %.1fs: %s",
                            job_id, exc.code, job.attempts, delay, exc.message)
                self.jobs.update(job_id, error=exc.to_dict())
                return RunResult(status=JobStatus.PROCESSING, retry_in=delay, error_code=exc.code)
            return self._fail(job_id, exc.code, exc.message)
        except Exception as exc:  # the one boundary: anything unexpected fails this job only
            log.exception("job %s failed with an unexpected error", job_id)
            self._cleanup(job_id, written)
            return self._fail(job_id, "internal_error", f"{type(exc).__name__}: {exc}")

    # --- the stages ---------------------------------------------------------------------
    @contextmanager
    def _admitted(self) -> Iterator[Callable[[], None]]:
        if self._admission is None:
            yield lambda: None
            return
        with self._admission.enter() as reached_forward:
            yield reached_forward

    def _process(self, job: Job, written: list[str], reached_forward: Callable[[], None]) -> RunResult:
        from storage.inputs import read_input
        from worker.decode import decode_image
        from worker.outputs import encode_outputs

        stages = _Stages()
        t_start = time.perf_counter()
        # To the first start (claim sets started_at once): retries do not count as queueing.
        started = _parse_ts(job.started_at) if job.started_at else datetime.now(UTC)
        queue_ms = max(0.0, (started - _parse_ts(job.created_at)).total_seconds() * 1000)
        settings = self.settings

        data = read_input(job.input, self.store, max_bytes=settings.max_upload_bytes,
                          timeout=settings.fetch_timeout_s, allow_private=settings.webhook_allow_private,
                          allowed_buckets=settings.allowed_buckets())
        t = stages.timed("fetch_ms", t_start)
        image = decode_image(data, settings.max_pixels)
        t = stages.timed("decode_ms", t)
        self._check_not_canceled(job.id)

        parser = self._parser()
        mask, batch = self._infer(parser, image, reached_forward)
        t = stages.timed("inference_ms", t)

        summary = self._summary(job, mask, parser)
        prefix = job.output_prefix or keys.job_output_prefix(settings.storage_url, job.id)
        self._check_not_canceled(job.id)
        files = encode_outputs(image, mask, summary, list(job.requested_outputs))
        outputs: dict[str, Any] = {}
        for name, (payload, content_type) in files.items():
            url = keys.output_url(prefix, name)
            self.store.put(url, payload, content_type)
            written.append(url)
            _add_output(outputs, name, url)
        stages.timed("upload_ms", t)

        metrics = {"queue_ms": round(queue_ms, 2), **stages.ms,
                   "total_ms": round((time.perf_counter() - t_start) * 1000.0, 2),
                   # Which process ran it: lets operators (and tests) see how work spreads.
                   "worker_pid": float(os.getpid()),
                   # The forward pass this job rode in: its size, and the wait for it to start.
                   **batch}
        done = self.jobs.transition(job.id, JobStatus.SUCCEEDED, outputs=outputs, summary=summary,
                                    metrics=metrics, error=None, model=parser.model_name)
        if done is None:
            # Canceled (terminal) between the last check and now: the cancel wins.
            raise JobCanceled(job.id)
        observe_job(metrics, "succeeded")
        log.info("job %s succeeded in %.0f ms", job.id, metrics["total_ms"])
        self._emit(done, "completed")
        return RunResult(status=JobStatus.SUCCEEDED)

    def _infer(self, parser: FaceParser, image: Any, reached_forward: Callable[[], None]
               ) -> tuple[Any, dict[str, float]]:
        """The image's mask, and the figures of the forward pass it rode in."""
        pixels = parser.preprocess([image])
        batcher = self._batcher() if self._batcher is not None else None
        if batcher is None:
            reached_forward()
            logits = parser.forward(pixels)
            batch = {"batch_size": 1.0, "batch_wait_ms": 0.0}  # forward_ms: inference_ms holds it
            mask = parser.postprocess(logits, [(image.height, image.width)])[0]
        else:
            # The batcher's thread upsamples the logits to the image's size too (worker.batcher:
            # all of a process's torch work stays on that one thread).
            future = batcher.submit(pixels, (image.height, image.width))
            reached_forward()  # the device now has this image: the next job may be claimed
            # Bounded like the task itself, so a wedged device cannot hold the thread forever.
            result = future.result(timeout=self.settings.task_time_limit)
            mask = result.output
            batch = {"batch_size": float(result.batch_size), "batch_wait_ms": result.wait_ms,
                     "forward_ms": result.forward_ms}
        return mask, batch

    def _summary(self, job: Job, mask: Any, parser: FaceParser) -> dict[str, Any]:
        from worker.outputs import summarize, summary_document

        summary = summarize(mask, parser.id2label, random_weights=bool(parser.random_weights))
        # The stored summary is summary.json's document: the summary plus job_id and model.
        return summary_document(summary, job_id=job.id, model=parser.model_name)

    # --- helpers ------------------------------------------------------------------------
    def _skipped(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        log.info("job %s skipped: %s", job_id, "missing" if job is None else job.status.value)
        # The API cancels without notifying; the worker that drops the message of a job canceled
        # before it ever started sends its `completed` event (a redelivery of a job that ran is
        # silent: that job's worker already sent it).
        if job is not None and job.status == JobStatus.CANCELED and job.attempts == 0:
            self._emit(job, "completed")

    def _emit_canceled(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is not None and job.status == JobStatus.CANCELED:
            self._emit(job, "completed")

    def _check_not_canceled(self, job_id: str) -> None:
        current = self.jobs.get(job_id)
        if current is None or current.status.is_terminal():
            raise JobCanceled(job_id)

    def _fail(self, job_id: str, code: str, message: str) -> RunResult:
        failed = self.jobs.transition(job_id, JobStatus.FAILED, error={"code": code, "message": message})
        if failed is None:  # already terminal (canceled): leave it
            return RunResult(status=JobStatus.CANCELED, error_code=code)
        observe_job(failed.metrics, "failed")
        log.info("job %s failed: %s: %s", job_id, code, message)
        self._emit(failed, "completed")
        return RunResult(status=JobStatus.FAILED, error_code=code)

    def _cleanup(self, job_id: str, written: list[str]) -> None:
        for url in written:
            try:
                self.store.delete(url)
            except FaceparseError as exc:  # best effort: the job's state is what matters
                log.warning("job %s: could not delete %s: %s", job_id, url, exc.message)
        written.clear()

    def _emit(self, job: Job, event: str) -> None:
        # `notify` swallows (and logs) broker errors itself: a webhook never fails the job.
        self.notify(job, event)


def _add_output(outputs: dict[str, Any], name: str, url: str) -> None:
    """Map a file name from `encode_outputs` to the job's `outputs` shape."""
    if name.startswith("masks/"):
        label = name.removeprefix("masks/").removesuffix(".png")
        outputs.setdefault("masks", {})[label] = {"key": url}
    else:
        outputs[name.rsplit(".", 1)[0]] = {"key": url}
