"""Leases on running jobs, and the reaper that brings back the jobs of dead workers.

With late acks on Redis, the message of a worker killed outright (`kill -9`, OOM, a lost node)
stays in kombu's `unacked` hash until the visibility timeout, an hour. The job record, not the
broker, says who is running what:

- A worker holds a lease per job whose message it took (`storage.keys.lease_key`,
  `SET PX lease_seconds`): `taken:<host>/<task id>` from the moment the message is received
  (`task_received`: a threads pool holds several messages before it starts them), then
  `<host>/<pid>/<task id>` when the task starts (`task_prerun`) and, atomically, at
  `JobStore.claim`. One heartbeat thread per process renews them every lease/3 s; the lease
  goes when the task ends (`task_postrun`). A task that ends in a retry leaves a
  `retry:<task id>` lease for the countdown, which only that retry may take.
- A reaper thread in every worker process (one scan per interval across the fleet, by a
  `SET NX PX` lock) finds `processing` jobs whose lease is gone, and re-enqueues them (the job
  goes back to `queued`), or fails them with `worker_lost` once their worker was lost
  `max_attempts` times. Jobs whose message a worker took but never claimed (the lease is also
  indexed in `leased_jobs_key`) are re-enqueued too, without counting an attempt.
- A claim refuses while another owner holds the lease, so a second message for a job (a
  redelivery, a prefork requeue, a reaper's re-enqueue racing a slow worker) never runs it
  twice at once; it also fails a job already started `max_attempts + max_retries` times
  (covers loops the reaper never sees, such as prefork's requeue on a killed child).

Everything hangs off Celery signals (`install_lease`), so the tasks and `JobRunner` do not
change; the handlers run in the thread that runs the task (solo and threads pools alike).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from celery import states
from celery.signals import task_postrun, task_prerun, task_received, worker_ready
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from storage import keys
from storage.errors import Unavailable
from storage.jobs import Job, JobStatus
from storage.jobstore import RETRY_LEASE_PREFIX, TAKEN_LEASE_PREFIX, ClaimScope, JobStore, claim_scope
from storage.queue import (
    PARSE_QUEUE,
    PARSE_TASK,
    drop_unacked,
    parse_job_ids_unacked,
    parse_job_ids_waiting,
    unacked_parse_messages,
)

if TYPE_CHECKING:
    from contextvars import Token

    from celery import Celery

    from worker.celery_app import WorkerContext

log = logging.getLogger(__name__)

# Faults of Redis (job store and broker alike) that a background thread outlives: it logs and
# tries again next tick.
_TRANSIENT = (Unavailable, RedisError, OperationalError, OSError)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def lease_owner(task_id: str) -> str:
    """The lease value of one run: which host, process and Celery task holds it."""
    return f"{socket.gethostname()}/{os.getpid()}/{task_id}"


def retry_marker(task_id: str) -> str:
    """The lease a task leaves while its retry waits; only that retry (same task id) takes it."""
    return f"{RETRY_LEASE_PREFIX}{task_id}"


def taken_marker(task_id: str) -> str:
    """The lease on a message this host received and has not started yet (any process may start it)."""
    return f"{TAKEN_LEASE_PREFIX}{socket.gethostname()}/{task_id}"


class LeaseKeeper:
    """The leases one worker process holds, renewed by one heartbeat thread of that process."""

    def __init__(self, jobs: Callable[[], JobStore], lease_s: float) -> None:
        if lease_s <= 0:
            raise ValueError("lease seconds must be positive")
        self._jobs = jobs
        self.lease_ms = max(1, int(lease_s * 1000))
        self.interval_s = lease_s / 3
        self._held: dict[str, str] = {}  # job id -> owner
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._stop = threading.Event()

    def hold(self, job_id: str, owner: str, *, takeover: tuple[str, ...] = ()) -> str | None:
        """Take the job's lease; returns None, or the other owner holding it (then claim refuses)."""
        self._ensure_heartbeat()
        # Tracked even when another holds it: should that one expire, the claim takes the lease
        # and this process must renew it from then on.
        with self._lock:
            self._held[job_id] = owner
        return self._jobs().acquire_lease(job_id, owner, self.lease_ms, takeover=takeover)

    def release(self, job_id: str, owner: str, *, keep_as: str | None = None, keep_s: float = 0.0) -> None:
        """Stop renewing the lease and drop it, or leave `keep_as` for `keep_s` plus one lease."""
        with self._lock:
            if self._held.get(job_id) == owner:
                del self._held[job_id]
        keep_ms = int(keep_s * 1000) + self.lease_ms if keep_as is not None else None
        self._jobs().release_lease(job_id, owner, keep_as=keep_as, keep_ms=keep_ms)

    def held(self) -> dict[str, str]:
        """A copy of the leases this process holds (job id -> owner)."""
        with self._lock:
            return dict(self._held)

    def renew(self) -> list[str]:
        """Extend every lease held; returns the ids whose lease another owner holds now."""
        held = self.held()
        lost = self._jobs().renew_leases(held, self.lease_ms)
        with self._lock:
            for job_id in lost:
                if self._held.get(job_id) == held[job_id]:
                    del self._held[job_id]
        for job_id in lost:
            if held[job_id].startswith(TAKEN_LEASE_PREFIX):
                continue  # a prefork child started it and holds it now: as intended
            # Another owner has it: this process stalled past its lease (or never got it) and the
            # job may run elsewhere too. Terminal states stay final; outputs are the same bytes.
            log.warning("job %s: lease not renewed, held by %s", job_id, self._jobs().lease_owner(job_id))
        return lost

    def _ensure_heartbeat(self) -> None:
        # One thread per process; a forked child starts its own (threads do not survive a fork).
        pid = os.getpid()
        with self._lock:
            if self._pid == pid:
                return
            if self._pid is not None:
                self._held.clear()  # the parent's leases are the parent's business
            self._pid = pid
        threading.Thread(target=self._beat, name="faceparse-lease-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.renew()
            except _TRANSIENT as exc:
                log.warning("lease heartbeat: %s", exc)

    def stop(self) -> None:
        """Stop the heartbeat thread (tests; a worker's daemon thread ends with its process)."""
        self._stop.set()


@dataclass
class ReapResult:
    """What one reaper pass did."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class Reaper:
    """Finds `processing` jobs whose worker is gone, and re-enqueues or fails them."""

    def __init__(self, jobs: Callable[[], JobStore], *, lease_s: float, interval_s: float, max_lost: int,
                 requeue: Callable[[str], None], notify: Callable[[Job, str], None]) -> None:
        if interval_s <= 0 or max_lost < 1:
            raise ValueError("the reaper needs a positive interval and max attempts")
        self._jobs = jobs
        self.lease_s = lease_s
        self.interval_s = interval_s
        self.max_lost = max_lost
        self.requeue = requeue
        self.notify = notify
        self.identity = f"{socket.gethostname()}/{os.getpid()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> ReapResult | None:
        """One pass, unless another process scanned within the interval (None then)."""
        # The lock is left to expire: one scan per interval across every worker, and a holder that
        # dies mid-scan costs one interval, not a stuck lock.
        ttl_ms = max(1, int(self.interval_s * 1000))
        if not self._jobs().redis.set(keys.reaper_lock_key(), self.identity, nx=True, px=ttl_ms):
            return None
        return self.reap_once()

    def reap_once(self) -> ReapResult:
        """Re-enqueue or fail every `processing` job without a lease (no lock)."""
        jobs = self._jobs()
        result = ReapResult()
        for job_id in jobs.unleased_processing():
            done = jobs.recover_lost(job_id, max_lost=self.max_lost, grace_s=self.lease_s)
            if done is None:
                continue
            if done.status == JobStatus.QUEUED:
                # Recorded first (queued, one more loss counted), sent next: a message consumed at
                # once finds the job queued; a failed send is retried below or by the next pass.
                log.warning("job %s: its worker was lost (attempt %d); re-enqueued", job_id, done.attempts)
                self._resend(jobs, job_id)
                result.requeued.append(job_id)
            elif done.status == JobStatus.FAILED:
                log.warning("job %s failed: %s", job_id, done.error.message if done.error else "worker lost")
                result.failed.append(job_id)
                self.notify(done, "completed")
        # Messages taken by a worker that died before claiming them (a threads pool takes several
        # and admits them one by one): the job is still `queued` but its message sits in the dead
        # worker's unacked set for the visibility timeout. Not an attempt: send it again.
        for job_id in jobs.unleased_taken():
            job = jobs.get(job_id)
            if job is not None and job.status == JobStatus.PROCESSING:
                continue  # the scan above owns it (within its grace period)
            if job is not None and job.status == JobStatus.QUEUED:
                if job_id not in result.requeued:
                    log.warning("job %s: taken by a worker lost before starting it; re-enqueued", job_id)
                    self._resend(jobs, job_id)
                    result.requeued.append(job_id)
            else:
                jobs.forget_taken(job_id)
        self._resend_stranded(jobs, result)
        self._resend_orphans(jobs, result)
        return result

    def _resend_orphans(self, jobs: JobStore, result: ReapResult) -> None:
        """Queued jobs with no message anywhere: a worker killed between popping a message from the
        queue and recording it as unacked takes the message with it. Checked cheaply first (more
        queued jobs than messages?), then by reading the queue."""
        queued_key = keys.status_jobs_key(JobStatus.QUEUED.value)
        unacked = parse_job_ids_unacked(jobs.redis)
        if jobs.redis.zcard(queued_key) <= jobs.redis.llen(PARSE_QUEUE) + len(unacked):
            return
        cutoff_ms = (time.time() - self.lease_s) * 1000  # younger ones may still be being enqueued
        old_enough = {_text(m) for m in jobs.redis.zrangebyscore(queued_key, "-inf", cutoff_ms)}
        candidates = old_enough - unacked - set(result.requeued)
        if candidates:
            candidates -= parse_job_ids_waiting(jobs.redis)
        for job_id in sorted(candidates):
            if jobs.lease_owner(job_id) is not None:
                continue  # a live worker holds it
            job = jobs.get(job_id)
            if job is None or job.status != JobStatus.QUEUED:
                continue  # expired, or moved on since the read above
            log.warning("job %s: queued with no message anywhere; re-enqueued", job_id)
            if self._send_again(job_id):
                result.requeued.append(job_id)

    def _resend_stranded(self, jobs: JobStore, result: ReapResult) -> None:
        """Queued jobs whose message sits unacked with no lease anywhere: taken by a worker that
        lost it (its broker connection dropped with Redis, or it died before it could lease it).
        Sent again, and the stale copy dropped so the transport does not redeliver it in an hour."""
        for tag, job_id in unacked_parse_messages(jobs.redis, older_than_s=self.lease_s):
            if job_id in result.requeued:
                drop_unacked(jobs.redis, tag)  # sent again above: this copy is dead weight
                continue
            if jobs.lease_owner(job_id) is not None:
                continue  # a live worker holds it
            job = jobs.get(job_id)
            if job is not None and job.status == JobStatus.QUEUED:
                log.warning("job %s: its message was stranded unacked; re-enqueued", job_id)
                if not self._send_again(job_id):
                    continue  # the copy stays until a send succeeds
                result.requeued.append(job_id)
            if job is None or job.status != JobStatus.PROCESSING:
                # Sent again, finished, or expired: the copy is dead weight. A processing job's
                # message is left to the worker that runs it (or to the scan above).
                drop_unacked(jobs.redis, tag)

    def _resend(self, jobs: JobStore, job_id: str) -> None:
        # On a failed send the job stays indexed as taken without a lease: the next pass sends it again.
        if self._send_again(job_id):
            jobs.forget_taken(job_id)

    def _send_again(self, job_id: str) -> bool:
        """Send the job's parse message again; False (logged) when the broker cannot take it now."""
        try:
            self.requeue(job_id)
        except (OperationalError, RedisError, OSError) as exc:
            log.warning("job %s: could not re-enqueue it yet: %s", job_id, exc)
            return False
        return True

    def start(self) -> None:
        """Run `tick` every interval in a daemon thread of this process."""
        if self._thread is not None and self._thread.is_alive():
            return
        self.identity = f"{socket.gethostname()}/{os.getpid()}"
        self._thread = threading.Thread(target=self._loop, name="faceparse-reaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread after its current pass."""
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except _TRANSIENT as exc:
                log.warning("reaper: %s", exc)


@dataclass
class _Run:
    job_id: str
    owner: str
    scope: ClaimScope
    token: Token[ClaimScope | None]


def _retry_delay_s(retval: Any) -> float:
    """Seconds until a retried task runs again, from the `Retry` Celery hands to `task_postrun`."""
    when = getattr(retval, "when", None)
    if isinstance(when, int | float):
        return max(0.0, float(when))
    if isinstance(when, datetime):
        aware = when if when.tzinfo else when.replace(tzinfo=UTC)
        return max(0.0, (aware - datetime.now(UTC)).total_seconds())
    return 0.0


def install_lease(app: Celery, ctx: WorkerContext) -> tuple[LeaseKeeper, Reaper]:
    """Hold leases around the app's parse tasks and run a reaper in the worker's main process."""
    settings = ctx.settings
    keeper = LeaseKeeper(lambda: ctx.jobs, settings.lease_seconds)

    def requeue(job_id: str) -> None:
        app.send_task(PARSE_TASK, args=[job_id], queue=PARSE_QUEUE)

    def notify(job: Job, event: str) -> None:
        from worker.tasks import enqueue_webhook

        enqueue_webhook(app, job, event)

    reaper = Reaper(lambda: ctx.jobs, lease_s=settings.lease_seconds,
                    interval_s=settings.reaper_interval_seconds, max_lost=settings.max_attempts,
                    requeue=requeue, notify=notify)
    runs: dict[str, _Run] = {}
    runs_lock = threading.Lock()

    def _ours(task: Any) -> bool:
        return task is not None and getattr(task, "name", None) == PARSE_TASK and task.app is app

    @task_prerun.connect(weak=False)
    def _lease_on_start(task_id: str = "", task: Any = None, args: Any = None, **_: Any) -> None:
        if not _ours(task) or not args:
            return
        job_id, owner = str(args[0]), lease_owner(task_id)
        scope = ClaimScope(owner=owner, lease_ms=keeper.lease_ms,
                           takeover=(taken_marker(task_id), retry_marker(task_id)),
                           # Every start counts here, transient retries included, so the ceiling
                           # leaves room for all of them on top of the lost workers.
                           max_attempts=settings.max_attempts + settings.max_retries)
        with runs_lock:
            runs[task_id] = _Run(job_id, owner, scope, claim_scope.set(scope))
        try:
            other = keeper.hold(job_id, owner, takeover=scope.takeover)
        except _TRANSIENT as exc:
            log.warning("job %s: could not take its lease: %s", job_id, exc)
            return
        if other is not None:
            log.warning("job %s: another run holds its lease (%s); this one will not claim it", job_id, other)

    @task_received.connect(weak=False)
    def _lease_on_receipt(sender: Any = None, request: Any = None, **_: Any) -> None:
        # In the consumer's process, before the pool starts the task: covers the time a message
        # waits for a thread (or for its retry countdown) in a worker that may die meanwhile.
        if getattr(sender, "app", None) is not app or getattr(request, "name", None) != PARSE_TASK:
            return
        args = getattr(request, "args", None)
        if not args:
            return
        task_id = str(request.id)
        try:
            keeper.hold(str(args[0]), taken_marker(task_id), takeover=(retry_marker(task_id),))
        except _TRANSIENT as exc:
            log.warning("job %s: could not take its lease on receipt: %s", args[0], exc)

    @task_postrun.connect(weak=False)
    def _lease_on_end(task_id: str = "", task: Any = None, state: str | None = None, retval: Any = None,
                      **_: Any) -> None:
        if not _ours(task):
            return
        with runs_lock:
            run = runs.pop(task_id, None)
        if run is None:
            return
        try:
            claim_scope.reset(run.token)
        except ValueError:  # a pool that ran the end in another context: drop it by hand
            claim_scope.set(None)
        try:
            if state == states.RETRY:
                keeper.release(run.job_id, run.owner, keep_as=retry_marker(task_id),
                               keep_s=_retry_delay_s(retval))
            else:
                keeper.release(run.job_id, run.owner)
        except _TRANSIENT as exc:
            # It expires by itself; the reaper then finds the job finished, or recovers it.
            log.warning("job %s: could not release its lease: %s", run.job_id, exc)
        if run.scope.failed is not None:
            notify(run.scope.failed, "completed")

    @worker_ready.connect(weak=False)
    def _start_reaper(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            reaper.start()

    return keeper, reaper
