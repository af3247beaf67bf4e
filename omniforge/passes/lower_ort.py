"""Backend lowering for ONNX Runtime, kept apart from the canonical standard-ONNX graph.

ONNX Runtime's own graph optimizer fuses what it knows on CPU (LayerNorm/SkipLayerNorm, Gelu
variants, MatMul + Add, attention where it matches, constant folding). Running it once at build
time and saving the result gives an ORT-flavoured graph that also starts faster; the canonical
graph stays the artifact TensorRT and other consumers read. ``EXTENDED`` rather than ``ALL``
keeps the saved graph free of hardware-specific layouts, so it stays portable across CPUs.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort


def lower_for_onnxruntime(src: Path, dst: Path) -> None:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(dst)
    opts.log_severity_level = 3
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
