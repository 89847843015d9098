"""Dynamic batching: the Batcher and Admission alone, then a real worker process batching jobs."""

from __future__ import annotations

import base64
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from storage.jobs import Job
from storage.jobstore import JobStore
from storage.queue import PARSE_QUEUE, PARSE_TASK, make_celery
from tests.fixtures.stack import MODEL_LOADED_RE, png_bytes, stack_env, start_worker, wait_until
from worker.batcher import Admission, Batcher
from worker.pipeline import FaceParser


class RecordingForward:
    """A stand-in forward pass: records batch sizes; an image whose pixels are all -1 fails."""

    def __init__(self, delay: float = 0.0) -> None:
        self.sizes: list[int] = []
        self.delay = delay
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        self.release.wait(10)
        self.sizes.append(pixels.shape[0])
        if bool((pixels.flatten(1) == -1).all(1).any()):
            raise RuntimeError("poisoned image")
        time.sleep(self.delay)
        return pixels.mean(dim=1, keepdim=True) * 2  # (B, 1, H, W): per-image, checkable


def _pixels(value: float) -> torch.Tensor:
    return torch.full((1, 3, 4, 4), float(value))


def test_waiting_requests_share_one_forward_up_to_max_batch() -> None:
    forward = RecordingForward()
    forward.release.clear()  # hold the first forward so the others queue up behind it
    batcher = Batcher(forward, max_batch=3, wait_ms=0)
    try:
        futures = [batcher.submit(_pixels(0))]
        assert forward.entered.wait(5)
        futures += [batcher.submit(_pixels(i)) for i in range(1, 7)]
        forward.release.set()
        results = [f.result(timeout=10) for f in futures]
    finally:
        batcher.close()
    # The first request went alone (nothing else was queued yet); the rest came in batches of <= 3.
    assert forward.sizes == [1, 3, 3], forward.sizes
    for i, result in enumerate(results):
        assert torch.equal(result.logits, torch.full((1, 4, 4), 2.0 * i))  # each caller got its own row
    assert [r.batch_size for r in results[1:4]] == [3, 3, 3]


def test_a_lone_request_waits_at_most_batch_wait_ms() -> None:
    forward = RecordingForward()
    batcher = Batcher(forward, max_batch=8, wait_ms=150)
    try:
        start = time.perf_counter()
        result = batcher.run(_pixels(1))
        waited = time.perf_counter() - start
        # A second request inside the window rides along in the same forward pass.
        first = batcher.submit(_pixels(2))
        time.sleep(0.02)
        second = batcher.submit(_pixels(3))
        pair = first.result(timeout=5), second.result(timeout=5)
    finally:
        batcher.close()
    assert result.batch_size == 1 and 0.1 <= waited < 2.0, waited
    assert [r.batch_size for r in pair] == [2, 2]
    assert forward.sizes == [1, 2]


def test_one_bad_image_never_fails_its_batch_mates() -> None:
    forward = RecordingForward()
    forward.release.clear()
    seen: list[tuple[int, float]] = []
    batcher = Batcher(forward, max_batch=4, wait_ms=0, on_batch=lambda size, s: seen.append((size, s)))
    try:
        blocker = batcher.submit(_pixels(0))
        assert forward.entered.wait(5)
        futures = [batcher.submit(_pixels(v)) for v in (1, -1, 3)]
        forward.release.set()
        blocker.result(timeout=10)
        good_a, bad, good_b = futures
        assert torch.equal(good_a.result(timeout=10).logits, torch.full((1, 4, 4), 2.0))
        assert good_a.result().forward_ms >= 0 and good_a.result().batch_size == 1
        assert torch.equal(good_b.result(timeout=10).logits, torch.full((1, 4, 4), 6.0))
        with pytest.raises(RuntimeError, match="poisoned"):
            bad.result(timeout=10)
    finally:
        batcher.close()
    # The batch of three failed, then ran one by one; the metrics hook saw every forward pass
    # that succeeded (the blocker's and the two good images'), with its time.
    assert forward.sizes == [1, 3, 1, 1, 1]
    assert [size for size, _ in seen] == [1, 1, 1]
    assert all(seconds >= 0 for _, seconds in seen)
    assert not batcher.busy


def test_finish_runs_on_the_batcher_thread_and_fails_only_its_own_image() -> None:
    forward = RecordingForward()
    forward.release.clear()
    threads: set[str] = set()

    def finish(logits: torch.Tensor, meta: str) -> str:
        threads.add(threading.current_thread().name)
        if meta == "bad":
            raise ValueError("cannot finish this one")
        return f"{meta}:{logits.mean().item():g}"

    batcher = Batcher(forward, max_batch=4, wait_ms=0, finish=finish)
    try:
        blocker = batcher.submit(_pixels(0), "first")
        assert forward.entered.wait(5)
        good, bad, other = (batcher.submit(_pixels(v), meta) for v, meta in ((1, "a"), (2, "bad"), (3, "b")))
        forward.release.set()
        assert blocker.result(timeout=10).output == "first:0"
        assert (good.result(timeout=10).output, other.result(timeout=10).output) == ("a:2", "b:6")
        assert good.result().batch_size == 3  # the failed finish did not take its batch-mates down
        with pytest.raises(ValueError, match="cannot finish"):
            bad.result(timeout=10)
    finally:
        batcher.close()
    assert threads == {"faceparse-batcher"}


def test_images_of_different_sizes_batch_together_with_the_same_logits(tiny_parser: FaceParser) -> None:
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")
              for h, w in ((40, 30), (512, 512), (333, 517), (17, 900))]
    alone = [tiny_parser.forward(tiny_parser.preprocess([im]))[0] for im in images]
    pixels = [tiny_parser.preprocess([im]) for im in images]
    # A long window: the first request waits for the other three, which arrive at once.
    batcher = Batcher(tiny_parser.forward, max_batch=4, wait_ms=2000)
    try:
        futures = [batcher.submit(px) for px in pixels]
        results = [f.result(timeout=30) for f in futures]
    finally:
        batcher.close()
    assert [r.batch_size for r in results] == [4, 4, 4, 4]
    for got, want in zip(results, alone, strict=True):
        torch.testing.assert_close(got.logits, want, rtol=1e-4, atol=1e-5)


def test_admission_holds_a_claim_while_the_device_idles_behind_io() -> None:
    busy = {"device": False}
    admission = Admission(lambda: busy["device"], grace_s=0.5, poll_s=0.01)
    assert admission.may_start()
    with admission.enter() as reached_forward:
        # One job is in its fetch and the device is idle: the next one waits (its job stays queued).
        assert not admission.may_start()
        busy["device"] = True  # the device got work: more images may join its next batch
        assert admission.may_start()
        busy["device"] = False
        reached_forward()
        assert admission.may_start()  # nothing is before the forward pass any more
    with admission.enter():
        start = time.monotonic()
        with admission.enter():  # only after the grace period: a stuck fetch cannot idle the device
            waited = time.monotonic() - start
    assert 0.4 <= waited < 3.0, waited


# --- a real worker process ----------------------------------------------------------------------
def _data_url(seed: int, width: int, height: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(width, height, seed=seed)).decode()


def test_a_worker_batches_queued_jobs_and_isolates_a_bad_one(
        redis_url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    storage = tmp_path / "data"
    storage.mkdir()
    env = stack_env(redis_url=redis_url, storage_url=f"file://{storage}", model_dir=tiny_model_dir, s3_env={},
                    FACEPARSE_MAX_BATCH="4", FACEPARSE_BATCH_WAIT_MS="300", FACEPARSE_WORKER_SLOTS="8")
    jobs = JobStore.from_url(redis_url)
    app = make_celery(redis_url)
    # Queued before the worker starts: its slots take them together and their forwards meet.
    ids = []
    sizes = [(40 + 7 * i, 30 + 5 * i) for i in range(7)]
    inputs = [_data_url(300 + i, w, h) for i, (w, h) in enumerate(sizes)]
    inputs.insert(3, "data:image/png;base64," + base64.b64encode(b"not an image at all").decode())
    for data in inputs:
        job, _ = jobs.create(Job(input=data, requested_outputs=["mask", "summary"]))
        app.send_task(PARSE_TASK, args=[job.id], queue=PARSE_QUEUE)
        ids.append(job.id)
    worker = start_worker(f"batching-{uuid.uuid4().hex[:6]}", env, tmp_path, queues=PARSE_QUEUE)
    try:
        def all_done() -> list[Job] | None:
            got = [jobs.get(i) for i in ids]
            return got if all(j is not None and j.status.is_terminal() for j in got) else None

        done = wait_until(all_done, timeout=120, what="the batched jobs")
        bad = done.pop(3)
        assert bad.status.value == "failed" and bad.error is not None and bad.attempts == 1
        assert bad.error.code in ("invalid_image", "unsupported_format"), bad.error
        assert {j.status.value for j in done} == {"succeeded"}, [j.error for j in done]
        for job, (w, h) in zip(done, sizes, strict=True):
            mask = np.asarray(Image.open(storage / "jobs" / job.id / "mask.png"))
            assert mask.shape == (h, w)  # each job's mask at its own size, whatever its batch
            assert job.summary["image"] == {"width": w, "height": h}
        batch_sizes = [int(j.metrics["batch_size"]) for j in done]
        assert max(batch_sizes) >= 2 and all(1 <= b <= 4 for b in batch_sizes), batch_sizes
        assert {int(j.metrics["worker_pid"]) for j in done} == {worker.pid}
        loads = MODEL_LOADED_RE.findall(worker.log())
        assert loads == [(str(worker.pid), "1")]
    finally:
        assert worker.stop() in (0, -15), worker.log()[-2000:]
