"""The job record store in Redis: the source of truth for a job's status.

Layout (every key from `storage.keys`):
- `job_key(id)`: the job as JSON (`Job.model_dump_json`), expiring `ttl_seconds` after creation.
- `tenant_jobs_key(tenant)`: sorted set of the tenant's job ids scored by creation time (ms);
  ids whose record expired are trimmed lazily.
- `status_jobs_key(status)`: one sorted set per status, for cheap counts (/metrics).
- `idempotency_key(tenant, sha256(key))`: the job id created for an `Idempotency-Key`.
- `batch_key(id)`: a batch as JSON (tenant, creation time, job ids).
- `lease_key(id)`: the owner of the run in progress, expiring unless its worker renews it;
  `lost_key(id)`: how many times that owner was found gone (see `worker.lease`).

State changes are optimistic transactions (WATCH/MULTI) that re-read the record and refuse
to move a job out of a terminal state, so a redelivered message or a late retry cannot
resurrect a finished job.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from storage import keys
from storage.errors import InvalidInput, NotFound, Unavailable
from storage.jobs import Job, JobStatus, WebhookDelivery, new_id, utcnow

log = logging.getLogger(__name__)

DEFAULT_TTL_SECONDS = 7 * 24 * 3600
MAX_LIST_LIMIT = 1000
MAX_DELIVERIES_KEPT = 100  # a job's delivery log is bounded even if a receiver misbehaves forever
_SCAN_CHUNK = 200
_MAX_SCAN = 5000  # ids examined per list() call when filtering by status; the cursor continues
_WATCH_RETRIES = 50
_IMMUTABLE_FIELDS = frozenset({"id", "status", "created_at", "tenant"})

WORKER_LOST = "worker_lost"  # the error code of a job whose workers kept dying
RETRY_LEASE_PREFIX = "retry:"  # a lease kept for a job waiting for its retry: `retry:<task id>`
TAKEN_LEASE_PREFIX = "taken:"  # a lease on a message received but not started: `taken:<host>/<task id>`

# Take a lease that is free, ours already, or one of the values we may take over (our own
# message's `taken:` lease, the `retry:` lease our retry waited under).
# KEYS: lease, taken index; ARGV: owner, ttl ms, now ms, job id, takeover values...
# Returns 1 when held, 0 when another holds it.
_ACQUIRE_LUA = """
local v = redis.call('GET', KEYS[1])
local ok = (not v) or v == ARGV[1]
for i = 5, #ARGV do
  if v == ARGV[i] then ok = true end
end
if ok then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
  return 1
end
return 0
"""
# Extend (ARGV[2] ms) or replace (ARGV[3], when given) a lease only while ARGV[1] holds it.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] ~= '' then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('ZREM', KEYS[2], ARGV[2])
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_FORGET_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.call('ZREM', KEYS[2], ARGV[1]) end
return 0
"""


@dataclass
class ClaimScope:
    """What the task running a job tells `claim` without changing its callers (see `worker.lease`).

    Set for the duration of one parse task in the thread that runs it; explicit `claim` keywords
    win. `failed` is filled in when the claim itself failed the job, so the task can announce it.
    """

    owner: str | None = None  # the lease this run holds; claim refuses while another owner holds it
    lease_ms: int | None = None  # with owner: claim (re)takes the lease for this long
    takeover: tuple[str, ...] = ()  # lease values this run may take over (its `taken:`/`retry:` leases)
    max_attempts: int | None = None  # claims beyond this fail the job with `worker_lost`
    failed: Job | None = None
    refused_by: str | None = None  # the other owner when claim refused


claim_scope: ContextVar[ClaimScope | None] = ContextVar("faceparse_claim_scope", default=None)

P = ParamSpec("P")
R = TypeVar("R")


def _redis_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn a lost Redis connection into `Unavailable` (503 in the API, a retry in the worker)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise Unavailable(f"redis unavailable: {exc}", code="redis_unavailable") from exc

    return wrapper


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _created_ms(job: Job) -> int:
    """Creation time in epoch milliseconds (the sorted-set score)."""
    try:
        return int(datetime.fromisoformat(job.created_at).timestamp() * 1000)
    except ValueError:
        return int(time.time() * 1000)


def _age_s(ts: str) -> float:
    """Seconds since an ISO timestamp written by `utcnow` (0 when unparsable)."""
    try:
        then = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return (datetime.now(UTC) - then).total_seconds()


def encode_cursor(score: float, job_id: str) -> str:
    """An opaque list cursor pointing just after (score, job_id)."""
    raw = f"{int(score)}:{job_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """Inverse of encode_cursor; InvalidInput(code="invalid_cursor") on garbage."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score, sep, job_id = raw.partition(":")
        if not sep or not job_id:
            raise ValueError(raw)
        return int(score), job_id
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidInput("invalid cursor", code="invalid_cursor") from exc


def _apply_fields(job: Job, fields: dict[str, Any], *, allow_status: bool = False) -> Job:
    """A validated copy of `job` with `fields` set; unknown or immutable names are programming errors."""
    unknown = set(fields) - set(Job.model_fields)
    if unknown:
        raise TypeError(f"unknown Job fields: {sorted(unknown)}")
    frozen = set(fields) & (_IMMUTABLE_FIELDS - ({"status"} if allow_status else set()))
    if frozen:
        raise TypeError(f"Job fields cannot be changed this way: {sorted(frozen)}")
    data = job.model_dump()
    data.update(fields)
    return Job.model_validate(data)


class JobStore:
    """Jobs in Redis: create, read, list per tenant, and atomic state transitions."""

    def __init__(self, redis: redis.Redis, ttl_seconds: int = DEFAULT_TTL_SECONDS) -> None:
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        self.redis = redis
        self.ttl_seconds = ttl_seconds

    @classmethod
    def from_url(cls, redis_url: str, ttl_seconds: int = DEFAULT_TTL_SECONDS) -> JobStore:
        """A store on its own connection pool (safe to build after a fork)."""
        client = redis.Redis.from_url(
            redis_url,
            decode_responses=True,
            socket_connect_timeout=5,
            socket_timeout=10,
            health_check_interval=30,
        )
        return cls(client, ttl_seconds=ttl_seconds)

    def _cutoff_ms(self) -> int:
        """Records created before this have expired."""
        return int((time.time() - self.ttl_seconds) * 1000)

    # --- reads ------------------------------------------------------------------------------
    @_redis_errors
    def ping(self) -> None:
        """Raise Unavailable when Redis does not answer (for /readyz)."""
        self.redis.ping()

    @_redis_errors
    def get(self, job_id: str) -> Job | None:
        """The job, or None when it does not exist (or expired)."""
        raw = self.redis.get(keys.job_key(job_id))
        return None if raw is None else Job.model_validate_json(raw)

    def get_for_tenant(self, job_id: str, tenant: str) -> Job:
        """The tenant's job; NotFound when missing or another tenant's (never reveal which)."""
        job = self.get(job_id)
        if job is None or job.tenant != tenant:
            raise NotFound(f"job {job_id} not found")
        return job

    @_redis_errors
    def list(
        self,
        tenant: str,
        *,
        status: JobStatus | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> tuple[list[Job], str | None]:
        """The tenant's jobs, newest first, and the cursor of the next page (None at the end)."""
        limit = max(1, min(int(limit), MAX_LIST_LIMIT))
        wanted = JobStatus(status) if status is not None else None
        zkey = keys.tenant_jobs_key(tenant)
        self.redis.zremrangebyscore(zkey, "-inf", self._cutoff_ms())

        after = decode_cursor(cursor) if cursor else None
        jobs: list[Job] = []
        last: tuple[float, str] | None = None  # the last id consumed; the next page starts after it
        scanned = 0
        exhausted = False
        while len(jobs) < limit and scanned < _MAX_SCAN:
            # Re-anchor on the last id every chunk: new jobs arrive at the top and shift ranks.
            start = self._start_rank(zkey, last or after)
            chunk = self.redis.zrevrange(zkey, start, start + _SCAN_CHUNK - 1, withscores=True)
            if not chunk:
                exhausted = True
                break
            ids = [_text(member) for member, _ in chunk]
            raws = self.redis.mget([keys.job_key(i) for i in ids])
            expired: list[str] = []
            consumed = 0
            for (job_id, raw), (_, score) in zip(zip(ids, raws, strict=True), chunk, strict=True):
                consumed += 1
                scanned += 1
                if raw is None:
                    # Removed below, so it is no anchor for the next chunk.
                    expired.append(job_id)
                    continue
                last = (score, job_id)
                job = Job.model_validate_json(raw)
                if wanted is not None and job.status != wanted:
                    continue
                jobs.append(job)
                if len(jobs) >= limit:
                    break
            if expired:
                self.redis.zrem(zkey, *expired)
            if consumed == len(chunk) and len(chunk) < _SCAN_CHUNK:
                exhausted = True
                break
        if exhausted or last is None or self._start_rank(zkey, last) >= self.redis.zcard(zkey):
            return jobs, None
        return jobs, encode_cursor(*last)

    def _start_rank(self, zkey: str, after: tuple[float, str] | None) -> int:
        """The reverse rank just after `after` (0 without a cursor)."""
        if after is None:
            return 0
        score, job_id = after
        rank = self.redis.zrevrank(zkey, job_id)
        if rank is not None:
            return int(rank) + 1
        # The cursor's job expired meanwhile: continue after everything strictly newer than it
        # (a job created in the same millisecond may repeat; none is skipped).
        return int(self.redis.zcount(zkey, f"({int(score)}", "+inf"))

    @_redis_errors
    def counts_by_status(self) -> dict[str, int]:
        """How many live jobs are in each status (two cheap commands a status)."""
        cutoff = self._cutoff_ms()
        pipe = self.redis.pipeline(transaction=False)
        for st in JobStatus:
            pipe.zremrangebyscore(keys.status_jobs_key(st.value), "-inf", cutoff)
            pipe.zcard(keys.status_jobs_key(st.value))
        results = pipe.execute()
        return {st.value: int(results[2 * i + 1]) for i, st in enumerate(JobStatus)}

    # --- writes -----------------------------------------------------------------------------
    @_redis_errors
    def create(self, job: Job, idempotency_key: str | None = None,
               also: Callable[[Any], None] | None = None) -> tuple[Job, bool]:
        """Store a new job; with an idempotency key already used by the tenant, return that job and False.

        `also(pipe)` adds writes to the same transaction (the API's: the job's queue message), so
        they happen with the job's record or not at all; never for a replayed idempotency key.
        """
        if idempotency_key is None:
            pipe = self.redis.pipeline(transaction=True)
            self._queue_create(pipe, job)
            if also is not None:
                also(pipe)
            pipe.execute()
            return job, True

        digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
        ikey = keys.idempotency_key(job.tenant, digest)
        for _ in range(_WATCH_RETRIES):
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(ikey)
                    existing_id = pipe.get(ikey)
                    if existing_id is not None:
                        raw = pipe.get(keys.job_key(_text(existing_id)))
                        if raw is not None:
                            pipe.unwatch()
                            return Job.model_validate_json(raw), False
                        # The key outlived its job (both expire together, give or take): reuse it.
                    pipe.multi()
                    self._queue_create(pipe, job)
                    pipe.set(ikey, job.id, ex=self.ttl_seconds)
                    if also is not None:
                        also(pipe)
                    pipe.execute()
                    return job, True
                except WatchError:
                    continue  # another request with the same key won the race: read its job
        raise Unavailable("idempotency key under heavy contention", code="redis_unavailable")

    def _queue_create(self, pipe: Any, job: Job) -> None:
        score = _created_ms(job)
        zkey = keys.tenant_jobs_key(job.tenant)
        pipe.set(keys.job_key(job.id), job.model_dump_json(), ex=self.ttl_seconds)
        pipe.zadd(zkey, {job.id: score})
        # The index lives as long as its newest job; a dormant tenant leaves nothing behind.
        pipe.expire(zkey, self.ttl_seconds)
        pipe.zadd(keys.status_jobs_key(job.status.value), {job.id: score})

    def _mutate(self, job_id: str, change: Callable[[Job], Job | None]) -> Job | None:
        """Atomic read-modify-write: `change` returns the new job, or None to leave it untouched."""
        return self._mutate_with(job_id, (), lambda job, _values: change(job))

    def _mutate_with(
        self,
        job_id: str,
        watch: Sequence[str],
        change: Callable[[Job, list[str | None]], Job | None],
        also: Callable[[Any, Job, Job], None] | None = None,
    ) -> Job | None:
        """`_mutate` that also watches `watch` (their values go to `change`) and queues `also`'s writes."""
        jkey = keys.job_key(job_id)
        for _ in range(_WATCH_RETRIES):
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(jkey, *watch)
                    raw = pipe.get(jkey)
                    if raw is None:
                        pipe.unwatch()
                        return None
                    old = Job.model_validate_json(raw)
                    values = [None if v is None else _text(v) for v in (pipe.get(k) for k in watch)]
                    new = change(old, values)
                    if new is None:
                        pipe.unwatch()
                        return None
                    pipe.multi()
                    if also is not None:
                        also(pipe, old, new)
                    # KEEPTTL: a job expires ttl_seconds after creation, matching its index scores.
                    pipe.set(jkey, new.model_dump_json(), keepttl=True)
                    if new.status != old.status:
                        score = _created_ms(old)
                        pipe.zrem(keys.status_jobs_key(old.status.value), job_id)
                        pipe.zadd(keys.status_jobs_key(new.status.value), {job_id: score})
                    pipe.execute()
                    return new
                except WatchError:
                    continue
        raise Unavailable(f"job {job_id} under heavy contention", code="redis_unavailable")

    @_redis_errors
    def claim(self, job_id: str, *, max_attempts: int | None = None,
              lease_owner: str | None = None) -> Job | None:
        """queued|processing -> processing, attempts += 1; None when the job is terminal or missing.

        With `max_attempts`, a job already claimed that many times fails with `worker_lost`
        instead (None is returned). With `lease_owner`, the claim refuses (None) while another
        owner holds the job's lease, and takes the lease otherwise, atomically. Both default to
        the `claim_scope` the running task set, if any.
        """
        scope = claim_scope.get()
        if scope is not None:
            max_attempts = scope.max_attempts if max_attempts is None else max_attempts
            lease_owner = scope.owner if lease_owner is None else lease_owner
        lease_ms = (scope.lease_ms if scope is not None else None) or 60_000
        takeover = scope.takeover if scope is not None else ()
        lkey = keys.lease_key(job_id)
        refused: dict[str, str] = {}

        def change(job: Job, values: list[str | None]) -> Job | None:
            if job.status.is_terminal():
                return None
            if lease_owner is not None and values[0] not in (None, lease_owner, *takeover):
                refused["by"] = str(values[0])
                return None
            if max_attempts is not None and job.attempts >= max_attempts:
                return _apply_fields(job, {
                    "status": JobStatus.FAILED,
                    "completed_at": utcnow(),
                    "error": {"code": WORKER_LOST,
                              "message": f"the job was started {job.attempts} times without finishing "
                                         f"(at most {max_attempts}); its workers kept dying"},
                }, allow_status=True)
            return _apply_fields(
                job,
                {
                    "status": JobStatus.PROCESSING,
                    "attempts": job.attempts + 1,
                    # The first start: queue time is measured to it, retries do not reset it.
                    "started_at": job.started_at or utcnow(),
                },
                allow_status=True,
            )

        def take_lease(pipe: Any, _old: Job, new: Job) -> None:
            if lease_owner is not None and new.status == JobStatus.PROCESSING:
                pipe.set(lkey, lease_owner, px=lease_ms)
                pipe.zadd(keys.leased_jobs_key(), {job_id: int(time.time() * 1000)})

        watch = (lkey,) if lease_owner is not None else ()
        new = self._mutate_with(job_id, watch, change, take_lease)
        if refused:
            log.warning("job %s: not claimed, its lease is held by %s", job_id, refused["by"])
            if scope is not None:
                scope.refused_by = refused["by"]
            return None
        if new is not None and new.status == JobStatus.FAILED:
            log.warning("job %s failed: %s", job_id, new.error.message if new.error else WORKER_LOST)
            if scope is not None:
                scope.failed = new
            return None
        return new

    @_redis_errors
    def transition(self, job_id: str, to: JobStatus, **fields: Any) -> Job | None:
        """Move a job to `to` and set `fields` at once; None when missing or already terminal."""
        to = JobStatus(to)

        def change(job: Job) -> Job | None:
            if job.status.is_terminal():
                return None
            update: dict[str, Any] = {"status": to, **fields}
            if to.is_terminal():
                update.setdefault("completed_at", utcnow())
            elif to == JobStatus.PROCESSING and job.started_at is None:
                update.setdefault("started_at", utcnow())
            return _apply_fields(job, update, allow_status=True)

        if "status" in fields:
            raise TypeError("pass the new status as `to`, not as a field")
        return self._mutate(job_id, change)

    @_redis_errors
    def update(self, job_id: str, **fields: Any) -> Job | None:
        """Set non-status fields atomically (allowed on terminal jobs too); None when missing."""
        return self._mutate(job_id, lambda job: _apply_fields(job, fields))

    @_redis_errors
    def append_delivery(self, job_id: str, delivery: WebhookDelivery) -> Job | None:
        """Record a webhook delivery attempt; None when the job is missing (no webhook: unchanged)."""

        def change(job: Job) -> Job | None:
            if job.webhook is None:
                log.warning("delivery recorded for a job without a webhook", extra={"job_id": job_id})
                return job
            deliveries = [*job.webhook.deliveries, delivery][-MAX_DELIVERIES_KEPT:]
            webhook = job.webhook.model_copy(update={"deliveries": deliveries})
            return _apply_fields(job, {"webhook": webhook})

        return self._mutate(job_id, change)

    # --- leases of running jobs (driven by worker.lease) -------------------------------------
    @_redis_errors
    def acquire_lease(self, job_id: str, owner: str, ttl_ms: int, *,
                      takeover: Sequence[str] = ()) -> str | None:
        """Hold the job's lease as `owner` for `ttl_ms`; returns None, or the other owner holding it.

        A free lease, one `owner` holds already, or one holding a `takeover` value is taken.
        """
        lkey = keys.lease_key(job_id)
        held = self.redis.eval(_ACQUIRE_LUA, 2, lkey, keys.leased_jobs_key(), owner, int(ttl_ms),
                               int(time.time() * 1000), job_id, *takeover)
        if int(held):
            return None
        other = self.redis.get(lkey)
        return _text(other) if other is not None else ""

    @_redis_errors
    def renew_leases(self, held: dict[str, str], ttl_ms: int) -> list[str]:
        """Extend each job's lease still held by its owner (job id -> owner); returns the ids lost."""
        if not held:
            return []
        pipe = self.redis.pipeline(transaction=False)
        items = list(held.items())
        for job_id, owner in items:
            pipe.eval(_RENEW_LUA, 1, keys.lease_key(job_id), owner, int(ttl_ms), "")
        return [job_id for (job_id, _), ok in zip(items, pipe.execute(), strict=True) if not int(ok)]

    @_redis_errors
    def release_lease(self, job_id: str, owner: str, *, keep_as: str | None = None,
                      keep_ms: int | None = None) -> bool:
        """Drop the lease `owner` holds, or replace it by `keep_as` for `keep_ms`; False when not held."""
        lkey = keys.lease_key(job_id)
        if keep_as is not None:
            return bool(int(self.redis.eval(_RENEW_LUA, 1, lkey, owner, int(keep_ms or 1), keep_as)))
        return bool(int(self.redis.eval(_RELEASE_LUA, 2, lkey, keys.leased_jobs_key(), owner, job_id)))

    @_redis_errors
    def lease_owner(self, job_id: str) -> str | None:
        """Who holds the job's lease now (None: nobody)."""
        value = self.redis.get(keys.lease_key(job_id))
        return None if value is None else _text(value)

    @_redis_errors
    def unleased_processing(self, chunk: int = 500) -> list[str]:
        """Ids of jobs in `processing` whose lease is missing (their worker stopped renewing it)."""
        zkey = keys.status_jobs_key(JobStatus.PROCESSING.value)
        found: list[str] = []
        start = 0
        while True:
            ids = [_text(m) for m in self.redis.zrange(zkey, start, start + chunk - 1)]
            if not ids:
                return found
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.exists(keys.lease_key(job_id))
            found.extend(job_id for job_id, n in zip(ids, pipe.execute(), strict=True) if not n)
            start += chunk

    @_redis_errors
    def recover_lost(self, job_id: str, *, max_lost: int, grace_s: float,
                     dry_run: bool = False) -> Job | None:
        """A `processing` job without a lease: back to `queued`, or `failed` (`worker_lost`) when its
        worker was lost `max_lost` times. None when it is not lost (leased again, moved on, or
        started less than `grace_s` ago). `dry_run` returns what would happen and writes nothing.
        A job returned `queued` needs a new message, then `forget_taken`.
        """
        lkey, nkey = keys.lease_key(job_id), keys.lost_key(job_id)

        def change(job: Job, values: list[str | None]) -> Job | None:
            lease, lost = values
            if job.status != JobStatus.PROCESSING or lease is not None:
                return None
            if job.started_at is not None and _age_s(job.started_at) < grace_s:
                return None  # claimed by a worker that has not taken its lease yet
            times = int(lost or 0) + 1
            if times >= max_lost:
                return _apply_fields(job, {
                    "status": JobStatus.FAILED,
                    "completed_at": utcnow(),
                    "error": {"code": WORKER_LOST,
                              "message": f"the worker running this job was lost {times} times; giving up"},
                }, allow_status=True)
            return _apply_fields(job, {"status": JobStatus.QUEUED}, allow_status=True)

        def count(pipe: Any, _old: Job, new: Job) -> None:
            pipe.incr(nkey)
            pipe.expire(nkey, self.ttl_seconds)
            if new.status == JobStatus.QUEUED:
                # Indexed as taken-but-unleased until its new message is out (`forget_taken`):
                # should the send fail, the next pass sends it again.
                pipe.zadd(keys.leased_jobs_key(), {job_id: int(time.time() * 1000)})
            else:
                pipe.zrem(keys.leased_jobs_key(), job_id)

        if dry_run:
            raw = self.redis.get(keys.job_key(job_id))
            if raw is None:
                return None
            values = [None if v is None else _text(v) for v in self.redis.mget([lkey, nkey])]
            return change(Job.model_validate_json(raw), values)
        return self._mutate_with(job_id, (lkey, nkey), change, count)

    @_redis_errors
    def unleased_taken(self, limit: int = 1000) -> list[str]:
        """Ids whose message a worker took (lease taken) and whose lease is gone without a release."""
        ids = [_text(m) for m in self.redis.zrange(keys.leased_jobs_key(), 0, limit - 1)]
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.exists(keys.lease_key(job_id))
        return [job_id for job_id, n in zip(ids, pipe.execute(), strict=True) if not n]

    @_redis_errors
    def forget_taken(self, job_id: str) -> None:
        """Drop a job from the taken set once dealt with, unless a worker has leased it again."""
        self.redis.eval(_FORGET_LUA, 2, keys.lease_key(job_id), keys.leased_jobs_key(), job_id)

    @_redis_errors
    def lost_count(self, job_id: str) -> int:
        """How many times the job's worker was found lost."""
        return int(self.redis.get(keys.lost_key(job_id)) or 0)

    # --- batches ----------------------------------------------------------------------------
    @_redis_errors
    def create_batch(self, tenant: str, job_ids: Iterable[str], *, batch_id: str | None = None) -> str:
        """Record a batch of the tenant's jobs and return its id (pass `batch_id` to choose it first)."""
        batch_id = batch_id or new_id()
        record = {"id": batch_id, "tenant": tenant, "created_at": utcnow(), "job_ids": list(job_ids)}
        if not self.redis.set(keys.batch_key(batch_id), json.dumps(record), ex=self.ttl_seconds, nx=True):
            raise ValueError(f"batch {batch_id} already exists")
        return batch_id

    @_redis_errors
    def get_batch(self, batch_id: str, tenant: str) -> dict[str, Any]:
        """{"id", "created_at", "job_ids", "counts": {status: n}, "total"}; NotFound for another tenant's."""
        raw = self.redis.get(keys.batch_key(batch_id))
        if raw is None:
            raise NotFound(f"batch {batch_id} not found")
        record = json.loads(raw)
        if record.get("tenant") != tenant:
            raise NotFound(f"batch {batch_id} not found")
        job_ids: list[str] = record["job_ids"]
        counts = {st.value: 0 for st in JobStatus}
        for start in range(0, len(job_ids), 500):
            part = job_ids[start:start + 500]
            for raw_job in self.redis.mget([keys.job_key(i) for i in part]):
                if raw_job is not None:  # an expired job is counted in total only
                    counts[json.loads(raw_job)["status"]] += 1
        return {
            "id": batch_id,
            "created_at": record["created_at"],
            "job_ids": job_ids,
            "counts": counts,
            "total": len(job_ids),
        }
