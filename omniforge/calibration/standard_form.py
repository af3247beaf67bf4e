"""The standard-ONNX weight-only form: block-wise ``DequantizeLinear`` (opset 21) before each MatMul.

This is what TensorRT (and any ONNX runtime) consumes for INT4/INT8 weight-only LLMs, next to
ONNX Runtime's own ``MatMulNBits`` form. It is made from the canonical (opset 17, explicit-cache)
LLM graph: the opset is raised to 21, which for these graphs only changes the reduce operators
(``axes`` moves from an attribute to an input, opset 18), and every constant 2-D MatMul weight
``W`` (K, N) — the LM head included — becomes ``DequantizeLinear(codes, scale, axis=0,
block_size)``. Codes come from ``codes``, as for ``MatMulNBits``: symmetric round-to-nearest (signed
codes, no zero point), asymmetric round-to-nearest (unsigned codes with a zero point per block),
or GPTQ from Hessians captured through this graph.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from omniforge.calibration.codes import gptq_codes, pack_nibbles, rtn_codes
from omniforge.calibration.tensors import canonical_prefill, hessians, matmul_inputs
from omniforge.errors import ConfigError, ExportError
from omniforge.pipeline.spec import StageSpec

REDUCE_OPS = {
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSumSquare",
}
# operators whose opset 18..21 changes need a rewrite this module does not do
UNSUPPORTED_UPGRADE = {
    "Resize",
    "Pad",
    "Split",
    "ScatterElements",
    "ScatterND",
    "Col2Im",
    "GroupNormalization",
}


def upgrade_opset(model: onnx.ModelProto, target: int = 21) -> onnx.ModelProto:
    """A copy of an opset-17 ``model`` at opset ``target`` (reduce ``axes`` attributes become inputs)."""
    onnx_opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if onnx_opset != 17:
        raise ConfigError(f"expected an opset-17 graph, got opset {onnx_opset}")
    bad = sorted({n.op_type for n in model.graph.node if n.op_type in UNSUPPORTED_UPGRADE})
    if bad:
        raise ConfigError(f"cannot raise this graph to opset {target}: it uses {', '.join(bad)}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, node in enumerate(out.graph.node):
        if node.op_type not in REDUCE_OPS:
            continue
        axes = next((a for a in node.attribute if a.name == "axes"), None)
        if axes is None:
            continue
        name = f"{node.name or node.op_type}_{i}_axes"
        out.graph.initializer.append(numpy_helper.from_array(np.array(list(axes.ints), np.int64), name))
        node.attribute.remove(axes)
        if len(node.input) == 0:
            raise ConfigError(f"reduce node '{node.name}' has no data input")
        node.input.append(name)
    for o in out.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = target
    out.ir_version = max(out.ir_version, 10)  # INT4 tensors and opset 21 need IR version 10
    return out


def _int_tensor(codes: np.ndarray, bits: int, signed: bool, name: str) -> onnx.TensorProto:
    """Codes as an ONNX INT4/UINT4/INT8/UINT8 initializer."""
    if bits == 8:
        return numpy_helper.from_array(codes.astype(np.int8 if signed else np.uint8), name)
    kind = TensorProto.INT4 if signed else TensorProto.UINT4
    return helper.make_tensor(name, kind, codes.shape, pack_nibbles(codes).tobytes(), raw=True)


def canonical_hessians(
    model: onnx.ModelProto, spec: StageSpec, rows: list[np.ndarray]
) -> dict[str, np.ndarray]:
    """``X^T X / tokens`` of each constant-weight MatMul's input, keyed by the weight's name (prefill, no past)."""
    readers = matmul_inputs(model)
    if not readers:
        raise ExportError("GPTQ found no MatMul with a constant weight in the canonical LLM graph")
    return hessians(model, readers, [canonical_prefill(spec, r) for r in rows])


def dequantize_linear_form(
    model: onnx.ModelProto,
    bits: int = 4,
    block: int = 32,
    method: str = "rtn",
    rows: list[np.ndarray] | None = None,
    spec: StageSpec | None = None,
    symmetric: bool = True,
) -> onnx.ModelProto:
    """The canonical LLM graph at opset 21 with every constant 2-D MatMul weight block-quantized.

    ``gptq`` needs the calibration ``rows`` and the stage's ``spec`` (to feed the graph); asymmetric
    codes are unsigned with a zero point per block (``DequantizeLinear``'s third input).
    """
    if method not in ("rtn", "gptq"):
        raise ConfigError(f"the standard-ONNX form is made with rtn or gptq codes, not '{method}'")
    if method == "gptq" and not symmetric:
        raise ConfigError("GPTQ is implemented for symmetric quantization only")
    if method == "gptq" and (not rows or spec is None):
        raise ConfigError("GPTQ needs calibration rows and the LLM's stage description")
    hs = canonical_hessians(model, spec, rows) if method == "gptq" else {}
    out = upgrade_opset(model, 21)
    inits = {t.name: t for t in out.graph.initializer}
    done: dict[str, str] = {}
    new_nodes = []
    for node in out.graph.node:
        w_name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w_name in inits and len(inits[w_name].dims) == 2 and inits[w_name].data_type == TensorProto.FLOAT:
            if w_name not in done:
                new_nodes.append(_dequantize_node(out, inits[w_name], bits, block, symmetric, hs.get(w_name)))
                done[w_name] = new_nodes[-1].output[0]
            node.input[1] = done[w_name]
    for w_name in done:
        out.graph.initializer.remove(inits[w_name])
    nodes = new_nodes + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def _dequantize_node(
    model: onnx.ModelProto,
    weight: onnx.TensorProto,
    bits: int,
    block: int,
    symmetric: bool,
    hessian: np.ndarray | None,
) -> onnx.NodeProto:
    """Add ``weight``'s codes (and scales, zero points) to ``model``; the node that dequantizes them."""
    w = numpy_helper.to_array(weight)
    q = rtn_codes(w, bits, block, symmetric) if hessian is None else gptq_codes(w, hessian, bits, block)
    name = weight.name
    inputs = [f"{name}_q{bits}", f"{name}_scale"]
    model.graph.initializer.append(_int_tensor(q.codes, bits, symmetric, inputs[0]))
    model.graph.initializer.append(numpy_helper.from_array(q.scales, inputs[1]))
    if q.zero_points is not None:
        inputs.append(f"{name}_zero_point")
        model.graph.initializer.append(_int_tensor(q.zero_points, bits, False, inputs[2]))
    return helper.make_node(
        "DequantizeLinear",
        inputs,
        [f"{name}_dequantized"],
        name=f"{name}_DequantizeLinear",
        axis=0,
        block_size=block,
    )
