import numpy as np
import onnx_ir as ir
from onnx import helper

from omniforge.passes.base import max_abs_diff
from omniforge.passes.fold_norm_linear import fold_norm_into_linear
from tests.passes.graphs import feeds, model, w

H, N = 8, 5


def ln_graph(consumers):
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5)]
    inits = {"g": w(H) + 1, "b": w(H), "W1": w(H, N), "W2": w(H, N), "c2": w(N)}
    outs = []
    for i, kind in enumerate(consumers):
        o = f"o{i}"
        if kind == "matmul":
            nodes.append(helper.make_node("MatMul", ["y", "W1"], [o]))
        elif kind == "matmul_bias":
            nodes += [
                helper.make_node("MatMul", ["y", "W2"], [f"m{i}"]),
                helper.make_node("Add", [f"m{i}", "c2"], [o]),
            ]
        elif kind == "gemm_t":
            inits["Wt"] = w(N, H)
            nodes.append(helper.make_node("Gemm", ["y", "Wt", "c2"], [o], transB=1))
        elif kind == "relu":
            nodes.append(helper.make_node("Relu", ["y"], [o]))
        outs.append(o)
    x_shape = [2, H] if "gemm_t" in consumers else [2, 3, H]
    return model(nodes, [("x", x_shape)], outs, inits)


def run_pass(m):
    ir_model = ir.from_proto(m)
    report = fold_norm_into_linear(ir_model)
    return ir_model, report


def test_layernorm_folds_into_matmuls_with_and_without_bias():
    m = ln_graph(["matmul", "matmul_bias"])
    out, report = run_pass(m)
    assert report.fired == 1
    ln = next(n for n in out.graph if n.op_type == "LayerNormalization")
    np.testing.assert_array_equal(ln.inputs[1].const_value.numpy(), 1.0)
    np.testing.assert_array_equal(ln.inputs[2].const_value.numpy(), 0.0)
    assert [n.op_type for n in out.graph].count("Add") == 2  # a bias was created for the bare MatMul
    assert max_abs_diff(m, out, feeds(m)) <= 1e-5


def test_gemm_with_transposed_weights():
    m = ln_graph(["gemm_t"])
    out, report = run_pass(m)
    assert report.fired == 1
    assert max_abs_diff(m, out, feeds(m)) <= 1e-5


def test_does_not_fire_with_a_nonlinear_consumer():
    m = ln_graph(["matmul", "relu"])
    out, report = run_pass(m)
    assert report.fired == 0 and "not linear" in report.notes[0] and "Relu" in report.notes[0]
    assert max_abs_diff(m, out, feeds(m)) == 0.0


def test_does_not_fire_when_the_norm_output_is_a_graph_output():
    m = model(
        [
            helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1),
            helper.make_node("MatMul", ["y", "W"], ["o"]),
        ],
        [("x", [2, H])],
        ["y", "o"],
        {"g": w(H), "b": w(H), "W": w(H, N)},
    )
    _, report = run_pass(m)
    assert report.fired == 0 and "graph output" in report.notes[0]


def test_decomposed_rmsnorm_tail_folds_and_disappears():
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rms"]),
        helper.make_node("Reciprocal", ["rms"], ["inv"]),
        helper.make_node("Mul", ["x", "inv"], ["normed"]),
        helper.make_node("Mul", ["normed", "gamma"], ["y"]),
        helper.make_node("MatMul", ["y", "Wq"], ["q"]),
        helper.make_node("MatMul", ["y", "Wk"], ["k"]),
    ]
    inits = {
        "two": np.array(2.0, np.float32),
        "eps": np.array(1e-6, np.float32),
        "gamma": w(H) + 1,
        "Wq": w(H, N),
        "Wk": w(H, 4),
    }
    m = model(nodes, [("x", [1, 3, H])], ["q", "k"], inits)
    out, report = run_pass(m)
    assert report.fired == 1
    assert [n.op_type for n in out.graph].count("Mul") == 1  # the gamma Mul is gone
    assert max_abs_diff(m, out, feeds(m)) <= 1e-5


def test_shared_weights_are_cloned_not_mutated():
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1),
        helper.make_node("MatMul", ["y", "W"], ["o1"]),
        helper.make_node("MatMul", ["z", "W"], ["o2"]),
    ]  # the same W used without a norm
    m = model(nodes, [("x", [2, H]), ("z", [2, H])], ["o1", "o2"], {"g": w(H) + 1, "b": w(H), "W": w(H, N)})
    out, report = run_pass(m)
    assert report.fired == 1
    assert max_abs_diff(m, out, feeds(m)) <= 1e-5
