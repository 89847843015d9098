"""Dynamic batching across jobs inside one worker process.

Each job runs in its own task thread (Celery's `threads` pool): it fetches, decodes and
preprocesses its image, then hands the pixel tensor to the process's one `Batcher`. The batcher's
thread owns the model's forward pass: it takes whatever requests are waiting, up to `max_batch`,
waits at most `wait_ms` for a batch to fill, runs one forward over all of them, then `finish`es
each image (the worker's: upsample + argmax to the image's own size) and gives each caller its
result through a Future. Encoding and uploading happen back in the callers' threads, so they
overlap with the next forward pass.

All of a worker's torch work runs on this one thread. On a CPU that matters: every thread that
runs a parallel torch op gets its own OpenMP team, and once a process has more OpenMP threads
than cores, libgomp stops spinning between parallel regions: the forward's threads sleep and
wake hundreds of times a second and the forward pass ran 10-30 % slower in a worker than alone
(docs/PERFORMANCE.md).

A failed forward never fails its batch-mates for another image's sake: a batch whose forward
raises is run again one image at a time, and only the image that fails on its own gets the error.

`Admission` decides when a task thread may claim its job. A job is claimed (and shows
`processing`) only when it can make progress soon: when nothing else in the process is still
before the forward pass, when the device has work (so more images can join its next batch), or
when the jobs ahead of it have been stuck in input I/O for longer than a grace period. Until then
its message waits, reserved, and the job stays `queued`, so a cancel drops it cleanly.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

# How long jobs stuck in input I/O may hold back the next job's claim while the device is idle.
ADMISSION_GRACE_S = 3.0


@dataclass
class BatchResult:
    """One image's share of a forward pass: its logits (L, h, w), what `finish` made of them
    (None without one) and the size of its batch."""

    logits: torch.Tensor
    output: Any
    batch_size: int
    wait_ms: float  # from submission to the start of its forward pass
    forward_ms: float  # the batch's forward pass, wall time


@dataclass
class _Request:
    pixels: torch.Tensor  # (3, H, W)
    meta: Any = None  # handed to `finish` with the image's logits
    future: Future[BatchResult] = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)


class Batcher:
    """Collects pixel tensors from many threads and runs the forward pass on batches of them.

    `forward` maps (B, 3, H, W) pixel values to (B, L, h, w) logits; `finish(logits, meta)`, when
    given, turns one image's logits (L, h, w) and the `meta` it was submitted with into its result,
    on the batcher's thread (an error there fails that image alone); `on_batch(size, seconds)` is
    called after each forward pass that succeeded (metrics). All images must share one (3, H, W)
    shape, which the pipeline's preprocessing guarantees (every image is resized to the model's
    input size).
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], *, max_batch: int,
                 wait_ms: float, finish: Callable[[torch.Tensor, Any], Any] | None = None,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self.wait_s = max(0.0, wait_ms) / 1000.0
        self._forward = forward
        self._finish = finish
        self._on_batch = on_batch
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0  # submitted, not yet in a forward pass
        self._running = 0  # images in the forward pass now
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="faceparse-batcher", daemon=True)
        self._thread.start()

    # --- callers' side --------------------------------------------------------------------
    def submit(self, pixels: torch.Tensor, meta: Any = None) -> Future[BatchResult]:
        """Queue one image's pixel values, (3, H, W) or (1, 3, H, W); its result arrives in the Future."""
        if pixels.dim() == 4:
            if pixels.shape[0] != 1:
                raise ValueError(f"submit one image at a time, got a batch of {pixels.shape[0]}")
            pixels = pixels[0]
        request = _Request(pixels, meta)
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._waiting += 1
        self._queue.put(request)
        return request.future

    def run(self, pixels: torch.Tensor, meta: Any = None) -> BatchResult:
        """Submit and wait for the result (re-raises the forward's error for this image)."""
        return self.submit(pixels, meta).result()

    @property
    def busy(self) -> bool:
        """True while images wait for, or are in, a forward pass."""
        with self._lock:
            return self._waiting + self._running > 0

    def close(self, timeout: float = 10.0) -> None:
        """Finish what was submitted, then stop the batcher's thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    # --- the batcher's thread -----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._collect(first)
            self._run_batch(batch)
            if stop:
                return

    def _collect(self, first: _Request) -> tuple[list[_Request], bool]:
        """Whatever is queued now, up to max_batch; then wait up to wait_s for the batch to fill."""
        batch = [first]
        deadline = time.perf_counter() + self.wait_s
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _run_batch(self, batch: list[_Request]) -> None:
        # A request whose caller gave up (future canceled) needs no forward pass.
        live = [r for r in batch if r.future.set_running_or_notify_cancel()]
        with self._lock:
            self._waiting -= len(batch)
            self._running += len(live)
        try:
            if live:
                self._forward_and_deliver(live)
        finally:
            with self._lock:
                self._running -= len(live)

    def _forward_and_deliver(self, batch: list[_Request]) -> None:
        started = time.perf_counter()
        try:
            logits = self._forward_batch(batch)
        except Exception as exc:  # handed to the callers, whose job boundary records it
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            # Never fail batch-mates for one image: run each alone; only a failing image fails.
            log.warning("forward of a batch of %d failed (%s: %s); running its images one by one",
                        len(batch), type(exc).__name__, exc)
            for request in batch:
                self._forward_and_deliver([request])
            return
        seconds = time.perf_counter() - started
        if self._on_batch is not None:
            self._on_batch(len(batch), seconds)
        for i, request in enumerate(batch):
            output = None
            if self._finish is not None:
                try:
                    output = self._finish(logits[i], request.meta)
                except Exception as exc:  # this image's own failure, handed to its caller
                    request.future.set_exception(exc)
                    continue
            request.future.set_result(BatchResult(
                logits=logits[i], output=output, batch_size=len(batch),
                wait_ms=round((started - request.submitted) * 1000.0, 2),
                forward_ms=round(seconds * 1000.0, 2)))

    def _forward_batch(self, batch: list[_Request]) -> torch.Tensor:
        pixels = torch.stack([r.pixels for r in batch]) if len(batch) > 1 else batch[0].pixels[None]
        logits = self._forward(pixels)
        if logits.shape[0] != len(batch):
            raise RuntimeError(f"forward returned {logits.shape[0]} logit maps for {len(batch)} images")
        return logits


class Admission:
    """When a task thread may claim its job (see the module docstring).

    `enter()` waits until the job may start and returns a context manager held while the job is
    before the forward pass (claim, fetch, decode, preprocess); `mark_submitted()` (or leaving the
    context) ends that phase. `device_busy` says whether the device has work now.
    """

    def __init__(self, device_busy: Callable[[], bool], *, grace_s: float = ADMISSION_GRACE_S,
                 poll_s: float = 0.05) -> None:
        self._device_busy = device_busy
        self.grace_s = grace_s
        self._poll_s = poll_s
        self._cond = threading.Condition()
        self._before_forward: dict[int, float] = {}  # ticket -> when it entered
        self._next = 0

    def may_start(self) -> bool:
        """True when a new job may be claimed now."""
        with self._cond:
            return self._may_start_locked()

    def _may_start_locked(self) -> bool:
        if not self._before_forward:
            return True
        if self._device_busy():
            return True
        oldest = min(self._before_forward.values())
        return time.monotonic() - oldest >= self.grace_s

    @contextmanager
    def enter(self) -> Iterator[Callable[[], None]]:
        """Wait for admission; yields `mark_submitted`, to call when the job's image reaches the batcher."""
        with self._cond:
            # The device's state changes without telling us: poll it while waiting.
            while not self._may_start_locked():
                self._cond.wait(self._poll_s)
            ticket = self._next
            self._next += 1
            self._before_forward[ticket] = time.monotonic()

        def mark_submitted() -> None:
            with self._cond:
                if self._before_forward.pop(ticket, None) is not None:
                    self._cond.notify_all()

        try:
            yield mark_submitted
        finally:
            mark_submitted()
