"""Timing statistics and the measurement loop (inputs prepared before, nothing copied inside)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Stats:
    """Latency statistics in milliseconds."""

    n: int
    min: float
    p50: float
    p90: float
    p99: float
    mean: float
    std: float

    @property
    def spread(self) -> float:
        """(p90 - min) / p50: how noisy the measurement was."""
        return (self.p90 - self.min) / self.p50 if self.p50 else 0.0

    @classmethod
    def of(cls, samples_ms: list[float]) -> Stats:
        if not samples_ms:
            raise ValueError("no samples")
        a = np.asarray(samples_ms, np.float64)
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return cls(
            len(a), float(a.min()), float(p50), float(p90), float(p99), float(a.mean()), float(a.std())
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "spread": self.spread}


def measure(
    fn: Callable[[], object], warmup: int = 3, runs: int = 20, budget_s: float | None = None
) -> Stats:
    """Time ``fn`` after ``warmup`` calls: ``runs`` times, or until ``budget_s`` seconds have passed."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    clock = time.perf_counter
    while len(samples) < runs and (budget_s is None or clock() - start < budget_s or not samples):
        t0 = clock()
        fn()
        samples.append((clock() - t0) * 1000)
    return Stats.of(samples)
