"""The worker's process-level settings for fast forward passes: glibc malloc and one OpenMP team."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from tests.fixtures.stack import ROOT
from worker.celery_app import _in_own_thread


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tune_malloc_applies_on_glibc() -> None:
    # In a fresh process: the settings are process-wide and meant to come before any thread.
    code = "from worker.allocator import tune_malloc; import sys; sys.exit(0 if tune_malloc() else 3)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0


def test_in_own_thread_returns_and_raises_on_the_callers_thread() -> None:
    names: list[str] = []

    def load(x: int) -> int:
        names.append(threading.current_thread().name)
        return x * 2

    assert _in_own_thread(load, 21) == 42
    assert names == ["faceparse-model-load"]  # not the caller's thread, which lives on
    with pytest.raises(ValueError, match="no model"):
        _in_own_thread(lambda: (_ for _ in ()).throw(ValueError("no model")))
