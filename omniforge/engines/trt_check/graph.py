"""What the rules read from one ONNX graph: element types, constants and node labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper


@dataclass(frozen=True)
class Violation:
    """One thing TensorRT's documentation says it will not take."""

    rule: str
    node: str
    op_type: str
    message: str


class GraphView:
    """The main graph of ``model`` with its tensors' element types and constant values."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.nodes = list(model.graph.node)
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.constant_nodes = {n.output[0]: n for n in self.nodes if n.op_type == "Constant"}
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.types = _element_types(model)

    def opset(self, domain: str = "") -> int | None:
        for o in self.model.opset_import:
            if o.domain in (domain, "ai.onnx" if domain == "" else domain):
                return o.version
        return None

    def is_constant(self, name: str) -> bool:
        """An initializer or a ``Constant`` node's output: what TensorRT calls a build-time constant."""
        return name in self.initializers or name in self.constant_nodes

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor; None when it is not one or its data lives outside the file."""
        t = self.initializers.get(name)
        if t is None and name in self.constant_nodes:
            attr = next((a for a in self.constant_nodes[name].attribute if a.name == "value"), None)
            t = attr.t if attr is not None else None
        if t is None or t.data_location == onnx.TensorProto.EXTERNAL:
            return None
        return numpy_helper.to_array(t)

    def shape(self, name: str) -> tuple[int, ...] | None:
        t = self.initializers.get(name)
        if t is not None:
            return tuple(t.dims)
        value = self.constant(name)
        return None if value is None else value.shape

    def elem_type(self, name: str) -> int | None:
        return self.types.get(name)


def label(node: onnx.NodeProto) -> str:
    return node.name or (f"<{node.op_type} -> {node.output[0]}>" if node.output else f"<{node.op_type}>")


def type_name(elem_type: int | None) -> str:
    return "unknown" if elem_type is None else onnx.TensorProto.DataType.Name(elem_type)


def attribute(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor ONNX type inference can name (graph I/O, initializers, values)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # a graph inference rejects still gets its declared types checked
        inferred = model
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for vi in (*g.input, *g.output, *g.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for n in g.node:
        if n.op_type == "Constant":
            attr = next((a for a in n.attribute if a.name == "value"), None)
            if attr is not None:
                types[n.output[0]] = attr.t.data_type
    return types
