"""The rules: each a pure function over one ONNX graph for one TensorRT version.

``RULES`` maps a rule's name to the function and the TensorRT versions it applies to; every
function returns the graph's ``Violation`` s of that rule (an empty list when it passes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from omniforge.engines.profiles import InputProfile
from omniforge.engines.trt_check.graph import GraphView, Violation, attribute, label, type_name
from omniforge.engines.trt_check.versions import FLOATS, VERSIONS, TrtVersion

Q, DQ = "QuantizeLinear", "DequantizeLinear"


@dataclass(frozen=True)
class Target:
    """What a graph is checked for: a TensorRT version and the optimization profile it will get."""

    version: TrtVersion
    profiles: tuple[InputProfile, ...] = ()


RuleFn = Callable[[GraphView, Target], list[Violation]]


@dataclass(frozen=True)
class Rule:
    name: str
    versions: tuple[str, ...]
    check: RuleFn
    source: str


def operator_support(g: GraphView, t: Target) -> list[Violation]:
    """Every node is an ai.onnx operator the version's parser supports, at an opset in its range.

    Source: onnx-tensorrt docs/operators.md (10.1 GA, 10.15 GA) and Changelog.md; TensorRT 11.0
    release notes. Other domains (com.microsoft, ai.onnx.ml) have no importer."""
    v = t.version
    out = []
    opset = g.opset("")
    lo, hi = v.opsets
    if opset is not None and not lo <= opset <= hi:
        out.append(
            Violation(
                "operator_support",
                "<model>",
                "opset",
                f"ai.onnx opset {opset} is outside TensorRT {v.name}'s documented range {lo}..{hi}",
            )
        )
    for n in g.nodes:
        if n.domain not in ("", "ai.onnx"):
            msg = f"domain '{n.domain}' is not ONNX's; TensorRT {v.name} has no importer for it"
            out.append(Violation("operator_support", label(n), n.op_type, msg))
        elif n.op_type not in v.ops:
            msg = f"not in TensorRT {v.name}'s supported ONNX operators"
            out.append(Violation("operator_support", label(n), n.op_type, msg))
    return out


def _each_qdq(g: GraphView, rule: str, out: list[Violation]):
    """Each Q/DQ node with a function that records a violation of ``rule`` at it."""
    for n in g.nodes:
        if n.op_type in (Q, DQ):

            def bad(msg: str, n: onnx.NodeProto = n) -> None:
                out.append(Violation(rule, label(n), n.op_type, msg))

            yield n, bad


def qdq_types(g: GraphView, t: Target) -> list[Violation]:
    """Q/DQ carry a quantized type TensorRT has (INT8, FP8, INT4; FP4 from 10.8), zero points are
    zero, scales are positive float constants.

    Source: operators.md DequantizeLinear row (INT8, FP8, INT4 in 10.1; + FP4 in 10.15) with
    "x_zero_point must be zero", QuantizeLinear "y_zero_point must be 0"; IDequantizeLayer docs:
    the scale is a build-time constant with strictly positive values; UINT8 only for DLA (10.11)."""
    v = t.version
    out = []
    for n, bad in _each_qdq(g, "qdq_types", out):
        qtype = _quantized_type(g, n)
        if qtype not in v.dequantize_types:
            what = "input" if n.op_type == DQ else "output"
            bad(
                f"quantized {what} is {type_name(qtype)}; TensorRT {v.name} quantizes to {_names(v.dequantize_types)}"
            )
        if n.op_type == Q and g.elem_type(n.input[0]) not in (None, *FLOATS):
            bad(f"input is {type_name(g.elem_type(n.input[0]))}; QuantizeLinear takes FP32, FP16 or BF16")
        scale = n.input[1]
        if not g.is_constant(scale):
            bad(f"scale '{scale}' is computed; TensorRT needs a build-time constant (initializer)")
        else:
            if g.elem_type(scale) not in FLOATS:
                bad(f"scale '{scale}' is {type_name(g.elem_type(scale))}; it must be FP32, FP16 or BF16")
            value = g.constant(scale)
            if value is not None and not np.all(value.astype(np.float64) > 0):
                bad(f"scale '{scale}' has values <= 0; TensorRT needs strictly positive scales")
        if len(n.input) > 2 and n.input[2]:
            zp = n.input[2]
            if not g.is_constant(zp):
                bad(f"zero point '{zp}' is computed; it must be a constant of zeros")
            else:
                value = g.constant(zp)
                if value is not None and np.any(value.astype(np.float64) != 0):
                    bad(f"zero point '{zp}' is not zero; TensorRT quantization is symmetric")
    return out


def block_quantization(g: GraphView, t: Target) -> list[Violation]:
    """Block-wise (``block_size``) Q/DQ: only the version's block types, only on constant weights,
    2-D in 10.x, blocked along one of the last two axes; INT4 only ever as weights; 11.x INT4 blocks
    of 64 or 128.

    Source: Dequantize operator page (10.x: "a 2-D tensor for block quantization (supported for
    DataType::kINT4 only)"; 11.x: INT4, FP4, FP8 and INT8), IDequantizeLayer ("blocking occurs in the
    last or second to last dimension"), Quantization Schemes 11.x ("supported block sizes are {64,
    128}"; "TensorRT only supports INT4 for weight quantization")."""
    v = t.version
    out = []
    for n, bad in _each_qdq(g, "block_quantization", out):
        qtype = _quantized_type(g, n)
        block = int(attribute(n, "block_size", 0) or 0)
        weights = n.op_type == DQ and g.is_constant(n.input[0])
        if qtype == onnx.TensorProto.INT4 and not weights:
            bad("INT4 is weight-only in TensorRT; this tensor is not a constant weight")
        if not block:
            continue
        if qtype not in v.block_types:
            bad(
                f"block-wise {type_name(qtype)}: TensorRT {v.name} block-quantizes only "
                f"{_names(v.block_types)} (INT8 weights take per-channel scales)"
            )
        if not weights:
            bad("block quantization applies to constant weights only")
        shape = g.shape(n.input[0]) if weights else None
        if shape is not None:
            rank = len(shape)
            axis = int(attribute(n, "axis", 1))
            axis = axis + rank if axis < 0 else axis
            if v.block_rank is not None and rank != v.block_rank:
                bad(f"blocked tensor has rank {rank}; TensorRT {v.name} blocks {v.block_rank}-D weights only")
            if axis not in (rank - 1, rank - 2):
                bad(f"blocked along axis {axis}; TensorRT blocks the last or second to last dimension")
        if v.int4_block_sizes and qtype == onnx.TensorProto.INT4 and block not in v.int4_block_sizes:
            sizes = ", ".join(map(str, sorted(v.int4_block_sizes)))
            bad(f"INT4 block size {block}; TensorRT {v.name} supports block sizes {sizes}")
    return out


_SAME_FLOAT_INPUTS = {
    op: None
    for op in "Add Sub Mul Div Pow Max Min Sum Mean MatMul Gemm Concat PRelu Equal Less Greater".split()
}
_SAME_FLOAT_INPUTS.update({"Where": (1, 2), "LessOrEqual": None, "GreaterOrEqual": None})


def strong_typing(g: GraphView, t: Target) -> list[Violation]:
    """In a strongly typed network every tensor keeps the type the graph gives it: float operands
    of one operation must share a type (insert a Cast), and a Q/DQ scale has the type of the float
    tensor it quantizes or produces.

    Source: TensorRT strongly typed networks (optional in 10.x, the only mode in 11.0 release
    notes); the operator pages' type constraints (Quantize: input and scale are T1; Dequantize:
    scale and output are the same type)."""
    out = []
    for n in g.nodes:
        if n.op_type in _SAME_FLOAT_INPUTS:
            idx = _SAME_FLOAT_INPUTS[n.op_type] or range(len(n.input))
            types = {g.elem_type(n.input[i]) for i in idx if i < len(n.input) and n.input[i]}
            floats = {x for x in types if x in FLOATS | {onnx.TensorProto.DOUBLE}}
            if len(floats) > 1:
                msg = f"mixes {' and '.join(sorted(map(type_name, floats)))} inputs without a Cast"
                out.append(Violation("strong_typing", label(n), n.op_type, msg))
        elif n.op_type in (Q, DQ) and len(n.input) > 1:
            scale = g.elem_type(n.input[1])
            other = g.elem_type(n.input[0]) if n.op_type == Q else _dq_output_type(g, n)
            if scale is not None and other is not None and scale != other:
                side = "input" if n.op_type == Q else "output"
                msg = f"scale is {type_name(scale)} but the {side} is {type_name(other)}"
                out.append(Violation("strong_typing", label(n), n.op_type, msg))
    return out


def constant_inputs(g: GraphView, t: Target) -> list[Violation]:
    """Inputs the support matrix requires to be build-time constants (shape-like operands such as
    ``axes``, ``depth``, ``axis``), and NonZero only on FP32/FP16 data.

    Source: operators.md Restrictions column (10.1: CumSum axis, Dropout is_training, OneHot depth,
    Pad axes until 10.4, Reduce* axes, Squeeze/Unsqueeze axes; 10.15 keeps all but Pad) and its
    NonZero row (FP32, FP16)."""
    out = []
    for n in g.nodes:
        need = t.version.constant_inputs.get(n.op_type)
        if need is not None:
            i, what = need
            if i < len(n.input) and n.input[i] and not g.is_constant(n.input[i]):
                msg = f"'{what}' input '{n.input[i]}' is computed; TensorRT {t.version.name} needs a constant"
                out.append(Violation("constant_inputs", label(n), n.op_type, msg))
        if n.op_type == "NonZero":
            x = g.elem_type(n.input[0])
            if x is not None and x not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                msg = f"input is {type_name(x)}; TensorRT's NonZero takes FP32 or FP16"
                out.append(Violation("constant_inputs", label(n), n.op_type, msg))
    return out


def profile_bounds(g: GraphView, t: Target) -> list[Violation]:
    """The optimization profile fits the network: min <= opt <= max on every axis, the rank is the
    graph input's, and an axis the graph fixes gets exactly that size at min, opt and max.

    Source: TensorRT optimization profiles (IOptimizationProfile::setDimensions: kMIN <= kOPT <=
    kMAX, and a build-time dimension must match the network's)."""
    out = []
    inputs = {i.name: i for i in g.graph.input if i.name not in g.initializers}
    for p in t.profiles:

        def bad(msg: str, p: InputProfile = p) -> None:
            out.append(Violation("profile_bounds", p.name, "input", msg))

        if not all(a <= b <= c for a, b, c in zip(p.min, p.opt, p.max, strict=False)):
            bad(f"min {p.min} <= opt {p.opt} <= max {p.max} does not hold")
        vi = inputs.get(p.name)
        if vi is None:
            bad("the profile names an input the graph does not have")
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != len(p.opt):
            bad(f"the graph input has rank {len(dims)}, the profile {len(p.opt)}")
            continue
        for axis, d in enumerate(dims):
            if d.HasField("dim_value"):
                sizes = {p.min[axis], p.opt[axis], p.max[axis]}
                if sizes != {d.dim_value}:
                    bad(f"axis {axis} is static {d.dim_value} in the graph; the profile sets {sorted(sizes)}")
    return out


RULES: dict[str, Rule] = {
    r.name: r
    for r in (
        Rule("operator_support", tuple(VERSIONS), operator_support, "operators.md, Changelog.md"),
        Rule("qdq_types", tuple(VERSIONS), qdq_types, "operators.md Q/DQ rows, IDequantizeLayer"),
        Rule(
            "block_quantization", tuple(VERSIONS), block_quantization, "Dequantize page, Quantization Schemes"
        ),
        Rule("strong_typing", ("10.12", "11"), strong_typing, "strongly typed networks, 11.0 notes"),
        Rule("constant_inputs", tuple(VERSIONS), constant_inputs, "operators.md Restrictions column"),
        Rule("profile_bounds", tuple(VERSIONS), profile_bounds, "optimization profiles"),
    )
}


def check_model(model: onnx.ModelProto, target: Target, rules: list[str] | None = None) -> list[Violation]:
    """Every violation of ``model`` against the rules that apply to ``target.version``."""
    g = GraphView(model)
    out = []
    for r in RULES.values():
        if (rules is None or r.name in rules) and target.version.name in r.versions:
            out.extend(r.check(g, target))
    return out


def _quantized_type(g: GraphView, n: onnx.NodeProto) -> int | None:
    """The low-precision type of a Q/DQ: DQ's input; Q's output (its zero point's type, else
    ``output_dtype``, else UINT8 as ONNX defines it)."""
    if n.op_type == DQ:
        return g.elem_type(n.input[0])
    if len(n.input) > 2 and n.input[2]:
        return g.elem_type(n.input[2])
    return int(attribute(n, "output_dtype", 0) or 0) or onnx.TensorProto.UINT8


def _dq_output_type(g: GraphView, n: onnx.NodeProto) -> int | None:
    return int(attribute(n, "output_dtype", 0) or 0) or g.elem_type(n.output[0])


def _names(types: frozenset[int]) -> str:
    return ", ".join(sorted(type_name(x) for x in types))
