"""Benchmark: faceparse against the naive implementation (`bench.naive_tasks`), same jobs, one run.

    python -m bench.naive --jobs 8                 # CPU, random b5, a few minutes

Both sides get the same N JPEGs from the same S3 (moto) bucket and write mask.png, overlay.png
and the summary back to it, after one warm-up job each:

- faceparse: API (gunicorn) -> Redis -> one `faceparse worker` with its defaults -> S3 -> status;
- naive: `parse_face.delay(bucket, key)` for every image, then `.get()` on every result, with
  `celery -A bench.naive_tasks worker` at its defaults (prefork, one child per core, each child
  with the model loaded at import, one image per task).

Prints both images/s and faceparse's multiple of the naive figure (goal: >= 1.5x on this CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import BUCKET, ROOT, Services, jpeg_inputs, load, random_model, run_jobs, say


def faceparse_run(svc: Services, model_dir: str, urls: list[str], max_batch: int | None) -> dict[str, Any]:
    """The jobs through faceparse at its defaults (or --max-batch)."""
    extra = {"FACEPARSE_MAX_BATCH": str(max_batch)} if max_batch else {}
    env = svc.env(model_dir, **extra)
    api_url = svc.api(env)
    worker = svc.worker(env)
    try:
        run_jobs(api_url, urls[:1])
        result = run_jobs(api_url, urls)
    finally:
        svc.stop(worker)
    result["load"] = load()
    return result


def naive_run(svc: Services, model_dir: str, urls: list[str]) -> dict[str, Any]:
    """The jobs through the naive Celery task; images/s from the first send to the last result."""
    from tests.fixtures.stack import ManagedProcess

    broker = svc.redis_url.rsplit("/", 1)[0] + "/1"
    env = {**os.environ, **svc.s3_env, "NAIVE_BROKER_URL": broker, "NAIVE_MODEL": model_dir,
           "PYTHONUNBUFFERED": "1"}
    env.pop("OMP_NUM_THREADS", None)  # the naive user's defaults
    cmd = [sys.executable, "-m", "celery", "-A", "bench.naive_tasks", "worker", "--loglevel", "INFO"]
    worker = ManagedProcess("naive-worker", cmd, env, svc.log_dir)
    svc.procs.append(worker)
    try:
        worker.wait_for_log(r"ready\.", timeout=300)
        from celery import Celery

        app = Celery("naive", broker=broker, backend=broker)
        keys = [url.removeprefix(f"s3://{BUCKET}/") for url in urls]
        app.send_task("bench.naive_tasks.parse_face", args=[BUCKET, keys[0]]).get(timeout=600)  # warm-up
        # Two prefork children: warm the second as well, or its first call is charged to the run.
        warm = [app.send_task("bench.naive_tasks.parse_face", args=[BUCKET, k]) for k in keys[:2]]
        for r in warm:
            r.get(timeout=600)
        start = time.time()
        results = [app.send_task("bench.naive_tasks.parse_face", args=[BUCKET, k]) for k in keys]
        for r in results:
            r.get(timeout=1800)
        seconds = time.time() - start
    finally:
        svc.stop(worker)
    return {"jobs": len(urls), "seconds": seconds, "images_per_s": len(urls) / seconds, "load": load()}


def main(argv: list[str] | None = None) -> int:
    """Run both sides and print the figures (and --json them)."""
    ap = argparse.ArgumentParser(prog="python -m bench.naive", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=8, help="N: jobs (and images) per side")
    ap.add_argument("--model", default=None, help="model directory (default: a fresh random --arch)")
    ap.add_argument("--arch", default="b5", choices=["tiny", "b5"])
    ap.add_argument("--size", default="512x512", help="input size WIDTHxHEIGHT")
    ap.add_argument("--max-batch", type=int, default=None,
                    help="faceparse's FACEPARSE_MAX_BATCH (default: its own)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating runs per side; each keeps its best")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    os.chdir(ROOT)  # `celery -A bench.naive_tasks` imports from the repository root
    width, _, height = args.size.partition("x")
    inputs = jpeg_inputs(args.jobs, (int(width), int(height)))
    with tempfile.TemporaryDirectory(prefix="faceparse-bench-model-") as tmp:
        model_dir = args.model or str(random_model(Path(tmp) / args.arch, args.arch))
        say(f"bench.naive: {args.jobs} jobs of {args.size}, model {model_dir} ({load()})")
        with Services() as svc:
            urls = svc.upload(inputs)
            # Other processes share this CPU: alternate the sides and keep each side's best round.
            rounds: dict[str, list[dict[str, Any]]] = {"faceparse": [], "naive": []}
            for _ in range(args.rounds):
                run = faceparse_run(svc, model_dir, urls, args.max_batch)
                rounds["faceparse"].append(run)
                say(f"faceparse: {run['images_per_s']:.3f} images/s ({run['jobs']} jobs in "
                    f"{run['seconds']:.1f} s, batch sizes {run['batch_sizes']})  ({run['load']})")
                run = naive_run(svc, model_dir, urls)
                rounds["naive"].append(run)
                say(f"naive: {run['images_per_s']:.3f} images/s ({run['jobs']} jobs in "
                    f"{run['seconds']:.1f} s)  ({run['load']})")
    ours = max(rounds["faceparse"], key=lambda r: r["images_per_s"])
    naive = max(rounds["naive"], key=lambda r: r["images_per_s"])
    ratio = ours["images_per_s"] / naive["images_per_s"]
    say(f"RATIO faceparse / naive = {ratio:.2f}x (best round of each of {args.rounds})  (goal >= 1.5x)")
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
