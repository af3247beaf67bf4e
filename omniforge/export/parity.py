"""Compare an exported ONNX stage with PyTorch on seeded inputs at several dynamic shapes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from omniforge.pipeline.spec import StageSpec


@dataclass(frozen=True)
class ParityResult:
    """Worst output of one stage at one shape."""

    stage: str
    point: dict[str, int]
    output: str
    max_abs: float
    max_rel: float  # max_abs / max |reference|
    ref_scale: float
    passed: bool


def compare(ref: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> tuple[float, float, float, bool]:
    if ref.shape != got.shape:
        return float("inf"), float("inf"), 0.0, False
    diff = float(np.max(np.abs(ref.astype(np.float64) - got))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    rel = diff / scale if scale > 0 else diff
    ok = bool(np.isfinite(got).all()) and diff <= atol + rtol * scale
    return diff, rel, scale, ok


def check_stage(
    stage: StageSpec, onnx_path: str, reference: nn.Module, threads: int = 2, seed: int = 0
) -> list[ParityResult]:
    """Run ``stage`` in ONNX Runtime (CPU) and in PyTorch at each of its check points."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    results = []
    for i, point in enumerate(stage.parity_points()):
        feeds = stage.sample_inputs(point, seed=seed + i)
        with torch.no_grad():
            ref = reference(*[torch.from_numpy(feeds[n]) for n in stage.input_names])
        ref = ref if isinstance(ref, tuple | list) else (ref,)
        got = sess.run(stage.output_names, feeds)
        sizes = stage.resolve(point)
        worst = None
        for name, r, g in zip(stage.output_names, ref, got, strict=True):
            diff, rel, scale, ok = compare(r.numpy(), g, stage.tolerance.atol, stage.tolerance.rtol)
            res = ParityResult(stage.name, sizes, name, diff, rel, scale, ok)
            if worst is None or (not ok and worst.passed) or (ok == worst.passed and rel > worst.max_rel):
                worst = res
        assert worst is not None
        results.append(worst)
    return results
