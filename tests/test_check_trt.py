"""``omniforge check-trt``: TensorRT's documented ONNX rules, checked without a GPU.

Each rule breaks on a tiny hand-made graph and passes on its fixed twin; the real builds (the FP32
default build and one quantized build) are checked for every version and their findings pinned.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from omniforge.cli import main
from omniforge.engines.profiles import InputProfile
from omniforge.engines.trt_check import RULES, VERSIONS, Target, check_build, check_model, trt_graph, version
from omniforge.errors import ConfigError
from omniforge.pipeline.contracts import Role
from omniforge.pipeline.manifest import load_manifest

ALL = list(VERSIONS)


def _model(nodes, inputs, outputs, inits=(), opset=17, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    return helper.make_model(graph, opset_imports=opsets)


def _vi(name, elem=T.FLOAT, shape=(2, 4)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def _found(model, v, rule, profiles=()):
    return [(x.node, x.op_type) for x in check_model(model, Target(version(v), tuple(profiles)), [rule])]


def _dq_model(q, scale, zp=None, opset=21, **attrs):
    """x (constant ``q``) -> DequantizeLinear(scale[, zp]) -> MatMul with a float input."""
    inits = [numpy_helper.from_array(scale, "s")]
    inputs = ["w", "s"]
    if zp is not None:
        inits.append(zp)
        inputs.append("zp")
    inits.append(q)
    nodes = [
        helper.make_node("DequantizeLinear", inputs, ["wd"], name="dq", **attrs),
        helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm"),
    ]
    k, n = (q.dims[0], q.dims[1]) if len(q.dims) == 2 else (q.dims[-2], q.dims[-1])
    return _model(nodes, [_vi("x", shape=(2, k))], [_vi("y", shape=(2, n))], inits, opset)


def _int(name, values, elem):
    return helper.make_tensor(name, elem, list(values.shape), values.flatten().tolist())


# ---- rule 1: operators and opsets ------------------------------------------------------------------


def test_operator_support_flags_custom_domains_unsupported_ops_and_opsets():
    ms = helper.make_opsetid("com.microsoft", 1)
    bad = _model(
        [
            helper.make_node("Relu", ["x"], ["a"], name="relu"),
            helper.make_node(
                "SkipSimplifiedLayerNormalization", ["a", "x"], ["b"], name="ssln", domain="com.microsoft"
            ),
            helper.make_node("Unique", ["b"], ["y"], name="uniq"),
        ],
        [_vi("x")],
        [_vi("y")],
        extra_opsets=[ms],
    )
    for v in ALL:
        assert _found(bad, v, "operator_support") == [
            ("ssln", "SkipSimplifiedLayerNormalization"),
            ("uniq", "Unique"),
        ]
    good = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [_vi("x")], [_vi("y")])
    assert all(_found(good, v, "operator_support") == [] for v in ALL)
    at21 = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [_vi("x")], [_vi("y")], opset=21)
    assert _found(at21, "10.3", "operator_support") == [("<model>", "opset")]  # 10.x documents 9..20
    assert _found(at21, "10.12", "operator_support") == _found(at21, "11", "operator_support") == []
    # what came after 10.3: RMSNormalization (opset 23) in 10.15, so in 11 only
    rms = _model(
        [helper.make_node("RMSNormalization", ["x", "g"], ["y"], name="rms")],
        [_vi("x")],
        [_vi("y")],
        [numpy_helper.from_array(np.ones(4, np.float32), "g")],
        opset=23,
    )
    assert _found(rms, "10.12", "operator_support") == [("<model>", "opset"), ("rms", "RMSNormalization")]
    assert _found(rms, "11", "operator_support") == []


# ---- rule 2: Q/DQ types, zero points, scales --------------------------------------------------------


def test_qdq_types_flag_int32_uint8_nonzero_points_and_bad_scales():
    w8 = _int("w", np.ones((4, 3), np.int8), T.INT8)
    good = _dq_model(w8, np.full(3, 0.1, np.float32), axis=1, opset=17)
    assert all(_found(good, v, "qdq_types") == [] for v in ALL)
    bias = _dq_model(_int("w", np.ones((4, 3), np.int32), T.INT32), np.full(3, 0.1, np.float32), axis=1)
    assert all(_found(bias, v, "qdq_types") == [("dq", "DequantizeLinear")] for v in ALL)  # ORT's INT32 bias
    zp = _int("zp", np.full(3, 128, np.uint8), T.UINT8)
    uint8 = _dq_model(_int("w", np.ones((4, 3), np.uint8), T.UINT8), np.full(3, 0.1, np.float32), zp, axis=1)
    got = check_model(uint8, Target(version("11")), ["qdq_types"])
    assert {x.message.split(";")[0] for x in got} == {
        "quantized input is UINT8",
        "zero point 'zp' is not zero",
    }
    negative = _dq_model(w8, np.array([0.1, -0.1, 0.1], np.float32), axis=1)
    assert "strictly positive" in check_model(negative, Target(version("10.3")), ["qdq_types"])[0].message
    # QuantizeLinear without a zero point produces UINT8 (ONNX's default); with an INT8 zero 0 it passes
    for zero, expect in ((None, [("q", "QuantizeLinear")]), (np.zeros((), np.int8), [])):
        inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s")]
        inputs = ["x", "s"]
        if zero is not None:
            inits.append(numpy_helper.from_array(zero, "z"))
            inputs.append("z")
        m = _model(
            [
                helper.make_node("QuantizeLinear", inputs, ["q"], name="q"),
                helper.make_node("DequantizeLinear", ["q", "s", *inputs[2:]], ["y"], name="dq"),
            ],
            [_vi("x")],
            [_vi("y")],
            inits,
        )
        assert _found(m, "10.12", "qdq_types") == expect + ([("dq", "DequantizeLinear")] if expect else [])
    computed = _model(
        [
            helper.make_node("Abs", ["x"], ["s"], name="abs"),
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], name="q"),
        ],
        [_vi("x", shape=())],
        [_vi("y", T.INT8, ())],
        [numpy_helper.from_array(np.zeros((), np.int8), "z")],
    )
    assert "build-time constant" in check_model(computed, Target(version("11")), ["qdq_types"])[0].message


# ---- rule 3: block quantization ---------------------------------------------------------------------


def test_block_quantization_is_int4_2d_constant_weights_with_version_rules():
    scale64 = np.full((1, 3), 0.1, np.float32)
    int4 = _dq_model(_int("w", np.ones((64, 3), np.int8), T.INT4), scale64, axis=0, block_size=64)
    assert all(_found(int4, v, "block_quantization") == [] for v in ALL)
    int8 = _dq_model(_int("w", np.ones((64, 3), np.int8), T.INT8), scale64, axis=0, block_size=64)
    assert (
        _found(int8, "10.3", "block_quantization")
        == _found(int8, "10.12", "block_quantization")
        == [("dq", "DequantizeLinear")]
    )
    assert _found(int8, "11", "block_quantization") == []  # 11.x documents INT8 block quantization
    scale32 = np.full((2, 3), 0.1, np.float32)
    block32 = _dq_model(_int("w", np.ones((64, 3), np.int8), T.INT4), scale32, axis=0, block_size=32)
    assert _found(block32, "10.12", "block_quantization") == []
    assert _found(block32, "11", "block_quantization") == [("dq", "DequantizeLinear")]  # 64 or 128 in 11.x
    w3 = _int("w", np.ones((2, 64, 3), np.int8), T.INT4)
    rank3 = _dq_model(w3, np.full((2, 1, 3), 0.1, np.float32), axis=0, block_size=64)
    messages = [x.message for x in check_model(rank3, Target(version("10.3")), ["block_quantization"])]
    assert any("rank 3" in m for m in messages) and any("axis 0" in m for m in messages)
    # INT4 activations (a DQ of a computed tensor) are refused: INT4 is weight-only
    act = _model(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq"),
        ],
        [_vi("x")],
        [_vi("y")],
        [numpy_helper.from_array(np.array(0.1, np.float32), "s"), _int("z", np.zeros((), np.int8), T.INT4)],
        opset=21,
    )
    assert _found(act, "11", "block_quantization") == [("q", "QuantizeLinear"), ("dq", "DequantizeLinear")]


# ---- rule 4: strong typing ----------------------------------------------------------------------------


def test_strong_typing_flags_mixed_float_operands_and_scale_types():
    add = _model(
        [helper.make_node("Add", ["a", "b"], ["y"], name="add")],
        [_vi("a", T.FLOAT16), _vi("b")],
        [_vi("y", T.FLOAT16)],
    )
    assert _found(add, "10.12", "strong_typing") == _found(add, "11", "strong_typing") == [("add", "Add")]
    assert _found(add, "10.3", "strong_typing") == []  # the rule is for 10.12 and 11
    cast = _model(
        [
            helper.make_node("Cast", ["b"], ["bh"], name="cast", to=T.FLOAT16),
            helper.make_node("Add", ["a", "bh"], ["y"], name="add"),
        ],
        [_vi("a", T.FLOAT16), _vi("b")],
        [_vi("y", T.FLOAT16)],
    )
    assert _found(cast, "11", "strong_typing") == []
    q = _model(  # FP16 data quantized with an FP32 scale (valid ONNX at opset 21, not strongly typed)
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], name="q")],
        [_vi("x", T.FLOAT16)],
        [_vi("y", T.INT8)],
        [
            numpy_helper.from_array(np.array(0.1, np.float32), "s"),
            numpy_helper.from_array(np.zeros((), np.int8), "z"),
        ],
        opset=21,
    )
    assert _found(q, "11", "strong_typing") == [("q", "QuantizeLinear")]


# ---- rule 5: inputs the matrix requires constant ---------------------------------------------------


def test_constant_inputs_flags_computed_axes_and_nonzero_types():
    def reduce(axes_from_graph):
        nodes = [helper.make_node("ReduceSum", ["x", "axes"], ["y"], name="rs", keepdims=1)]
        inits = [] if axes_from_graph else [numpy_helper.from_array(np.array([1], np.int64), "axes")]
        inputs = [_vi("x"), *([_vi("axes", T.INT64, (1,))] if axes_from_graph else [])]
        return _model(nodes, inputs, [_vi("y", shape=(2, 1))], inits)

    assert all(_found(reduce(True), v, "constant_inputs") == [("rs", "ReduceSum")] for v in ALL)
    assert all(_found(reduce(False), v, "constant_inputs") == [] for v in ALL)
    pad = _model(
        [helper.make_node("Pad", ["x", "pads", "", "axes"], ["y"], name="pad")],
        [_vi("x"), _vi("axes", T.INT64, (1,))],
        [_vi("y", shape=(2, 6))],
        [numpy_helper.from_array(np.array([1, 1], np.int64), "pads")],
        opset=18,
    )
    assert _found(pad, "10.3", "constant_inputs") == [("pad", "Pad")]  # tensor Pad axes came in 10.4
    assert _found(pad, "10.12", "constant_inputs") == []
    for elem, expect in ((T.INT64, [("nz", "NonZero")]), (T.FLOAT, [])):
        nz = _model(
            [helper.make_node("NonZero", ["x"], ["y"], name="nz")],
            [_vi("x", elem)],
            [_vi("y", T.INT64, (2, "n"))],
        )
        assert _found(nz, "11", "constant_inputs") == expect


# ---- rule 6: profile bounds -------------------------------------------------------------------------


def test_profile_bounds_against_static_dims_and_order():
    m = _model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        [_vi("x", shape=("b", 4))],
        [_vi("y", shape=("b", 4))],
    )
    fits = InputProfile("x", (1, 4), (2, 4), (8, 4))
    assert all(_found(m, v, "profile_bounds", [fits]) == [] for v in ALL)
    static = InputProfile("x", (1, 2), (2, 4), (8, 8))  # axis 1 is 4 in the graph
    assert _found(m, "10.3", "profile_bounds", [static]) == [("x", "input")]
    backwards = InputProfile("x", (4, 4), (2, 4), (8, 4))
    assert (
        "does not hold" in check_model(m, Target(version("11"), (backwards,)), ["profile_bounds"])[0].message
    )
    rank = InputProfile("x", (1,), (2,), (8,))
    assert "rank" in check_model(m, Target(version("11"), (rank,)), ["profile_bounds"])[0].message


def test_registry_and_versions():
    assert set(RULES) == {
        "operator_support",
        "qdq_types",
        "block_quantization",
        "strong_typing",
        "constant_inputs",
        "profile_bounds",
    }
    assert RULES["strong_typing"].versions == ("10.12", "11")
    assert ALL == ["10.3", "10.12", "11"]
    with pytest.raises(ConfigError, match="is not one check-trt knows"):
        version("9.0")


# ---- the builds omniforge writes -------------------------------------------------------------------


def test_default_fp32_build_is_clean_for_every_version(default_build, capsys):
    findings = check_build(default_build, ALL)
    m = load_manifest(default_build)
    assert len(findings) == 3 * len(m.stages)
    assert all(f.variant.role is Role.CANONICAL and not f.violations for f in findings)
    assert main(["check-trt", str(default_build), "--stage", "llm", "--trt-version", "10.3"]) == 0
    out = capsys.readouterr().out
    assert "llm" in out and ": ok" in out and "0 violation(s)" in out


def test_cli_refuses_unknown_stage_and_build(default_build, tmp_path, capsys):
    assert main(["check-trt", str(default_build), "--stage", "nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("omniforge: error: this build has no stage 'nope'")
    assert main(["check-trt", str(tmp_path)]) == 1
    assert "is not a build folder" in capsys.readouterr().err


@pytest.fixture(scope="module")
def int8_build(default_builds):
    """One quantized build, ``omniforge build --precision int8``: the INT8 weight-only LLM
    (TensorRT's W8A16 DequantizeLinear form) and static INT8 QDQ for the convolution stages."""
    return default_builds[0]["int8"]


def _dq_nodes(model, pred):
    """Names of the DequantizeLinear nodes of constants whose (input type, scale values) satisfy ``pred``."""
    inits = {t.name: t for t in model.graph.initializer}
    return {
        n.name
        for n in model.graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[0] in inits
        and pred(inits[n.input[0]].data_type, numpy_helper.to_array(inits[n.input[1]]))
    }


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _weight_matmul_types(model):
    """Element types of the outputs of the MatMuls whose weight is dequantized."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        vi.name: vi.type.tensor_type.elem_type for vi in (*inferred.graph.value_info, *inferred.graph.output)
    }
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {types.get(n.output[0]) for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in dq}


def _assert_tensorrt_qdq_placement(model, name):
    """What TensorRT's explicit quantization expects of a static INT8 graph: every quantized
    Conv/MatMul/Gemm reads both its inputs through DequantizeLinear (activations per tensor,
    constant INT8 weights per output channel), biases stay float, nothing is INT32."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    quantized = 0
    for n in model.graph.node:
        if n.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        a, w = (producer.get(i) for i in n.input[:2])
        if not (w is not None and w.op_type == "DequantizeLinear" and w.input[0] in inits):
            continue  # a layer the quantizer left FP32 (e.g. an attention MatMul of two activations)
        quantized += 1
        assert a is not None and a.op_type == "DequantizeLinear", (name, n.name)
        assert inits[w.input[0]].data_type == T.INT8, (name, n.name)
        scale = numpy_helper.to_array(inits[w.input[1]])
        trans_b = _attrs(n).get("transB", 0)
        out_axis = {"Conv": 0, "MatMul": 1, "Gemm": 0 if trans_b else 1}[n.op_type]
        if scale.size > 1:
            assert _attrs(w).get("axis", 1) == out_axis, (name, n.name)
        assert numpy_helper.to_array(inits[a.input[1]]).size == 1, (name, n.name)  # activations per tensor
        if len(n.input) > 2 and n.input[2]:  # the bias: a float constant (the vocoder's behind an Identity)
            bias = producer.get(n.input[2])
            source = bias.input[0] if bias is not None and bias.op_type == "Identity" else n.input[2]
            assert source in inits and inits[source].data_type == T.FLOAT, (name, n.name)
    assert quantized, name
    assert not _dq_nodes(model, lambda t, _s: t == T.INT32), name


def test_quantized_build_passes_every_rule_for_every_version(int8_build, capsys):
    """The graphs a quantized build hands TensorRT: static INT8 QDQ with float biases in TensorRT's
    Q/DQ placement, and the LLM's W8A16 form (per-channel INT8, positive FP16 scales, opset 19)."""
    m = load_manifest(int8_build)
    findings = check_build(int8_build, ALL)
    assert len(findings) == 3 * len(m.stages)
    assert [(f.stage, f.trt_version, f.violations) for f in findings if f.violations] == []
    roles = set()
    for name, sb in m.stages.items():
        variant = trt_graph(sb)
        roles.add(variant.role)
        model = onnx.load(str(int8_build / variant.file))
        if variant.role is Role.QDQ:
            _assert_tensorrt_qdq_placement(model, name)
        elif variant.role is Role.WEIGHT_ONLY_DQ:
            assert next(o.version for o in model.opset_import if o.domain == "") == 19
            dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
            assert dq and all(_attrs(n) == {"axis": 1} for n in dq)  # per output channel, no block_size
            assert _dq_nodes(
                model, lambda t, s: t == T.INT8 and s.dtype == np.float16 and bool((s > 0).all())
            )
            assert _dq_nodes(model, lambda _t, _s: True) == {n.name for n in dq}
            assert _weight_matmul_types(model) == {T.FLOAT16}  # W8A16: FP16 activations
    assert roles == {Role.QDQ, Role.WEIGHT_ONLY_DQ, Role.CANONICAL}
    assert main(["check-trt", str(int8_build)]) == 0
    out = capsys.readouterr().out
    assert "0 violation(s)" in out and "vocoder" in out and "weight_only_dq" in out


def test_int4_weight_only_form_is_w4a16_and_refused_where_its_opset_is_not_documented(
    default_build, pipeline
):
    """TensorRT's INT4 form of the default LLM: blocks of 64 along K, positive FP16 scales, FP16
    activations, opset 21. 10.12 and 11 take it; 10.3 documents opsets up to 20, which check-trt
    reports and the build refuses in one sentence."""
    from omniforge.calibration.codes import rtn_codes
    from omniforge.calibration.standard_form import dequantize_linear_form, unquantized_weights
    from omniforge.engines.profiles import require_buildable, trtexec_command

    m = load_manifest(default_build)
    canonical = onnx.load(str(default_build / m.stages["llm"].canonical.file))
    q = dequantize_linear_form(canonical, bits=4, block=64)
    onnx.checker.check_model(q)
    int4 = _dq_nodes(q, lambda t, s: t == T.INT4 and s.dtype == np.float16 and bool((s > 0).all()))
    assert int4 and int4 == _dq_nodes(q, lambda _t, _s: True)
    assert {tuple(sorted(_attrs(n).items())) for n in q.graph.node if n.name in int4} == {
        (("axis", 0), ("block_size", 64))
    }
    # the default model's down_proj has K = 160, no multiple of 64: TensorRT derives the block from
    # the scale's shape, so that weight stays FP16 rather than padded
    weights = {t.name: t for t in canonical.graph.initializer}
    assert unquantized_weights(q) and all(weights[w].dims[0] == 160 for w in unquantized_weights(q))
    assert _found(q, "10.12", "qdq_types") == []
    for v in ("10.12", "11"):
        assert check_model(q, Target(version(v))) == [], v
    found = check_model(q, Target(version("10.3")))
    assert [(x.rule, x.node) for x in found] == [("operator_support", "<model>")]
    assert "opset 21" in found[0].message
    assert _weight_matmul_types(q) == {T.FLOAT16}  # W4A16: FP16 activations
    line = {
        v: lambda v=v: trtexec_command(
            pipeline.stage("llm"), "stages/llm.int4.qdq.onnx", "engines/llm.plan", "int4", trt_version=v
        )
        for v in ("10.3", "10.5", "10.6", "10.12", "11")
    }
    for v in ("10.3", "10.5"):
        with pytest.raises(ConfigError, match=f"TensorRT {v} cannot build the INT4 LLM: .*opset 21"):
            line[v]()
    assert (
        "--int4" in line["10.6"]()
        and "--stronglyTyped" in line["10.12"]()
        and "--stronglyTyped" in line["11"]()
    )
    require_buildable("int8", "10.3")  # W8A16 at opset 19 is within 10.3's range
    # the codes: signed INT4 with positive scales; where MatMulNBits' scale is already positive
    # (the block's extreme weight is negative) they are MatMulNBits' codes exactly
    dq = next(n for n in q.graph.node if n.name in int4)
    inits = {t.name: t for t in q.graph.initializer}
    w = numpy_helper.to_array(weights[dq.input[0].rsplit("_q4", 1)[0]])
    ours, ort = rtn_codes(w, 4, 64, positive=True), rtn_codes(w, 4, 64)
    np.testing.assert_array_equal(numpy_helper.to_array(inits[dq.input[0]]), ours.codes)
    assert (ours.scales > 0).all() and (ort.scales < 0).any()
    same = np.repeat(ort.scales > 0, 64, axis=0)[: w.shape[0]]
    np.testing.assert_array_equal(ours.codes[same], ort.codes[same])


@pytest.fixture(scope="module")
def pipeline(default_build):
    return load_manifest(default_build).pipeline


def test_fp16_build_passes_every_rule_for_every_version(default_model, default_builds, tmp_path, quick_quant):
    """The FP16 stage graphs (norms FP32, FP32 inputs and outputs) are what strongly typed builds
    take their FP16 from: consistent types everywhere. The build is ``omniforge build --precision
    fp16`` on the shared build cache, where the auto build quantized the same graphs at FP16."""
    from omniforge.build import BuildOptions, build

    _, cache, _ = default_builds
    out = tmp_path / "fp16"
    build(
        default_model,
        out,
        BuildOptions(precision="fp16", cache=cache, quantize=quick_quant),
        log=lambda _m: None,
    )
    findings = check_build(out, ALL)
    assert {f.variant.precision for f in findings} == {"fp16", "fp32"}  # the LLM and embedding stay FP32
    assert [(f.stage, f.trt_version, f.violations) for f in findings if f.violations] == []
