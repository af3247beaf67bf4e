"""The standard-ONNX weight-only form: block-wise ``DequantizeLinear`` (opset 21) before each MatMul.

This is what TensorRT (and any ONNX runtime) consumes for INT4/INT8 weight-only LLMs, next to
ONNX Runtime's own ``MatMulNBits`` form. It is made from the canonical (opset 17, explicit-cache)
LLM graph: the opset is raised to 21, which for these graphs only changes the reduce operators
(``axes`` moves from an attribute to an input, opset 18), and every constant 2-D MatMul weight
``W`` (K, N) — the LM head included — becomes ``DequantizeLinear(codes, scale, axis=0,
block_size)``. Codes follow the same symmetric convention as ``MatMulNBits``: round-to-nearest, or
GPTQ from Hessians captured through this graph.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from omniforge.calibration.gptq import gptq_quantize
from omniforge.calibration.tensors import session_with_outputs
from omniforge.errors import ConfigError

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


def rtn_codes(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest codes (K, N) and scales (ceil(K / block), N), MatMulNBits' convention."""
    k, n = w.shape
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    pad = (-k) % block
    wp = np.pad(w.astype(np.float32), ((0, pad), (0, 0))).reshape(-1, block, n)
    extreme = np.take_along_axis(wp, np.abs(wp).argmax(axis=1)[:, None, :], axis=1)[:, 0]
    scale = extreme / lo
    scale[scale == 0] = 1.0
    codes = np.clip(np.round(wp / scale[:, None, :]), lo, hi).astype(np.int32)
    return codes.reshape(-1, n)[:k], scale.astype(np.float32)


def _int_tensor(codes: np.ndarray, bits: int, name: str) -> onnx.TensorProto:
    if bits == 8:
        return numpy_helper.from_array(codes.astype(np.int8), name)
    flat = codes.astype(np.int8).ravel()
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    packed = ((flat[0::2] & 0x0F) | ((flat[1::2] & 0x0F) << 4)).astype(np.uint8)
    return helper.make_tensor(name, TensorProto.INT4, codes.shape, packed.tobytes(), raw=True)


def canonical_hessians(model: onnx.ModelProto, rows: list[np.ndarray]) -> dict[str, np.ndarray]:
    """``X^T X / tokens`` of each constant-weight MatMul's input, keyed by the weight's name (prefill, no past)."""
    weights = {t.name for t in model.graph.initializer}
    mm = {n.input[1]: n.input[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights}
    names = sorted(set(mm.values()))
    sess = session_with_outputs(model, names)
    past = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    acc = {n: 0.0 for n in names}
    count = 0
    for r in rows:
        s = r.shape[0]
        feeds = {
            "inputs_embeds": r[None].astype(np.float32),
            "attention_mask": np.ones((1, s), np.int64),
            "position_ids": np.arange(s, dtype=np.int64)[None],
        }
        for p in past:
            feeds[p.name] = np.zeros((1, p.shape[1], 0, p.shape[3]), np.float32)
        for n, v in zip(names, sess.run(names, feeds), strict=True):
            x = v.reshape(-1, v.shape[-1]).astype(np.float64)
            acc[n] = acc[n] + x.T @ x
        count += s
    return {w: acc[x] / count for w, x in mm.items()}


def dequantize_linear_form(
    model: onnx.ModelProto,
    bits: int = 4,
    block: int = 32,
    method: str = "rtn",
    rows: list[np.ndarray] | None = None,
) -> onnx.ModelProto:
    """The canonical LLM graph at opset 21 with every constant 2-D MatMul weight block-quantized."""
    if method not in ("rtn", "gptq"):
        raise ConfigError(f"the standard-ONNX form is made with rtn or gptq codes, not '{method}'")
    if method == "gptq" and not rows:
        raise ConfigError("GPTQ needs calibration rows")
    hs = canonical_hessians(model, rows) if method == "gptq" else {}
    out = upgrade_opset(model, 21)
    inits = {t.name: t for t in out.graph.initializer}
    done: dict[str, str] = {}
    new_nodes = []
    for node in out.graph.node:
        w_name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w_name in inits and len(inits[w_name].dims) == 2 and inits[w_name].data_type == TensorProto.FLOAT:
            if w_name not in done:
                w = numpy_helper.to_array(inits[w_name])
                if w_name in hs:
                    codes, scales = gptq_quantize(w, hs[w_name], bits, block)
                else:
                    codes, scales = rtn_codes(w, bits, block)
                q, s, deq = f"{w_name}_q{bits}", f"{w_name}_scale", f"{w_name}_dequantized"
                out.graph.initializer.append(_int_tensor(codes, bits, q))
                out.graph.initializer.append(numpy_helper.from_array(scales, s))
                new_nodes.append(
                    helper.make_node(
                        "DequantizeLinear",
                        [q, s],
                        [deq],
                        name=f"{w_name}_DequantizeLinear",
                        axis=0,
                        block_size=block,
                    )
                )
                done[w_name] = deq
            node.input[1] = done[w_name]
    for w_name in done:
        out.graph.initializer.remove(inits[w_name])
    nodes = new_nodes + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out
