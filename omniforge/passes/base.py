"""What every pass returns, and the numerical check that proves a rewrite."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir


@dataclass
class PassReport:
    """How often a pass fired and what it declined to do (with the reason)."""

    name: str
    fired: int = 0
    notes: list[str] = field(default_factory=list)


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of a constant (initializer) input, else None."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def new_const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A fresh initializer (never aliasing an existing, possibly shared, one)."""
    taken = set(graph.initializers)
    base, i = name, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array)))
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.FLOAT if array.dtype == np.float32 else value.const_value.dtype
    graph.register_initializer(value)
    return value


LARGE_TENSOR_BYTES = 1 << 20  # initializers whose bytes shape inference never reads


def infer_shapes(model: onnx.ModelProto, lift: bool | None = None) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes``, also for a model above protobuf's 2 GB: inference
    serialises the model, so the large initializers' bytes (which it types by their dims and never
    reads) are lifted out for the call and put back in both models. ``lift``: whatever the size."""
    if not (model.ByteSize() >= onnx.checker.MAXIMUM_PROTOBUF if lift is None else lift):
        return onnx.shape_inference.infer_shapes(model)
    lifted = {}
    for t in model.graph.initializer:
        if t.HasField("raw_data") and len(t.raw_data) > LARGE_TENSOR_BYTES:
            lifted[t.name] = t.raw_data
            t.ClearField("raw_data")
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    finally:
        _put_back(model, lifted)
    _put_back(inferred, lifted)
    return inferred


def _put_back(model: onnx.ModelProto, raw: dict[str, bytes]) -> None:
    for t in model.graph.initializer:
        if t.name in raw:
            t.raw_data = raw[t.name]


def run_onnx(model: onnx.ModelProto | ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    from omniforge.runtime.engine import open_session

    return open_session(proto.SerializeToString(), "exact").run(None, feeds)  # the graph as written


Model = onnx.ModelProto | ir.Model


def _errors(a: Model, b: Model, feeds: dict[str, np.ndarray]) -> list[tuple[float, float]]:
    """(max |a - b|, max |a|) per output of two graphs run on ``feeds``."""
    return [
        (float(np.max(np.abs(x.astype(np.float64) - y))), float(np.max(np.abs(x)))) if x.size else (0.0, 0.0)
        for x, y in zip(run_onnx(a, feeds), run_onnx(b, feeds), strict=True)
    ]


def max_abs_diff(a: Model, b: Model, feeds: dict[str, np.ndarray]) -> float:
    """Largest absolute difference between two graphs' outputs on ``feeds``."""
    return max(d for d, _ in _errors(a, b, feeds))


def scaled_error(a: Model, b: Model, feeds: dict[str, np.ndarray]) -> float:
    """max |a - b| / max(1, max |a|) over all outputs: an absolute error for values of order one."""
    return max(d / max(1.0, scale) for d, scale in _errors(a, b, feeds))
