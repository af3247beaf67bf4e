"""TensorRT optimization profiles, the layers kept in FP32, and trtexec command lines.

The min/opt/max of every dynamic axis comes from the ``StageSpec`` dims (derived dims such as the
LLM's ``total = past + seq`` are summed), so the engine builder, ``trtexec`` and the benchmarks
agree on shapes. The FP32 layers are the norms found in the ONNX graph itself (fused norm ops and
the decomposed ``Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul`` forms); TensorRT names each layer
after its ONNX node, so the Polygraphy build and the emitted trtexec lines pin the same names.
"""

from __future__ import annotations

import shlex
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omniforge.errors import ConfigError
from omniforge.pipeline.spec import StageSpec

if TYPE_CHECKING:
    import onnx

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
TRT_VERSIONS = ("10.3", "10.12", "11")  # JetPack 6's TensorRT, the first strongly typed default, the newest
DEFAULT_TRT_VERSION = "11"
STRONGLY_TYPED_SINCE = (10, 12)  # precision flags deprecated from 10.12 and removed in 11
# the first TensorRT whose ONNX parser documents opset 21, the opset of the INT4 weight-only form
# (INT4 DequantizeLinear with block_size): onnx-tensorrt's Changelog moves to ONNX 1.17 in 10.6; the
# 10.1 GA operators page, which 10.2 and 10.3 leave unchanged, documents opsets 9..20
OPSET_21_SINCE = (10, 6)


def trt_version_tuple(version: str) -> tuple[int, int]:
    """(major, minor) of a TensorRT version string ("10.3", "10.12.0.36", "11")."""
    parts = version.strip().split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise ConfigError(f"'{version}' is not a TensorRT version (e.g. {', '.join(TRT_VERSIONS)})") from None


def strongly_typed(version: str) -> bool:
    """Whether builds for TensorRT ``version`` are strongly typed: the precision of every tensor is
    the graph's own (FP16 graphs with FP32 norms, Q/DQ graphs), and no precision flag is passed."""
    return trt_version_tuple(version) >= STRONGLY_TYPED_SINCE


def require_buildable(precision: str, trt_version: str) -> None:
    """One sentence (ConfigError) when TensorRT ``trt_version`` cannot take the graph omniforge writes
    for a stage of ``precision``; ``check-trt`` reports the same graph as outside that version's opsets."""
    if precision == "int4" and trt_version_tuple(trt_version) < OPSET_21_SINCE:
        raise ConfigError(
            f"TensorRT {trt_version} cannot build the INT4 LLM: its weight-only form needs ONNX opset 21 "
            f"(INT4 DequantizeLinear with block_size) and TensorRT {trt_version}'s ONNX parser documents "
            "opsets up to 20 (10.6 and later take it); build the LLM as int8 for this TensorRT "
            "(--stage-precision llm=int8)"
        )


@dataclass(frozen=True)
class InputProfile:
    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def profile_for(stage: StageSpec) -> list[InputProfile]:
    """One TensorRT optimization profile: min/opt/max shapes for every input of ``stage``."""
    sizes = {p: stage.resolve(p) for p in ("min", "opt", "max")}
    return [
        InputProfile(
            t.name,
            t.concrete_shape(sizes["min"]),
            t.concrete_shape(sizes["opt"]),
            t.concrete_shape(sizes["max"]),
        )
        for t in stage.inputs
    ]


def precision_flags(precision: str) -> list[str]:
    """trtexec flags for a build precision (INT8/INT4 come from the graph's explicit Q/DQ nodes)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    return {
        "fp32": [],
        "fp16": ["--fp16"],
        "bf16": ["--bf16"],
        "int8": ["--fp16", "--int8"],  # explicit quantization: Q/DQ in the graph, FP16 for the rest
        "int4": ["--fp16", "--int4"],
    }[precision]


# norm operators TensorRT parses to normalization layers or plugins: kept in FP32 whole
NORM_OPS = frozenset(
    {
        "LayerNormalization",
        "SimplifiedLayerNormalization",
        "RMSNormalization",
        "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "GroupNormalization",
        "InstanceNormalization",
    }
)
# between the variance and the normalizing product of a decomposed norm
_VARIANCE_TAIL = frozenset({"Add", "Sqrt", "Reciprocal", "Div", "Cast"})


class _Graph:
    """Producers and consumers of every tensor of one ONNX graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.nodes = list(graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in self.nodes:
            for i in n.input:
                self.consumers[i].append(n)
        self.constants = {t.name for t in graph.initializer}
        self.constants |= {o for n in self.nodes if n.op_type == "Constant" for o in n.output}

    def only_consumer(self, tensor: str):
        c = self.consumers.get(tensor, [])
        return c[0] if len(c) == 1 else None

    def is_constant(self, tensor: str) -> bool:
        n = self.producer.get(tensor)
        while n is not None and n.op_type in ("DequantizeLinear", "Cast"):
            if n.input[0] in self.constants:
                return True
            n = self.producer.get(n.input[0])
        return tensor in self.constants


def _other_input(node, tensor: str) -> str | None:
    rest = [i for i in node.input if i != tensor]
    return rest[0] if len(rest) == 1 else None


def _decomposed_norm(g: _Graph, square) -> list | None:
    """The nodes of the norm whose square (``Pow(x, 2)`` or ``Mul(x, x)``) is ``square``, or None
    when the pattern does not continue into ``ReduceMean -> [Add, Sqrt, Div|Reciprocal] -> Mul|Div(x)``."""
    if square.op_type == "Mul" and square.input[0] != square.input[1]:
        return None
    x = square.input[0]
    nodes = [square]
    node = g.only_consumer(square.output[0])
    if node is None or node.op_type != "ReduceMean":
        return None
    while node is not None:
        nodes.append(node)
        nxt = g.only_consumer(node.output[0])
        if nxt is None:
            return None
        if nxt.op_type in ("Mul", "Div") and _other_input(nxt, node.output[0]) == x:
            nodes.append(nxt)  # the normalizing product (or quotient) with x
            break
        node = nxt if nxt.op_type in _VARIANCE_TAIL else None
    else:
        return None
    nodes += _affine_tail(g, nodes[-1].output[0])
    nodes += _centering_head(g, x)
    return nodes


def _affine_tail(g: _Graph, tensor: str) -> list:
    """The norm's scale (and shift), possibly behind a Cast back to the input dtype."""
    out = []
    for ops in (("Cast",), ("Mul",), ("Add",)):
        n = g.only_consumer(tensor)
        if n is None or n.op_type not in ops:
            continue
        if n.op_type != "Cast" and not g.is_constant(_other_input(n, tensor) or ""):
            break
        out.append(n)
        tensor = n.output[0]
    return out


def _centering_head(g: _Graph, x: str) -> list:
    """A LayerNorm's ``x - ReduceMean(x)``, or the Cast to FP32 in front of an RMSNorm."""
    n = g.producer.get(x)
    if n is not None and n.op_type == "Sub":
        mean = g.producer.get(n.input[1])
        if mean is not None and mean.op_type == "ReduceMean" and mean.input[0] == n.input[0]:
            return [mean, n]
    if n is not None and n.op_type == "Cast" and all(c.op_type in ("Pow", "Mul") for c in g.consumers[x]):
        return [n]
    return []


def norm_groups(model: onnx.ModelProto) -> list[list[str]]:
    """The node names of every norm of ``model``'s main graph, one list per norm, in graph order."""
    g = _Graph(model.graph)
    groups = []
    for node in g.nodes:
        if node.op_type in NORM_OPS:
            groups.append([node])
        elif node.op_type in ("Pow", "Mul"):
            found = _decomposed_norm(g, node)
            if found:
                groups.append(found)
    return [[n.name for n in grp if n.name] for grp in groups]


def fp32_layers(graph: str | Path | onnx.ModelProto) -> list[str]:
    """The TensorRT layers (ONNX node names) to keep in FP32 for a graph built in reduced precision:
    every norm, fused or decomposed (variance overflows and loses precision in FP16)."""
    import onnx

    model = graph if isinstance(graph, onnx.ModelProto) else onnx.load(str(graph), load_external_data=False)
    seen: dict[str, None] = {}
    for grp in norm_groups(model):
        seen.update(dict.fromkeys(grp))
    return list(seen)


def _shapes(p: list[InputProfile], which: str) -> str:
    return ",".join(f"{i.name}:{'x'.join(str(d) for d in getattr(i, which))}" for i in p)


def trtexec_command(
    stage: StageSpec,
    onnx_path: str,
    engine_path: str,
    precision: str = "fp16",
    timing_cache: str = "timing.cache",
    fp32_layers: list[str] | None = None,
    trt_version: str = DEFAULT_TRT_VERSION,
) -> str:
    """The exact ``trtexec`` command that builds ``stage`` on a device with TensorRT ``trt_version``:
    ``--stronglyTyped`` from 10.12 on (the graph carries the precisions; ``precision`` and
    ``fp32_layers`` are not passed), precision flags and FP32 layer pins before it; a precision that
    version cannot build (``require_buildable``) is refused with one sentence."""
    require_buildable(precision, trt_version)
    prof = profile_for(stage)
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if any(i.min != i.max for i in prof):
        args += [
            f"--minShapes={_shapes(prof, 'min')}",
            f"--optShapes={_shapes(prof, 'opt')}",
            f"--maxShapes={_shapes(prof, 'max')}",
        ]
    if strongly_typed(trt_version):
        return " ".join(
            shlex.quote(a) for a in [*args, "--stronglyTyped", f"--timingCacheFile={timing_cache}"]
        )
    args += precision_flags(precision)
    args += [f"--timingCacheFile={timing_cache}"]
    if fp32_layers and precision != "fp32":  # norms compute and store in FP32 (variance overflows FP16)
        args += [
            "--precisionConstraints=obey",
            "--layerPrecisions=" + ",".join(f"{n}:fp32" for n in fp32_layers),
            "--layerOutputTypes=" + ",".join(f"{n}:fp32" for n in fp32_layers),
        ]
    return " ".join(shlex.quote(a) for a in args)
