"""TensorRT's weight-only form of the LLM: ``DequantizeLinear`` of constant weights before each MatMul.

This is what TensorRT (and any ONNX runtime) consumes for INT4/INT8 weight-only LLMs, next to
ONNX Runtime's own ``MatMulNBits`` form. It is made from the canonical (opset 17, explicit-cache)
LLM graph, and every constant 2-D MatMul weight ``W`` (K, N), the LM head included, becomes a
``DequantizeLinear`` of its codes, in the forms TensorRT documents:

- INT4: block-wise along K (``axis=0, block_size``) at opset 21, the first opset with INT4 and
  ``block_size``; TensorRT 11 takes blocks of 64 or 128 (``tensorrt_block_size`` picks one from
  ``MatMulNBits``' block size), and a weight whose K is not a multiple of the block (and, for 128,
  not of 64 either) is left unquantized, since TensorRT derives the block from the scale's shape;
- INT8: per-channel, one scale per output column (``axis=1``, no ``block_size``: TensorRT 10.x
  block-quantizes INT4 only) at opset 19, the first where ``DequantizeLinear`` takes FP16 scales;
- symmetric codes are signed with strictly positive scales (``codes``: ``positive=True``);
  asymmetric ones are unsigned with a zero point per block or column (not a TensorRT form:
  TensorRT quantization has no zero points);
- ``fp16`` (the default): W4A16 / W8A16, the form of NVIDIA's weight-only path
  (``fp16_activations``, the FP16 stage pass): FP16 activations, weights left float and scales;
  every norm up to its normalised output and the softmax in FP32; FP32 inputs and outputs; so a
  strongly typed TensorRT build takes its precisions from the graph.

Raising the opset (``upgrade_opset``) only changes the reduce operators for these graphs (``axes``
moves from an attribute to an input, opset 18). Codes come from ``codes``, as for ``MatMulNBits``:
round-to-nearest, or GPTQ from Hessians captured through this graph.
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


TENSORRT_INT4_BLOCKS = (64, 128)  # the INT4 block sizes TensorRT 11's quantization guide lists
WEIGHT_ONLY_OPSET = {4: 21, 8: 19}  # INT4 + block_size: opset 21; FP16 scales: opset 19


def tensorrt_block_size(block: int) -> int:
    """The INT4 block of the TensorRT form for ``MatMulNBits``' ``block``: itself when it is 64 or
    128, else the nearer of them (16, 32 -> 64; 256 -> 128). 10.x documents no size, so one file
    serves every TensorRT version."""
    return min(max(block, TENSORRT_INT4_BLOCKS[0]), TENSORRT_INT4_BLOCKS[-1])


def _block_for(k: int, block: int) -> int | None:
    """The INT4 block used for a weight with ``k`` rows: ``block`` or, from 128 down, a halving of it
    no smaller than 64 that divides ``k``; None when none does (the weight stays unquantized)."""
    b = block
    while b >= min(block, TENSORRT_INT4_BLOCKS[0]):
        if k % b == 0:
            return b
        b //= 2
    return None


def dequantize_linear_form(
    model: onnx.ModelProto,
    bits: int = 4,
    block: int = 64,
    method: str = "rtn",
    rows: list[np.ndarray] | None = None,
    spec: StageSpec | None = None,
    symmetric: bool = True,
    fp16: bool = True,
) -> onnx.ModelProto:
    """The canonical LLM graph with every constant 2-D MatMul weight quantized (see the module's
    docstring): INT4 in blocks of ``block`` rows, INT8 per output column (``block`` unused).

    ``gptq`` needs the calibration ``rows`` and the stage's ``spec`` (to feed the graph); asymmetric
    codes are unsigned with zero points (``DequantizeLinear``'s third input); ``fp16``: FP16
    activations and scales (norms FP32), else FP32.
    """
    if bits not in WEIGHT_ONLY_OPSET:
        raise ConfigError(f"the weight-only form takes 4 or 8 bits, got {bits}")
    if method not in ("rtn", "gptq"):
        raise ConfigError(f"the standard-ONNX form is made with rtn or gptq codes, not '{method}'")
    if method == "gptq" and not symmetric:
        raise ConfigError("GPTQ is implemented for symmetric quantization only")
    if method == "gptq" and (not rows or spec is None):
        raise ConfigError("GPTQ needs calibration rows and the LLM's stage description")
    hs = canonical_hessians(model, spec, rows) if method == "gptq" else {}
    out = upgrade_opset(model, WEIGHT_ONLY_OPSET[bits])
    inits = {t.name: t for t in out.graph.initializer}
    done: dict[str, str] = {}
    new_nodes = []
    for node in out.graph.node:
        w_name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w_name in inits and len(inits[w_name].dims) == 2 and inits[w_name].data_type == TensorProto.FLOAT:
            if w_name not in done:
                k = inits[w_name].dims[0]
                rows_per_scale = k if bits == 8 else _block_for(k, block)
                if rows_per_scale is None:
                    continue  # K is no multiple of a block TensorRT takes: the weight stays float
                new_nodes.append(
                    _dequantize_node(out, inits[w_name], bits, rows_per_scale, symmetric, hs.get(w_name))
                )
                done[w_name] = new_nodes[-1].output[0]
            node.input[1] = done[w_name]
    for w_name in done:
        out.graph.initializer.remove(inits[w_name])
    stale = [vi for vi in out.graph.value_info if vi.name in done]  # the float weights' declared types
    for vi in stale:
        out.graph.value_info.remove(vi)
    nodes = new_nodes + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return fp16_activations(out) if fp16 else out


def fp16_activations(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with FP16 activations, weights and scales, and every norm in FP32 up to its
    normalised output: the FP16 stage pass (``passes.precision.to_fp16_keep_norms``), so a norm
    reads its FP16 input once, computes in FP32 with no FP16 tensor between its operators and hands
    FP16 to the next layer. Inputs and outputs stay FP32."""
    from omniforge.passes.precision import to_fp16_keep_norms

    return to_fp16_keep_norms(model)


def unquantized_weights(model: onnx.ModelProto) -> list[str]:
    """The constant 2-D MatMul weights of ``model`` left in float (FP32 or FP16)."""
    inits = {t.name: t for t in model.graph.initializer}
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    return sorted(
        {
            n.input[1]
            for n in model.graph.node
            if n.op_type == "MatMul"
            and len(n.input) == 2
            and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2
            and inits[n.input[1]].data_type in floats
        }
    )


def _dequantize_node(
    model: onnx.ModelProto,
    weight: onnx.TensorProto,
    bits: int,
    block: int,
    symmetric: bool,
    hessian: np.ndarray | None,
) -> onnx.NodeProto:
    """Add ``weight``'s codes (and scales, zero points) to ``model``; the node that dequantizes them.
    INT8: ``block`` is K (one scale per column), written per-channel (1-D scales along axis 1)."""
    w = numpy_helper.to_array(weight)
    if hessian is None:
        q = rtn_codes(w, bits, block, symmetric, positive=symmetric)
    else:
        q = gptq_codes(w, hessian, bits, block, positive=True)
    name = weight.name
    per_channel = bits == 8
    scales = q.scales[0] if per_channel else q.scales
    inputs = [f"{name}_q{bits}", f"{name}_scale"]
    model.graph.initializer.append(_int_tensor(q.codes, bits, symmetric, inputs[0]))
    model.graph.initializer.append(numpy_helper.from_array(scales, inputs[1]))
    if q.zero_points is not None:
        inputs.append(f"{name}_zero_point")
        zero = q.zero_points[0] if per_channel else q.zero_points
        model.graph.initializer.append(_int_tensor(zero, bits, False, inputs[2]))
    attrs = {"axis": 1} if per_channel else {"axis": 0, "block_size": block}
    return helper.make_node(
        "DequantizeLinear", inputs, [f"{name}_dequantized"], name=f"{name}_DequantizeLinear", **attrs
    )
