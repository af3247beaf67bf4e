"""A LoRA adapter into a TensorRT engine of the base LLM by refitting its weights.

TensorRT's route for an adapter over one base engine: build the canonical LLM graph's engine
refittable, then, per adapter, hand ``trt.Refitter`` the merged weights (``W + B @ A * scaling``,
as PEFT merges them) under the ONNX initializer names the parser gave them. The traced canonical
graph stores each linear weight transposed under a generated name, so the names are found by
value (``canonical_refit_map``). The refit itself (``refit_engine``) uses TensorRT's documented
``Refitter.set_named_weights`` / ``refit_cuda_engine``; it has not run on a GPU yet.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from omniforge.errors import ConfigError, EngineError


def _digest(arr: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(arr, np.float32).tobytes(), digest_size=16).digest()


def canonical_refit_map(canonical: onnx.ModelProto, weights: Any, adapter: Any) -> dict[str, np.ndarray]:
    """Initializer name -> merged weight, in the initializer's layout, for every weight ``adapter``
    (an ``export.llm_stream.LoraAdapter``) targets in the canonical graph of the base model whose
    tensors ``weights`` reads by HF name. A targeted weight the graph does not hold unchanged
    (folded, fused or of another model) is an error."""
    by_value: dict[bytes, tuple[str, bool]] = {}
    for t in canonical.graph.initializer:
        if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT:
            arr = numpy_helper.to_array(t)
            by_value.setdefault(_digest(arr), (t.name, False))
            by_value.setdefault(_digest(arr.T), (t.name, True))  # stored transposed: (in, out)
    out: dict[str, np.ndarray] = {}
    for name in sorted(adapter.pairs):
        w = weights.tensor(name)  # (out, in), the base weight
        hit = by_value.get(_digest(w))
        if hit is None:
            raise ConfigError(
                f"the canonical graph holds no unchanged copy of '{name}'; its engine cannot be refitted "
                "with this adapter (export the graph from the same base model)"
            )
        init, transposed = hit
        merged = adapter.merge(name, w)
        out[init] = np.ascontiguousarray(merged.T if transposed else merged, np.float32)
    return out


def refit_engine(engine_path: Path, weights: dict[str, np.ndarray], out: Path) -> None:
    """Write a copy of the refittable engine ``engine_path`` with ``weights`` (initializer name ->
    array) refitted into it (GPU only; unverified on hardware)."""
    from omniforge.engines.tensorrt import require_tensorrt, trt

    require_tensorrt()
    logger = trt.Logger(trt.Logger.ERROR)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise EngineError(f"'{engine_path}' is not an engine this TensorRT can load")
    if not engine.refittable:
        raise EngineError(f"'{engine_path}' was not built refittable; build the LLM engine with refit on")
    refitter = trt.Refitter(engine, logger)
    keep = []  # TensorRT reads the arrays during refit_cuda_engine
    for name, arr in weights.items():
        arr = np.ascontiguousarray(arr, np.float32)
        keep.append(arr)
        if not refitter.set_named_weights(name, trt.Weights(arr)):
            raise EngineError(f"the engine has no refittable weight '{name}'")
    missing = refitter.get_missing_weights()
    if missing:
        raise EngineError(f"refitting needs {len(missing)} more weights, e.g. '{missing[0]}'")
    if not refitter.refit_cuda_engine():
        raise EngineError("TensorRT refused the refit")
    Path(out).write_bytes(bytes(engine.serialize()))
