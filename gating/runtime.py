"""Process-wide settings for CPU inference.

glibc's malloc serves every allocation above its mmap threshold (128 KiB at start, then
adapting) with freshly mapped pages and unmaps them on free, so the activations of a
batch (a 64 x 16 x 32 x 32 float tensor is 4 MiB) cost page faults on every forward
pass, and how many depends on each process's allocation history: the same model runs
at different speeds in different processes. With the thresholds below, activation-sized
blocks come from the heap and freed ones are kept for the next pass.
"""
from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed on 64-bit: bigger blocks are still mapped
TRIM_THRESHOLD = 256 << 20  # free heap kept for reuse before it is returned to the system


def keep_activations_on_heap() -> bool:
    """Serve activation-sized blocks from the heap and keep freed ones for reuse (glibc only);
    True when applied. Costs up to ``TRIM_THRESHOLD`` of freed memory held by the process."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's C library; musl has no mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
