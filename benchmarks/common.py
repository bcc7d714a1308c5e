"""Shared benchmark helpers: timing with warm-up and medians, machine facts for every result."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    commit = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), timeout=5).stdout.strip() or commit
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": _cpu_model(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "commit": commit}


def time_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved_medians(fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int) -> dict[str, float]:
    """Median ms of each function, run in turn (A B C A B C ...) so machine drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            samples[k].append(time_ms(fn))
    return {k: statistics.median(v) for k, v in samples.items()}
