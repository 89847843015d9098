"""Benchmark: N jobs through the whole system against the bare forward pass, in one run.

    python -m bench.system --jobs 8                                  # CPU, random b5, a few minutes
    python -m bench.system --jobs 256 --device cuda --batch-sizes 1,2,4,8,16,32,64

1. The bare forward: `FaceParser.forward` on the jobs' own images, already preprocessed, at each
   of `--batch-sizes`, in this process; the best batch size's images/s is the bar.
2. The system: the API (gunicorn) -> Redis -> one `faceparse worker` (max batch = the best batch
   size above) -> moto's S3 server -> status polling. The same images, uploaded to the bucket, go
   in as N jobs at once (after one warm-up job); the figure is N over the time from the first
   submission to the last job's completion (mask, overlay and summary written to S3).

Prints images/s of both and their ratio (goal: the system at >= 0.90 of the bare forward).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import Services, cpu_used, jpeg_inputs, load, random_model, run_jobs, say


def bare_forward(model_dir: str, inputs: list[bytes], batch_sizes: list[int], device: str, dtype: str,
                 repeats: int = 1) -> dict[int, float]:
    """images/s of the forward pass alone at each batch size (the best of `repeats` passes)."""
    import torch

    from worker.decode import decode_image
    from worker.model import load_parser

    parser = load_parser(model_dir, device=device, dtype=dtype)
    pixels = parser.preprocess([decode_image(d, 100_000_000) for d in inputs])

    def sync() -> None:
        if parser.device.type == "cuda":
            torch.cuda.synchronize(parser.device)

    parser.forward(pixels[: min(batch_sizes)])  # warm-up: allocator, kernels, first-call costs
    sync()
    figures: dict[int, float] = {}
    for batch in batch_sizes:
        parser.forward(pixels[:batch])  # warm this batch shape too (cuDNN/oneDNN pick kernels per shape)
        best = float("inf")
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            for i in range(0, len(pixels), batch):
                parser.forward(pixels[i:i + batch])
            sync()
            best = min(best, time.perf_counter() - start)
        figures[batch] = len(pixels) / best
        say(f"bare forward, batch {batch:>3}: {figures[batch]:.3f} images/s  ({load()})")
    return figures


def system_run(svc: Services, model_dir: str, inputs: list[bytes], max_batch: int, device: str,
               extra_env: dict[str, str] | None = None, poll_s: float = 1.0) -> dict[str, Any]:
    """N jobs through API -> Redis -> one worker -> S3 -> status; the run's figures."""
    env = svc.env(model_dir, FACEPARSE_MAX_BATCH=str(max_batch), FACEPARSE_DEVICE=device, **(extra_env or {}))
    api_url = svc.api(env)
    worker = svc.worker(env)
    try:
        urls = svc.upload(inputs)
        run_jobs(api_url, urls[:1])  # warm-up job: first-call costs, connections
        before = svc.cpu_seconds()
        result = run_jobs(api_url, urls, poll_s=poll_s)
        result["cpu_seconds"] = cpu_used(before, svc.cpu_seconds())
    finally:
        svc.stop(worker)
    result["load"] = load()
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures (and --json them)."""
    ap = argparse.ArgumentParser(prog="python -m bench.system", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=8, help="N: jobs (and images) per run")
    ap.add_argument("--model", default=None, help="model directory (default: a fresh random --arch)")
    ap.add_argument("--arch", default="b5", choices=["tiny", "b5"])
    ap.add_argument("--batch-sizes", default="1,2,4", help="bare forward batch sizes to try")
    ap.add_argument("--size", default="512x512", help="input size WIDTHxHEIGHT")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeats", type=int, default=1, help="bare forward passes per batch size (best kept)")
    # The window ends at the last job's `completed_at`, so polling's interval does not pad it; polling
    # less often leaves the forward pass more of the CPU (2 cores here).
    ap.add_argument("--poll-s", type=float, default=1.0, help="the client's status polling interval")
    ap.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra environment for the API and worker (repeatable), "
                         "e.g. FACEPARSE_BATCH_WAIT_MS=50")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from worker.allocator import tune_malloc

    tune_malloc()  # the bare forward gets the worker process's malloc settings
    extra_env = dict(item.split("=", 1) for item in args.worker_env)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    width, _, height = args.size.partition("x")
    inputs = jpeg_inputs(args.jobs, (int(width), int(height)))
    with tempfile.TemporaryDirectory(prefix="faceparse-bench-model-") as tmp:
        model_dir = args.model or str(random_model(Path(tmp) / args.arch, args.arch))
        say(f"bench.system: {args.jobs} jobs of {args.size}, model {model_dir}, device {args.device} "
            f"({load()})")
        bare = bare_forward(model_dir, inputs, batch_sizes, args.device, args.dtype, args.repeats)
        best_batch = max(bare, key=lambda b: bare[b])
        # Free this process's copy of the model before the worker loads its own.
        from worker import model as model_module

        model_module._cache.clear()
        gc.collect()
        with Services() as svc:
            system = system_run(svc, model_dir, inputs, best_batch, args.device,
                                {"FACEPARSE_DTYPE": args.dtype, **extra_env}, poll_s=args.poll_s)
    ratio = system["images_per_s"] / bare[best_batch]
    say(f"system: {system['images_per_s']:.3f} images/s over {system['jobs']} jobs in "
        f"{system['seconds']:.1f} s, batch sizes {system['batch_sizes']}  ({system['load']})")
    say(f"  the worker's forward passes took {system['forward_seconds']:.1f} s of it: device busy "
        f"{system['device_busy']:.3f}; per-image forward {system['forward_seconds'] / system['jobs']:.3f} s "
        f"in the system against {1 / bare[best_batch]:.3f} s bare")
    cpu = ", ".join(f"{name} {seconds:.1f}" for name, seconds in system["cpu_seconds"].items())
    say(f"  CPU seconds during the run: {cpu}")
    say(f"bare forward at its best batch size ({best_batch}): {bare[best_batch]:.3f} images/s")
    say(f"RATIO system / bare forward = {ratio:.3f}  (goal >= 0.90)")
    if args.json:
        args.json.write_text(json.dumps({"bare": bare, "best_batch": best_batch, "system": system,
                                         "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
