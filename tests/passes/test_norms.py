import numpy as np
import onnx_ir as ir
from onnx import helper

from omniforge.passes.base import max_abs_diff
from omniforge.passes.norms import recognize_norms
from tests.passes.graphs import feeds, model, w

H = 8


def layernorm_graph(axes=(-1,)):
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=list(axes), keepdims=1),
        helper.make_node("Sub", ["x", "mean"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["d2"]),
        helper.make_node("ReduceMean", ["d2"], ["var"], axes=list(axes), keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["std"]),
        helper.make_node("Div", ["d", "std"], ["n"]),
        helper.make_node("Mul", ["n", "g"], ["s"]),
        helper.make_node("Add", ["s", "b"], ["y"]),
    ]
    inits = {"two": np.array(2.0, np.float32), "eps": np.array(1e-5, np.float32), "g": w(H) + 1, "b": w(H)}
    return model(nodes, [("x", [2, 3, H])], ["y"], inits)


def rms_graph(opset=17):
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1)
        if opset < 18
        else helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rms"]),
        helper.make_node("Div", ["one", "rms"], ["inv"]),
        helper.make_node("Mul", ["x", "inv"], ["n"]),
        helper.make_node("Mul", ["g", "n"], ["y"]),
    ]
    inits = {
        "two": np.array(2.0, np.float32),
        "eps": np.array(1e-6, np.float32),
        "one": np.array(1.0, np.float32),
        "g": w(H) + 1,
    }
    if opset >= 18:
        inits["axes"] = np.array([-1], np.int64)
    return model(nodes, [("x", [2, 3, H])], ["y"], inits, opset=opset)


def ops(m):
    return [n.op_type for n in m.graph]


def test_decomposed_layernorm_becomes_one_op():
    m = layernorm_graph()
    out = ir.from_proto(m)
    report = recognize_norms(out)
    assert report.fired == 1 and ops(out) == ["LayerNormalization"]
    assert max_abs_diff(m, out, feeds(m)) <= 1e-5


def test_layernorm_over_another_axis_is_left_alone():
    m = layernorm_graph(axes=(1,))
    out = ir.from_proto(m)
    assert recognize_norms(out).fired == 0 and "LayerNormalization" not in ops(out)


def test_rmsnorm_for_onnxruntime_uses_its_op():
    m = rms_graph()
    out = ir.from_proto(m)
    assert recognize_norms(out, target="onnxruntime").fired == 1
    assert ops(out) == ["SimplifiedLayerNormalization"]
    assert max_abs_diff(m, out, feeds(m)) <= 1e-5


def test_rmsnorm_stays_decomposed_below_opset_23_and_says_why():
    m = rms_graph()
    out = ir.from_proto(m)
    report = recognize_norms(out, target="onnx")
    assert report.fired == 0 and "opset 17 < 23" in report.notes[0]
    assert "Pow" in ops(out)


def test_rmsnorm_becomes_the_standard_op_at_opset_23():
    m = rms_graph(opset=23)
    out = ir.from_proto(m)
    assert recognize_norms(out, target="onnx").fired == 1
    assert ops(out) == ["RMSNormalization"]
    assert max_abs_diff(m, out, feeds(m)) <= 1e-5
