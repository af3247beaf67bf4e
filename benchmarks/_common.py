"""Helpers shared by the benchmark scripts: statistics, machine facts, bandwidth, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
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


def read_bandwidth(threads: int = 2) -> float:
    """The memory read bandwidth omniforge's bench uses for its roofline."""
    from omniforge.bench.measure import read_bandwidth as measured

    return measured(threads)


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


def genai_greedy(model, ids: list[int], new: int):
    """A timed greedy run of ONNX Runtime GenAI's generator over ``ids`` (warmed up once):
    returns a callable giving (time to first token, total seconds) for ``new`` tokens."""
    import onnxruntime_genai as og

    def gen(n: int) -> tuple[float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
        t0 = time.perf_counter()
        g = og.Generator(model, params)
        g.append_tokens(ids)
        ttft, count = 0.0, 0
        while not g.is_done():
            g.generate_next_token()
            count += 1
            if count == 1:
                ttft = time.perf_counter() - t0
        assert count == n, count
        return ttft, time.perf_counter() - t0

    gen(4)
    return lambda: gen(new)
