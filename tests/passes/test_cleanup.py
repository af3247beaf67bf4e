import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from omniforge.passes.base import max_abs_diff
from omniforge.passes.cleanup import clean_shapes, fold_constants, fuse_linear
from omniforge.passes.precision import to_fp16_keep_norms
from tests.passes.graphs import feeds, model, w


def test_matmul_add_becomes_gemm_on_rank_2_only():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    m2 = model(nodes, [("x", [4, 6])], ["y"], {"W": w(6, 5), "b": w(5)})
    out = ir.from_proto(m2)
    assert fuse_linear(out).fired == 1 and [n.op_type for n in out.graph] == ["Gemm"]
    assert max_abs_diff(m2, out, feeds(m2)) <= 1e-5
    m3 = model(nodes, [("x", [2, 4, 6])], ["y"], {"W": w(6, 5), "b": w(5)})
    out3 = ir.from_proto(m3)
    assert fuse_linear(out3).fired == 0


def test_transpose_pairs_and_reshape_chains_collapse():
    nodes = [
        helper.make_node("Transpose", ["x"], ["t1"], perm=[0, 2, 1]),
        helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["t2", "s1"], ["r1"]),
        helper.make_node("Reshape", ["r1", "s2"], ["y"]),
    ]
    m = model(
        nodes,
        [("x", [2, 3, 4])],
        ["y"],
        {"s1": np.array([6, 4], np.int64), "s2": np.array([2, 12], np.int64)},
    )
    out = ir.from_proto(m)
    assert clean_shapes(out).fired >= 2
    fold_constants(out)
    assert [n.op_type for n in out.graph] == ["Reshape"]
    assert max_abs_diff(m, out, feeds(m)) == 0.0


def test_constant_subgraphs_fold_away():
    nodes = [
        helper.make_node("Add", ["c1", "c2"], ["c3"]),
        helper.make_node("Mul", ["x", "c3"], ["y"]),
        helper.make_node("Neg", ["x"], ["unused"]),
    ]
    m = model(nodes, [("x", [3])], ["y"], {"c1": w(3), "c2": w(3)})
    out = ir.from_proto(m)
    assert fold_constants(out).fired == 2
    assert [n.op_type for n in out.graph] == ["Mul"]
    assert max_abs_diff(m, out, feeds(m)) <= 1e-6


def test_fp16_keeps_norms_in_fp32():
    from onnx import TensorProto, numpy_helper

    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("LayerNormalization", ["h", "g", "b"], ["ln"], axis=-1),
        helper.make_node("Relu", ["ln"], ["y"]),
    ]
    inits = {"W": w(6, 8), "g": w(8) + 1, "b": w(8)}
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    half = to_fp16_keep_norms(m)
    types = {t.name: t.data_type for t in half.graph.initializer}
    assert types["W"] == onnx.TensorProto.FLOAT16  # the MatMul runs in fp16
    assert types["g"] == types["b"] == onnx.TensorProto.FLOAT  # the norm does not
    ln = next(n for n in half.graph.node if n.op_type == "LayerNormalization")
    producers = {o: n.op_type for n in half.graph.node for o in n.output}
    assert producers[ln.input[0]] == "Cast"  # fp16 activations are cast up before the norm
    assert max_abs_diff(m, half, feeds(m)) <= 2e-2
