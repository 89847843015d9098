"""Benchmark: a worker process's memory with b5 loaded, and its peak on a 24-megapixel image.

    python -m bench.memory                       # random b5, a 6000x4000 JPEG; a few minutes on a CPU

Starts one `faceparse worker` (API, Redis and the S3 server around it), reads its resident set
size (VmRSS) once the model is loaded and it consumes, runs one warm-up job at 512x512, then one
job on a `--width` x `--height` JPEG, and reads the process's peak resident size (VmHWM) and
VmRSS afterwards. Figures in MiB, from /proc (Linux).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import Services, image_bytes, load, random_model, rss_kib, run_jobs, say


def _mib(kib: int) -> float:
    return kib / 1024.0


def main(argv: list[str] | None = None) -> int:
    """Measure and print the figures (and --json them)."""
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: a fresh random --arch)")
    ap.add_argument("--arch", default="b5", choices=["tiny", "b5"])
    ap.add_argument("--width", type=int, default=6000)
    ap.add_argument("--height", type=int, default=4000)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    big = image_bytes(args.width, args.height)
    small = image_bytes(512, 512)
    with tempfile.TemporaryDirectory(prefix="faceparse-bench-model-") as tmp, Services() as svc:
        model_dir = args.model or str(random_model(Path(tmp) / args.arch, args.arch))
        env = svc.env(model_dir)
        api_url = svc.api(env)
        worker = svc.worker(env)  # solo process: the model, the batcher and the task threads live here
        loaded = rss_kib(worker.pid)
        say(f"worker pid {worker.pid}, model loaded: RSS {_mib(loaded['VmRSS']):.0f} MiB  ({load()})")
        urls = svc.upload([small, big])
        run_jobs(api_url, urls[:1])
        warm = rss_kib(worker.pid)
        say(f"after a 512x512 job: RSS {_mib(warm['VmRSS']):.0f} MiB, peak {_mib(warm['VmHWM']):.0f} MiB")
        result = run_jobs(api_url, urls[1:], outputs=("mask", "overlay", "summary"))
        after = rss_kib(worker.pid)
        say(f"after a {args.width}x{args.height} job ({len(big) / 1e6:.1f} MB JPEG, "
            f"{result['mean_total_ms'] / 1000:.1f} s in the worker): RSS {_mib(after['VmRSS']):.0f} MiB, "
            f"peak {_mib(after['VmHWM']):.0f} MiB  ({load()})")
        say(f"peak above the loaded worker: +{_mib(after['VmHWM'] - loaded['VmRSS']):.0f} MiB; "
            f"above the warm worker's peak: +{_mib(after['VmHWM'] - warm['VmHWM']):.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"loaded_kib": loaded, "warm_kib": warm, "after_kib": after,
                                         "pixels": args.width * args.height}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
