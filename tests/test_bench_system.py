"""The system and API benchmarks run end to end on small numbers, so the benchmarks do not rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.fixtures.stack import ROOT


def test_bench_system_prints_its_ratio_from_one_run() -> None:
    env_fix = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # two cores shared by the whole suite
    proc = subprocess.run(
        [sys.executable, "-m", "bench.system", "--arch", "tiny", "--jobs", "3", "--batch-sizes", "1,2"],
        cwd=ROOT, env={**os.environ, **env_fix}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"bare forward, batch +1: [\d.]+ images/s", out), out
    system = re.search(r"system: ([\d.]+) images/s over 3 jobs", out)
    ratio = re.search(r"RATIO system / bare forward = ([\d.]+)", out)
    assert system and ratio, out
    assert float(system.group(1)) > 0 and float(ratio.group(1)) > 0


def test_bench_api_prints_its_ratio_and_latencies() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.api", "--clients", "2", "--requests", "40", "--get-rounds", "1",
         "--api-workers", "1"],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"POST /v1/jobs: [\d.]+ requests/s", out), out
    assert re.search(r"GET /v1/jobs/\{id\} under 2 concurrent clients: p50 [\d.]+ ms, p99 [\d.]+ ms", out)
    ratio = re.search(r"RATIO POST rate / raw send_task rate \(one producer process\) = ([\d.]+)", out)
    assert ratio and float(ratio.group(1)) > 0, out
