"""Precision guard: convert a graph to FP16 while norms and their reductions stay in FP32.

LayerNorm/RMSNorm in FP16 overflow in the variance (a known TensorRT issue), so the fused norm ops,
the reductions, the softmax and every decomposed norm from its centring or square through the
reduction to its normalised output (``engines.profiles.norm_groups``) are blocked from conversion.
A decomposed norm so computes in FP32 whole: it reads its FP16 input through one Cast and hands its
normalised output on through one Cast, with no FP16 tensor between its operators (``x**2``
overflows FP16 for ``|x| > 256``); its affine (gamma, beta), applied to a value of magnitude about 1,
is FP16 like the layers around it. A float constant beyond the FP16 range (an attention mask's
``finfo(float32).min``) is not clamped: the nodes it reaches stay FP32 (``CARRIERS``).
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
from omniforge.passes.base import infer_shapes

# blocked wherever they are; the elementwise operators of a decomposed norm (Pow, Sqrt, Reciprocal,
# Div, ...) are blocked as part of the norm (``norm_groups``), not alone: one of them alone in FP32
# would still hand its result on in FP16
FP32_OPS = [
    "LayerNormalization",
    "RMSNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "ReduceMean",
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

    Every norm is blocked (fused, or decomposed up to its normalised output: ``_normalisations``),
    with the constants only blocked nodes read (a norm's exponent and epsilon); the FP32 -> FP16 ->
    FP32 round trips the converter leaves between blocked nodes are removed, so a norm reads its
    FP16 input once, computes in FP32 and hands FP16 on. A float constant beyond the FP16 range, which the
    converter would clamp to +-65504 (an attention mask's ``finfo.min``: a fully masked row's scores
    then collapse onto FP16's spacing of 32), stays FP32 with its readers and what they feed through
    ``CARRIERS``. The nodes come out in topological order (the converter appends its Casts after
    their readers) and the value types are inferred anew (the converter declares FP16 also the
    initializers it keeps FP32 for blocked nodes)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # its INFO line lists every initializer shared by FP32 and FP16 nodes (the norms' weights, which
    # this pass keeps FP32 on purpose): thousands of lines when a caller's logging is at INFO
    logging.getLogger("onnxruntime.transformers.float16").setLevel(logging.WARNING)
    inferred = infer_shapes(model)  # the converter places Casts by value types
    _constants_as_tensors(inferred.graph)
    _name_nodes(inferred.graph)  # the converter blocks nodes by name
    blocked = set(_beyond_fp16_nodes(inferred.graph))
    blocked |= _normalisations(inferred)
    blocked |= {n.name for n in inferred.graph.node if n.op_type in FP32_OPS}
    blocked |= _constants_read_only_by(inferred.graph, blocked)
    converted = convert_float_to_float16(
        inferred,
        keep_io_types=True,
        op_block_list=FP32_OPS,
        node_block_list=sorted(blocked),
        disable_shape_infer=True,  # inferred above, also beyond 2 GB
    )
    del converted.graph.value_info[:]
    _sort(converted.graph)  # shape inference types a node's inputs only when they come first
    types = _element_types(infer_shapes(converted))
    drop_cast_round_trips(converted.graph, lambda name: types.get(name) == TensorProto.FLOAT)
    return infer_shapes(converted)


def _normalisations(model: onnx.ModelProto) -> set[str]:
    """The nodes of every norm of ``model`` (``engines.profiles.norm_groups``) up to its normalised
    output: a decomposed norm's affine (the gamma ``Mul``, beta ``Add`` and a Cast between them,
    downstream of the ``Mul``/``Div`` that normalises the squared tensor) is left out. Blocked with
    it, the affine would make ONNX Runtime's LayerNormFusion (which takes the Cast in front of the
    norm into the fused node) write a ``LayerNormalization`` of an FP16 input and FP32 weights, a
    type error at session creation."""
    from omniforge.engines.profiles import norm_groups

    nodes = {n.name: n for n in model.graph.node}
    kept: set[str] = set()
    for group in norm_groups(model):
        members = [nodes[name] for name in group]
        kept.update(group)
        square = next(
            (n for n in members if n.op_type == "Pow" or (n.op_type == "Mul" and n.input[0] == n.input[1])),
            None,
        )
        if square is None:  # a fused norm
            continue
        normaliser = next(
            n
            for n in members
            if n is not square and n.op_type in ("Mul", "Div") and square.input[0] in n.input
        )
        tensors, affine = set(normaliser.output), set()
        for n in members:  # norm_groups lists the affine in order, after the normaliser
            if n is not normaliser and tensors.intersection(n.input):
                affine.add(n.name)
                tensors.update(n.output)
        kept -= affine
    return kept


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give every unnamed node of ``graph`` a name of its own."""
    taken = {n.name for n in graph.node}
    for n in graph.node:
        if not n.name:
            n.name = next(f"{n.op_type}_fp32_{j}" for j in count() if f"{n.op_type}_fp32_{j}" not in taken)
            taken.add(n.name)


def _constants_read_only_by(graph: onnx.GraphProto, blocked: set[str]) -> set[str]:
    """The Constant nodes whose every reader is in ``blocked``."""
    readers: dict[str, list[str]] = defaultdict(list)
    for n in graph.node:
        for i in _reads(n):
            readers[i].append(n.name)
    return {
        n.name
        for n in graph.node
        if n.op_type == "Constant" and readers[n.output[0]] and set(readers[n.output[0]]) <= blocked
    }


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type of every typed tensor of ``model``'s main graph."""
    g = model.graph
    types = {t.name: t.data_type for t in g.initializer}
    for vi in (*g.input, *g.output, *g.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


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
    readers and what those feed through ``CARRIERS`` (up to an op of ``FP32_OPS``)."""
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
    return [n.name for n in keep]


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
