"""Benchmark: the system's own overhead, with the tiny random model, against `faceparse parse`.

    python -m bench.overhead --jobs 64

With a model that costs next to nothing, what is left is the system: HTTP, Redis, Celery, the S3
server, encoding and polling. The same N JPEGs go (a) through `faceparse parse` in this process
(decode, parse, write mask/overlay/summary files; the model loaded beforehand) and (b) as N jobs
through API -> Redis -> one worker -> S3 -> status, after one warm-up job.

Prints both jobs/s and their ratio (goal: end to end >= 0.5 of in-process).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import Services, jpeg_inputs, load, random_model, run_jobs, say, write_files


def in_process(model_dir: str, paths: list[Path], out: Path, threads: int) -> float:
    """jobs/s of `faceparse parse` on the files, in this process (model load not counted)."""
    import torch

    from faceparse.local import parse_command
    from faceparse.settings import Settings
    from worker.model import load_parser

    torch.set_num_threads(threads)
    settings = Settings(model=model_dir, device="cpu")
    load_parser(model_dir, device=settings.device, dtype=settings.dtype)
    parse_command(settings, paths[:1], out=out / "warm-up")
    start = time.perf_counter()
    status = parse_command(settings, paths, out=out / "run")
    seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"faceparse parse exited with {status}")
    return len(paths) / seconds


def main(argv: list[str] | None = None) -> int:
    """Run both sides and print the figures (and --json them)."""
    ap = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=64, help="N: jobs (and images)")
    ap.add_argument("--size", default="512x512", help="input size WIDTHxHEIGHT")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    width, _, height = args.size.partition("x")
    inputs = jpeg_inputs(args.jobs, (int(width), int(height)))
    with tempfile.TemporaryDirectory(prefix="faceparse-bench-") as tmp:
        model_dir = str(random_model(Path(tmp) / "tiny", "tiny"))
        paths = write_files(Path(tmp) / "in", inputs)
        say(f"bench.overhead: {args.jobs} jobs of {args.size}, tiny random model ({load()})")
        local = in_process(model_dir, paths, Path(tmp) / "out", args.threads)
        say(f"in-process `faceparse parse`: {local:.2f} jobs/s  ({load()})")
        with Services() as svc:
            env = svc.env(model_dir, threads=args.threads)
            api_url = svc.api(env, workers=2)
            svc.worker(env)
            urls = svc.upload(inputs)
            run_jobs(api_url, urls[:1])
            system = run_jobs(api_url, urls, submitters=8)
    say(f"end to end: {system['images_per_s']:.2f} jobs/s ({system['jobs']} jobs in "
        f"{system['seconds']:.1f} s, batch sizes {system['batch_sizes']})  ({load()})")
    ratio = system["images_per_s"] / local
    say(f"RATIO end to end / in-process = {ratio:.3f}  (goal >= 0.5)")
    if args.json:
        args.json.write_text(json.dumps({"in_process": local, "system": system, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
