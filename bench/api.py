"""Benchmark: the API's submission rate and status latency, against raw Celery in the same run.

    python -m bench.api --clients 8 --requests 2000

1. POST /v1/jobs (JSON, an s3:// input) from `--clients` concurrent clients (threads of this
   process, `http.client`), `--requests` in all, to the API under gunicorn (`--api-workers`
   processes); no worker consumes, so the queue only grows.
2. The same number of raw `send_task("faceparse.parse", [id])` calls from one producer process, on
   the same Redis: the floor a Celery producer has to pay. The process runs them from one thread
   and from `--clients` threads (the GIL makes more threads slower); the faster is the bar.
   Ratio: API rate / raw rate (goal >= 0.5).
3. GET /v1/jobs/{id} of the jobs just made, from the same number of concurrent clients: p50 and
   p99 latency under that load (goal: p99 <= 10 ms).
4. For context, raw `send_task` from `--api-workers` producer processes at once (every core on
   enqueueing, no HTTP, no client): printed with its ratio, not the goal's bar.

Rate limiting is off for the run (FACEPARSE_RATE_LIMIT_PER_MINUTE=0).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import API_KEYS, BUCKET, TENANT, Services, load, say


class _Http:
    """One client's connection: `http.client`, kept open while the server allows (gunicorn's sync
    workers close after each response; then it reconnects). The load generator runs on the same
    2 cores as the API, so it must be lean: `requests` costs about 0.5 ms of CPU a call, more than
    a third of what the API spends on a POST."""

    def __init__(self, api_url: str) -> None:
        url = urlsplit(api_url)
        self._conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        self._headers = {"Authorization": f"Bearer {API_KEYS[TENANT]}", "Content-Type": "application/json"}

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
        payload = json.dumps(body).encode() if body is not None else None
        self._conn.request(method, path, body=payload, headers=self._headers)
        response = self._conn.getresponse()
        data = response.read()
        if response.will_close:
            self._conn.close()
        return response.status, data


def _clients(api_url: str, count: int) -> list[_Http]:
    return [_Http(api_url) for _ in range(count)]


def post_rate(api_url: str, clients: int, total: int) -> tuple[float, list[str]]:
    """POST /v1/jobs `total` times from `clients` threads; (requests/s, job ids)."""
    conns = _clients(api_url, clients)
    ids: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        conn = conns[i]
        for n in range(i, total, clients):
            status, data = conn.request("POST", "/v1/jobs", {"input": f"s3://{BUCKET}/in/{n}.jpg"})
            if status != 202:
                raise RuntimeError(f"POST /v1/jobs answered {status}: {data[:200]!r}")
            with lock:
                ids.append(json.loads(data)["id"])

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return total / (time.perf_counter() - start), ids


def send_task_rate(redis_url: str, clients: int, total: int) -> float:
    """Raw Celery `send_task` of the parse task, `total` times from `clients` threads; calls/s."""
    from storage.jobs import new_id
    from storage.queue import PARSE_QUEUE, PARSE_TASK, make_celery

    app = make_celery(redis_url)
    app.send_task(PARSE_TASK, args=[new_id()], queue=PARSE_QUEUE)  # connect and declare once

    def client(i: int) -> None:
        for _ in range(i, total, clients):
            app.send_task(PARSE_TASK, args=[new_id()], queue=PARSE_QUEUE)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return total / (time.perf_counter() - start)


def _send_task_process(redis_url: str, total: int, start: Any, rates: Any) -> None:
    start.wait()
    rates.put(send_task_rate(redis_url, 1, total))


def send_task_rate_processes(redis_url: str, processes: int, total: int) -> float:
    """Raw `send_task` from `processes` producer processes at once, `total` in all; calls/s."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    start, rates = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_send_task_process, args=(redis_url, total // processes, start, rates))
             for _ in range(processes)]
    for proc in procs:
        proc.start()
    time.sleep(3.0)  # all imported and connected before the start
    begun = time.perf_counter()
    start.set()
    for _ in procs:
        rates.get(timeout=120)  # each process's own figure; the bar is the whole window's
    elapsed = time.perf_counter() - begun
    for proc in procs:
        proc.join()
    return (total // processes) * processes / elapsed


def get_latencies(api_url: str, clients: int, ids: list[str], rounds: int) -> list[float]:
    """Milliseconds of each GET /v1/jobs/{id}, `clients` at a time."""
    conns = _clients(api_url, clients)
    latencies: list[float] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        conn, mine = conns[i], []
        for n in range(i, len(ids) * rounds, clients):
            start = time.perf_counter()
            status, _ = conn.request("GET", f"/v1/jobs/{ids[n % len(ids)]}")
            mine.append((time.perf_counter() - start) * 1000.0)
            if status != 200:
                raise RuntimeError(f"GET answered {status}")
        with lock:
            latencies.extend(mine)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return latencies


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main(argv: list[str] | None = None) -> int:
    """Run the three phases and print the figures (and --json them)."""
    ap = argparse.ArgumentParser(prog="python -m bench.api", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2000, help="POSTs (and raw sends) in all")
    ap.add_argument("--get-rounds", type=int, default=2, help="GETs per job made")
    ap.add_argument("--api-workers", type=int, default=2, help="gunicorn processes")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, Services() as svc:
        env = svc.env(Path(tmp) / "no-model-needed")
        api_url = svc.api(env, workers=args.api_workers)
        post_rate(api_url, args.clients, args.clients * 4)  # warm-up: connections, first requests
        say(f"bench.api: {args.clients} clients, {args.requests} requests, {args.api_workers} API processes "
            f"({load()})")
        api_rate, ids = post_rate(api_url, args.clients, args.requests)
        say(f"POST /v1/jobs: {api_rate:.1f} requests/s  ({load()})")
        raw_threads = {n: send_task_rate(svc.redis_url, n, args.requests) for n in sorted({1, args.clients})}
        raw_rate = max(raw_threads.values())
        say("raw send_task, one process: " + ", ".join(f"{rate:.1f} calls/s from {n} thread(s)"
                                                        for n, rate in raw_threads.items()) + f"  ({load()})")
        latencies = get_latencies(api_url, args.clients, ids, args.get_rounds)
        raw_procs = send_task_rate_processes(svc.redis_url, args.api_workers, args.requests)
    p50, p99 = _percentile(latencies, 50), _percentile(latencies, 99)
    say(f"GET /v1/jobs/{{id}} under {args.clients} concurrent clients: p50 {p50:.2f} ms, p99 {p99:.2f} ms "
        f"over {len(latencies)} requests  (goal p99 <= 10 ms)  ({load()})")
    say(f"context: raw send_task from {args.api_workers} processes at once: {raw_procs:.1f} calls/s; "
        f"POST rate / that = {api_rate / raw_procs:.3f}")
    ratio = api_rate / raw_rate
    say(f"RATIO POST rate / raw send_task rate (one producer process) = {ratio:.3f}  (goal >= 0.5)")
    if args.json:
        args.json.write_text(json.dumps({"post_rate": api_rate, "send_task_rate": raw_rate, "ratio": ratio,
                                         "send_task_rate_by_threads": raw_threads,
                                         "send_task_rate_processes": raw_procs,
                                         "get_p50_ms": p50, "get_p99_ms": p99, "gets": len(latencies)},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
