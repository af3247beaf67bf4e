"""``to_fp16_keep_norms``: constants beyond the FP16 range keep their readers FP32, and the graph it
writes is topologically sorted (ONNX's checker and ONNX Runtime take it)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from omniforge.passes.precision import to_fp16_keep_norms
from tests.passes.graphs import feeds, model, w

F32_MIN = np.float32(np.finfo(np.float32).min)
# the keys each query may attend to: none for the third (a padded query), all for the last
MASK = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], np.float32)
WHERE = [
    helper.make_node("Greater", ["m", "half"], ["keep"]),
    helper.make_node("Where", ["keep", "zero", "lowest"], ["bias"]),
]


def attention(mask_nodes: list[onnx.NodeProto], inits: dict[str, np.float32]) -> onnx.ModelProto:
    """softmax(x @ W + bias), ``bias`` made from the 0/1 input ``m`` by ``mask_nodes``."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["s"]),
        *mask_nodes,
        helper.make_node("Add", ["s", "bias"], ["sb"]),
        helper.make_node("Softmax", ["sb"], ["y"], axis=-1),
    ]
    consts = {k: np.asarray(v, np.float32) for k, v in inits.items()}
    return model(nodes, [("x", [4, 6]), ("m", [4, 4])], ["y"], {"W": w(6, 4), **consts})


MASKS = {
    "Where": lambda: attention(WHERE, {"half": 0.5, "zero": 0.0, "lowest": F32_MIN}),
    "Where, Constant node": lambda: attention(
        [helper.make_node("Constant", [], ["lowest"], value=numpy_helper.from_array(F32_MIN)), *WHERE],
        {"half": 0.5, "zero": 0.0},
    ),
    "(1 - m) * min": lambda: attention(
        [
            helper.make_node("Sub", ["one", "m"], ["off"]),
            helper.make_node("Mul", ["off", "lowest"], ["bias"]),
        ],
        {"one": 1.0, "lowest": F32_MIN},
    ),
}


def large_divisor() -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Div", ["h", "big"], ["d"]),
        helper.make_node("MatMul", ["d", "W2"], ["y"]),
    ]
    return model(
        nodes, [("x", [4, 6])], ["y"], {"W": w(6, 8), "big": np.array(2e5, np.float32), "W2": w(8, 4)}
    )


def softmax_between_matmuls() -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Softmax", ["h"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "W2"], ["y"]),
    ]
    return model(nodes, [("x", [2, 6])], ["y"], {"W": w(6, 8), "W2": w(8, 3)})


def value_float_constant() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Constant", [], ["c"], value_float=2.0),
        helper.make_node("Mul", ["x", "c"], ["y"]),
    ]
    return model(nodes, [("x", [4, 6])], ["y"], {})


GRAPHS = {
    **MASKS,
    "large divisor": large_divisor,
    "softmax between MatMuls": softmax_between_matmuls,
    "value_float Constant": value_float_constant,
}


def run(m: onnx.ModelProto, f: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, f)[0]


def mask_feeds(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    f = feeds(m)
    f["x"] = -10 * np.abs(f["x"])  # negative scores: -65504 + score overflows FP16
    f["m"] = MASK
    return f


@pytest.mark.parametrize("name", GRAPHS)
def test_nodes_come_out_in_topological_order(name):
    """The converter appends the Casts of graph inputs and of blocked nodes after their readers."""
    m = GRAPHS[name]()
    half = to_fp16_keep_norms(m)
    onnx.checker.check_model(half, full_check=True)
    known = {i.name for i in half.graph.input} | {t.name for t in half.graph.initializer} | {""}
    for n in half.graph.node:
        assert set(n.input) <= known, (n.op_type, n.name, set(n.input) - known)
        known.update(n.output)
    f = mask_feeds(m) if name in MASKS else feeds(m)
    np.testing.assert_allclose(run(half, f), run(m, f), rtol=1e-2, atol=2e-3)


@pytest.mark.parametrize("name", MASKS)
def test_a_finfo_min_attention_mask_keeps_parity(name):
    """Clamped to -65504, the mask quantizes a fully masked row's scores to FP16's spacing of 32 there
    (or overflows to -inf, NaN after the softmax); kept FP32 it matches the FP32 graph."""
    m = MASKS[name]()
    half = to_fp16_keep_norms(m)
    assert {t.name: t.data_type for t in half.graph.initializer}["W"] == TensorProto.FLOAT16
    f = mask_feeds(m)
    ref, out = run(m, f), run(half, f)
    np.testing.assert_allclose(ref[2], 0.25, atol=1e-6)  # FP32: a fully masked row is uniform
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, atol=2e-3)


def test_a_large_constant_is_not_clamped():
    """h / 2e5 read as h / 65504 is three times too large: the Div stays FP32 with its constant."""
    m = large_divisor()
    half = to_fp16_keep_norms(m)
    inits = {t.name: t for t in half.graph.initializer}
    assert inits["W"].data_type == TensorProto.FLOAT16
    assert inits["big"].data_type == TensorProto.FLOAT and numpy_helper.to_array(inits["big"]) == 2e5
    f = feeds(m)
    ref, out = run(m, f), run(half, f)
    np.testing.assert_allclose(out, ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())


def test_a_value_float_constant_loads():
    """A ``value_float`` Constant was left FP32 in front of its FP16 reader, which ONNX Runtime refuses."""
    m = value_float_constant()
    f = feeds(m)
    np.testing.assert_allclose(run(to_fp16_keep_norms(m), f), run(m, f), atol=1e-2)


def test_quiet_under_a_callers_info_logging(caplog: pytest.LogCaptureFixture) -> None:
    """A weight shared by a norm (kept FP32) and a converted node makes ONNX Runtime's converter
    log an INFO line per such initializer; a caller logging at INFO must not see it."""
    import logging

    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1),
        helper.make_node("Mul", ["n", "g"], ["y"]),
    ]
    m = model(nodes, [("x", [4, 6])], ["y"], {"g": w(6), "b": w(6)})
    with caplog.at_level(logging.INFO):
        out = to_fp16_keep_norms(m)
    assert not [r for r in caplog.records if r.name.startswith("onnxruntime")], caplog.text[:500]
    ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])


def rmsnorm(h: str, out: str) -> list[onnx.NodeProto]:
    """LLaMA's RMSNorm as the canonical LLM graph traces it: a Cast to FP32, ``x * 1/sqrt(mean(x**2)
    + eps)``, a Cast back and the gamma."""
    mk = helper.make_node
    return [
        mk("Cast", [h], ["hf"], to=TensorProto.FLOAT),
        mk("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
        mk("Pow", ["hf", "two"], ["sq"]),
        mk("ReduceMean", ["sq"], ["var"], axes=[-1], keepdims=1),
        mk("Constant", [], ["eps"], value=numpy_helper.from_array(np.array(1e-6, np.float32))),
        mk("Add", ["var", "eps"], ["ve"]),
        mk("Sqrt", ["ve"], ["std"]),
        mk("Constant", [], ["one"], value=numpy_helper.from_array(np.array(1.0, np.float32))),
        mk("Div", ["one", "std"], ["inv"]),
        mk("Mul", ["hf", "inv"], ["n"]),
        mk("Cast", ["n"], ["nc"], to=TensorProto.FLOAT),
        mk("Mul", ["gamma", "nc"], [out]),
    ]


def layernorm(h: str, out: str) -> list[onnx.NodeProto]:
    """LayerNorm decomposed: ``(x - mean) / sqrt(mean((x - mean)**2) + eps) * gamma + beta``."""
    mk = helper.make_node
    return [
        mk("ReduceMean", [h], ["mu"], axes=[-1], keepdims=1),
        mk("Sub", [h, "mu"], ["d"]),
        mk("Pow", ["d", "two"], ["sq"]),
        mk("ReduceMean", ["sq"], ["var"], axes=[-1], keepdims=1),
        mk("Add", ["var", "eps"], ["ve"]),
        mk("Sqrt", ["ve"], ["std"]),
        mk("Div", ["d", "std"], ["n"]),
        mk("Mul", ["n", "gamma"], ["g"]),
        mk("Add", ["g", "beta"], [out]),
    ]


def norm_between_layers(norm) -> onnx.ModelProto:
    """``norm(x + b) @ W``: the residual Add hands the norm an FP16 input, the MatMul reads its output."""
    nodes = [
        helper.make_node("Add", ["x", "b"], ["h"]),
        *norm("h", "y_norm"),
        helper.make_node("MatMul", ["y_norm", "W"], ["y"]),
    ]
    inits = {"b": w(16), "gamma": w(16) + 1, "W": w(16, 8)}
    if norm is layernorm:
        inits |= {"two": np.array(2.0, np.float32), "eps": np.array(1e-5, np.float32), "beta": w(16)}
    for k, n in enumerate(nodes):
        n.name = f"{n.op_type}_{k}"  # norm_groups names the norm's nodes
    return model(nodes, [("x", [4, 16])], ["y"], inits)


NORMS = {"RMSNorm": rmsnorm, "LayerNorm": layernorm}


@pytest.mark.parametrize("name", NORMS)
def test_a_decomposed_norm_computes_in_fp32_whole(name):
    """Hidden states of magnitude 1000: ``x**2`` (1e6) is far beyond FP16. Blocked one operator at a
    time, the norm stored it in FP16 between the Pow and the ReduceMean (inf, so a zero output); blocked
    whole up to its normalised output ``n`` it reads FP16 once, computes in FP32 and writes FP16 once.
    Its affine (gamma, beta) is FP16."""
    from omniforge.engines.profiles import norm_groups
    from omniforge.passes.precision import _element_types

    m = norm_between_layers(NORMS[name])
    group = set(norm_groups(m)[0])
    after, affine = {"n"}, set()
    for n in m.graph.node:
        if n.name in group and after.intersection(n.input):
            after.update(n.output)
            affine.add(n.name)
    assert affine < group and {"Pow", "ReduceMean", "Sqrt", "Div"} <= {
        n.op_type for n in m.graph.node if n.name in group - affine
    }
    half = to_fp16_keep_norms(m)
    onnx.checker.check_model(half, full_check=True)
    types = _element_types(half)
    assert types["W"] == TensorProto.FLOAT16 and types["h"] == TensorProto.FLOAT16  # the layers around: FP16
    norm = [n for n in half.graph.node if n.name in group - affine]
    assert len(norm) == len(group - affine)
    assert {types[t] for n in norm for t in (*n.input, *n.output)} == {TensorProto.FLOAT}
    produced = {o for n in norm for o in n.output}
    casts = [n for n in half.graph.node if n.op_type == "Cast" and n.name not in group]
    cast_in = [c for c in casts if any(c.output[0] in n.input for n in norm)]
    cast_out = [c for c in casts if c.input[0] in produced]
    assert [types[c.input[0]] for c in cast_in] == [TensorProto.FLOAT16]  # one Cast in ...
    assert [types[c.output[0]] for c in cast_out] == [TensorProto.FLOAT16]  # ... one Cast out
    assert {types[t] for n in half.graph.node if n.name in affine for t in n.output} == {TensorProto.FLOAT16}
    f = feeds(m)
    f["x"] *= 1000 / np.abs(f["x"]).max()
    ref, out = run(m, f), run(half, f)
    assert np.abs(ref).max() > 1  # the norm's output is O(1) whatever its input's magnitude
    np.testing.assert_allclose(out, ref, rtol=0, atol=5e-3 * np.abs(ref).max())  # FP16 MatMul rounding


def test_a_lone_pow_stays_fp16():
    """A square that feeds no reduction (GELU's tanh form cubes, this one squares) is no norm: it is
    converted like any elementwise operator, with no Casts around it."""
    from omniforge.passes.precision import _element_types

    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Pow", ["h", "two"], ["sq"], name="square"),
        helper.make_node("Add", ["h", "sq"], ["y"]),
    ]
    m = model(nodes, [("x", [4, 6])], ["y"], {"W": w(6, 8), "two": np.array(2.0, np.float32)})
    half = to_fp16_keep_norms(m)
    types = _element_types(half)
    square = next(n for n in half.graph.node if n.name == "square")
    assert {types[t] for t in (*square.input, *square.output)} == {TensorProto.FLOAT16}
    assert [n.op_type for n in half.graph.node].count("Cast") == 2  # the graph's input and output only
    f = feeds(m)
    np.testing.assert_allclose(run(half, f), run(m, f), rtol=1e-2, atol=1e-2)


def test_shape_inference_with_the_large_weights_lifted_out():
    """``infer_shapes`` of a model above 2 GB types its values without its large weights' bytes:
    the same value types and shapes as onnx's own inference, and the weights back in both models."""
    from omniforge.passes.base import LARGE_TENSOR_BYTES, infer_shapes

    big = w(1024, 512)
    assert big.nbytes > LARGE_TENSOR_BYTES
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Reshape", ["h", "shape"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["y"]),
    ]
    m = model(
        nodes, [("x", [4, 1024])], ["y"], {"W": big, "shape": np.array([8, 256], np.int64), "W2": w(256, 3)}
    )
    ours, theirs = infer_shapes(m, lift=True), onnx.shape_inference.infer_shapes(m)
    assert [v.SerializeToString() for v in ours.graph.value_info] == [
        v.SerializeToString() for v in theirs.graph.value_info
    ]
    assert {v.name for v in ours.graph.value_info} >= {"h", "r"}
    for g in (m, ours):
        weights = {t.name: numpy_helper.to_array(t) for t in g.graph.initializer}
        np.testing.assert_array_equal(weights["W"], big)
    np.testing.assert_array_equal(run(ours, feeds(ours)), run(m, feeds(m)))
