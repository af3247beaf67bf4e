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
