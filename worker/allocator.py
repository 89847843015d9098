"""glibc malloc settings for a process that runs forward passes: keep freed memory mapped.

A forward pass allocates and frees the same large activations on every batch. glibc's defaults
hand large blocks back to the kernel (mmap/munmap, heap trimming), and each new allocation
faults them back in, zero-filled: about 200,000 minor page faults (800 MB) per b5 forward at
batch 2 on this CPU. The batcher's thread is not the main thread, so it allocates from its own
arena, whose heaps are capped at 64 MB: most of its activations take the mmap path every time.

`tune_malloc()` (called once, early, by a worker process and by `faceparse parse`) puts every
thread on the main arena, raises the mmap threshold to its maximum (32 MB) and stops trimming,
so freed activations are reused in place by the next batch. The cost: the process keeps its peak
heap (a 24-megapixel job's) mapped for the next job, as an inference server's GPU memory cache
does. Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit (HEAP_MAX_SIZE / 2)
TOP_PAD = 256 * 1024 * 1024  # grow the heap in large steps, so blocks past the mmap threshold fit in it
TRIM_THRESHOLD = 2**31 - 1  # hand the heap's top back to the kernel only past 2 GiB free

_SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
             (M_TOP_PAD, TOP_PAD))


def tune_malloc() -> bool:
    """Apply the settings above to this process's glibc malloc; False where there is none."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it: musl's mallopt is a no-op stub)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = all(mallopt(param, value) == 1 for param, value in _SETTINGS)
    if not applied:
        log.warning("malloc settings for inference not applied (mallopt refused one)")
    return applied
