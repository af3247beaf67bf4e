"""Backend lowering for ONNX Runtime, kept apart from the canonical standard-ONNX graph.

ONNX Runtime's own graph optimizer fuses what it knows on CPU (LayerNorm/SkipLayerNorm, Gelu
variants, MatMul + Add, attention where it matches, constant folding). Running it once at build
time and saving the result gives an ORT-flavoured graph that also starts faster; the canonical
graph stays the artifact TensorRT and other consumers read. ``EXTENDED`` rather than ``ALL``
keeps the saved graph free of hardware-specific layouts, so it stays portable across CPUs.
"""

from __future__ import annotations

from pathlib import Path


def lower_for_onnxruntime(src: Path, dst: Path) -> None:
    from omniforge.runtime.engine import open_session

    open_session(src, "lowering", save_to=dst)
