"""Helpers shared by the benchmark scripts: statistics, machine facts, bandwidth, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def spread(xs: list[float]) -> float:
    """Relative spread (max - min) / median, to show how noisy a measurement was."""
    m = median(xs)
    return float((max(xs) - min(xs)) / m) if m else 0.0


def read_bandwidth(threads: int = 2, mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second this machine streams from memory: the best of a ``threads``-way numpy sum
    and a BLAS matrix-vector product over a buffer far larger than the caches (a decode step
    reads its weights exactly this way, once each)."""
    buf = np.ones(mib * 1024 * 1024 // 4, np.float32)
    halves = np.array_split(buf, threads)

    def summed() -> None:
        ts = [threading.Thread(target=np.sum, args=(h,)) for h in halves]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    mat, vec = buf.reshape(-1, 1024), np.ones(1024, np.float32)
    best = float("inf")
    for fn in (summed, lambda: mat @ vec):
        fn()
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best


def machine() -> dict:
    import onnxruntime

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def write_results(name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    j, m = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    j.write_text(json.dumps(data, indent=2) + "\n")
    m.write_text(markdown + "\n")
    return j, m
