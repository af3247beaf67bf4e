"""Precision guard: convert a graph to FP16 while norms and their reductions stay in FP32.

LayerNorm/RMSNorm in FP16 overflow in the variance (a known TensorRT issue), so those ops and
the reductions of decomposed norms are blocked from conversion; Casts at their borders are
inserted by ONNX Runtime's float16 converter. A float constant beyond the FP16 range (an attention
mask's ``finfo(float32).min``) is not clamped: the nodes it reaches stay FP32 (``CARRIERS``).
"""

from __future__ import annotations

import heapq
import logging
from collections import defaultdict
from collections.abc import Callable
from itertools import count

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from omniforge.errors import ExportError

FP32_OPS = [
    "LayerNormalization",
    "RMSNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "ReduceMean",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Softmax",
]
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
# ops that hand a value beyond FP16 on to their readers (a mask's Where -> Add, Expand, Trilu, ...):
# after a reader of such a constant, these stay FP32 too, up to the next op of any other kind
CARRIERS = frozenset(
    {
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Neg",
        "Where",
        "Min",
        "Max",
        "Expand",
        "Tile",
        "Trilu",
        "Reshape",
        "Unsqueeze",
        "Squeeze",
        "Flatten",
        "Transpose",
        "Slice",
        "Gather",
        "Concat",
        "Identity",
        "Cast",
    }
)


def to_fp16_keep_norms(model: onnx.ModelProto) -> onnx.ModelProto:
    """An FP16 copy of ``model`` whose norms compute in FP32; inputs and outputs stay FP32.

    A float constant beyond the FP16 range, which the converter would clamp to +-65504 (an attention
    mask's ``finfo.min``: a fully masked row's scores then collapse onto FP16's spacing of 32), stays
    FP32 with its readers and what they feed through ``CARRIERS``; the nodes come out in topological
    order (the converter appends its Casts after their readers)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # its INFO line lists every initializer shared by FP32 and FP16 nodes (the norms' weights, which
    # this pass keeps FP32 on purpose): thousands of lines when a caller's logging is at INFO
    logging.getLogger("onnxruntime.transformers.float16").setLevel(logging.WARNING)
    inferred = onnx.shape_inference.infer_shapes(model)  # the converter places Casts by value types
    _constants_as_tensors(inferred.graph)
    kept = _beyond_fp16_nodes(inferred.graph)
    converted = convert_float_to_float16(
        inferred, keep_io_types=True, op_block_list=FP32_OPS, node_block_list=kept
    )
    _without_round_trips(
        converted.graph, {o for n in converted.graph.node if n.name in kept for o in n.output}
    )
    _sort(converted.graph)
    return converted


def _constants_as_tensors(graph: onnx.GraphProto) -> None:
    """``value_float(s)`` Constants as ``value`` tensors, which the converter converts (it leaves the
    former FP32 behind FP16-typed readers)."""
    for n in graph.node:
        a = n.attribute[0] if n.op_type == "Constant" and len(n.attribute) == 1 else None
        if a is not None and a.name in ("value_float", "value_floats"):
            value = np.array(a.f if a.name == "value_float" else list(a.floats), np.float32)
            del n.attribute[:]
            n.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value)))


def _beyond(t: TensorProto) -> bool:
    """Whether FP32 tensor ``t`` holds a finite value FP16 cannot (infinities stay as they are)."""
    if t.data_type != TensorProto.FLOAT:
        return False
    a = numpy_helper.to_array(t)
    return bool((np.abs(a[np.isfinite(a)]) > FP16_MAX).any())


def _beyond_fp16_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of the nodes that keep constants beyond FP16 in FP32: the Constants themselves, their
    readers and what those feed through ``CARRIERS`` (up to an op of ``FP32_OPS``); unnamed ones get
    a name."""
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            readers[i].append(n)
    sources = [n for n in graph.node if n.op_type in ("Constant", "ConstantOfShape")]
    keep = [n for n in sources if any(a.name == "value" and _beyond(a.t) for a in n.attribute)]
    beyond = {t.name for t in graph.initializer if _beyond(t)} | {o for n in keep for o in n.output}
    queue = [r for name in beyond for r in readers[name]]
    seen = {id(n) for n in keep}
    while queue:
        n = queue.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        keep.append(n)
        if n.op_type not in FP32_OPS:
            queue += [r for o in n.output for r in readers[o] if r.op_type in CARRIERS]
    taken = {n.name for n in graph.node}
    for n in keep:
        if not n.name:  # the converter blocks nodes by name
            n.name = next(f"{n.op_type}_fp32_{j}" for j in count() if f"{n.op_type}_fp32_{j}" not in taken)
            taken.add(n.name)
    return [n.name for n in keep]


def _without_round_trips(graph: onnx.GraphProto, fp32: set[str]) -> None:
    """Readers of ``Cast(FP32 -> FP16) -> Cast(-> FP32)`` of a tensor of ``fp32`` read that tensor
    itself (the converter casts between two FP32 nodes through FP16, where such a value overflows)."""
    drop_cast_round_trips(graph, fp32.__contains__)


def drop_cast_round_trips(graph: onnx.GraphProto, is_fp32: Callable[[str], bool]) -> None:
    """Drop ``Cast(-> FP16) -> Cast(-> FP32)`` pairs over a tensor ``is_fp32`` accepts: the second
    Cast's readers read the FP32 tensor itself (exact, where the pair would round it to FP16); a
    graph output keeps its name through an ``Identity``; Casts nobody reads any more are dropped."""
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    kept = []
    for n in graph.node:
        first = producer.get(n.input[0]) if n.op_type == "Cast" and _to(n) == TensorProto.FLOAT else None
        if (
            first is None
            or first.op_type != "Cast"
            or _to(first) != TensorProto.FLOAT16
            or not is_fp32(first.input[0])
        ):
            kept.append(n)
        elif n.output[0] in outputs:
            kept.append(helper.make_node("Identity", [first.input[0]], list(n.output), name=n.name))
        else:
            rename[n.output[0]] = first.input[0]
    for n in kept:
        n.input[:] = [rename.get(i, i) for i in n.input]
    read = {i for n in kept for i in _reads(n)} | outputs
    del graph.node[:]
    graph.node.extend(n for n in kept if n.op_type != "Cast" or any(o in read for o in n.output))


def _to(node: onnx.NodeProto) -> int | None:
    """The element type a Cast casts to."""
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _reads(node: onnx.NodeProto) -> list[str]:
    """The tensors ``node`` reads, those its subgraphs read from outer scopes included."""
    names = list(node.input)
    for a in node.attribute:
        for g in [a.g, *a.graphs]:
            names += [i for n in g.node for i in _reads(n)]
    return names


def _sort(graph: onnx.GraphProto) -> None:
    """Put ``graph``'s nodes in topological order, otherwise in the order they were."""
    nodes = list(graph.node)
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    deps = [{producer[i] for i in _reads(n) if i in producer} - {k} for k, n in enumerate(nodes)]
    readers: dict[int, list[int]] = defaultdict(list)
    for k, d in enumerate(deps):
        for p in d:
            readers[p].append(k)
    missing = [len(d) for d in deps]
    ready = [k for k, m in enumerate(missing) if m == 0]  # ascending: already a heap
    order: list[int] = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for r in readers[k]:
            missing[r] -= 1
            if missing[r] == 0:
                heapq.heappush(ready, r)
    if len(order) < len(nodes):
        raise ExportError("the FP16 graph has a cycle, so its nodes cannot be ordered")
    del graph.node[:]
    graph.node.extend(nodes[k] for k in order)
