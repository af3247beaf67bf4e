"""Dynamic INT8 with an accuracy-driven fallback: the most harmful layers stay FP32.

Quantize every MatMul/Gemm (per-channel weights, ``reduce_range`` for CPUs without VNNI); if
the outputs' cosine similarity to FP32 on the calibration inputs misses the budget, measure each
layer's sensitivity (the accuracy lost when only that layer is quantized) and keep the worst
layers in FP32, one at a time, until the budget is met.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

from omniforge.calibration.metrics import cosine

Feeds = dict[str, np.ndarray]


@dataclass
class FallbackResult:
    mean_cosine: float
    min_cosine: float
    excluded: list[str] = field(default_factory=list)
    sensitivity: dict[str, float] = field(default_factory=dict)


def _outputs(path: Path, feeds: list[Feeds], threads: int = 2) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [sess.run(None, f)[0] for f in feeds]


def _quantize(
    src: Path, dst: Path, include: list[str] | None = None, exclude: list[str] | None = None
) -> None:
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    quantize_dynamic(
        str(src),
        str(dst),
        per_channel=True,
        reduce_range=True,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm"],
        nodes_to_quantize=include or [],
        nodes_to_exclude=exclude or [],
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def _score(
    ref: list[np.ndarray], got: list[np.ndarray], reduce: Callable[[np.ndarray], np.ndarray]
) -> list[float]:
    return [cosine(reduce(a), reduce(b)) for a, b in zip(ref, got, strict=True)]


def quantize_int8_with_fallback(
    src: Path,
    dst: Path,
    calibration: list[Feeds],
    budget: float = 0.995,
    max_fp32_layers: int = 8,
    reduce: Callable[[np.ndarray], np.ndarray] = lambda x: x,
) -> FallbackResult:
    """Write ``dst``: ``src`` with dynamic INT8 layers, keeping layers FP32 until mean cosine >= ``budget``."""
    ref = _outputs(src, calibration)
    with tempfile.TemporaryDirectory() as td:
        trial = Path(td) / "trial.onnx"
        _quantize(src, trial)
        scores = _score(ref, _outputs(trial, calibration), reduce)
        result = FallbackResult(float(np.mean(scores)), float(np.min(scores)))
        if result.mean_cosine < budget:
            linear = [
                n.name
                for n in onnx.load(str(src), load_external_data=False).graph.node
                if n.op_type in ("MatMul", "Gemm") and n.name
            ]
            for name in linear:  # accuracy lost when only this layer is INT8
                _quantize(src, trial, include=[name])
                result.sensitivity[name] = 1.0 - float(
                    np.mean(_score(ref, _outputs(trial, calibration), reduce))
                )
            order = sorted(result.sensitivity, key=result.sensitivity.get, reverse=True)
            for name in order[:max_fp32_layers]:
                result.excluded.append(name)
                _quantize(src, trial, exclude=result.excluded)
                scores = _score(ref, _outputs(trial, calibration), reduce)
                result.mean_cosine, result.min_cosine = float(np.mean(scores)), float(np.min(scores))
                if result.mean_cosine >= budget:
                    break
    _quantize(src, dst, exclude=result.excluded)
    return result
