"""Calibration capture from the pipeline, static INT8 with its fallback, SmoothQuant, GPTQ and the
standard-ONNX weight-only form."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from omniforge.calibration import capture as calib
from omniforge.calibration.capture import CalibrationInputs
from omniforge.calibration.fallback import Int8Config, outputs, quantize_int8_with_fallback
from omniforge.calibration.metrics import cosine
from omniforge.errors import ConfigError, InputError
from omniforge.pipeline.contracts import Role
from omniforge.pipeline.manifest import load_manifest


@pytest.fixture(scope="module")
def captured(default_build, tmp_path_factory, quick_quant):
    dest = tmp_path_factory.mktemp("calib") / "calibration"
    calib.capture(default_build, dest, quick_quant.calibration, log=lambda _m: None)
    return dest


def test_capture_records_every_stage_the_pipeline_runs(captured, default_build, quick_quant):
    info = json.loads((captured / "calibration.json").read_text())
    stages = set(load_manifest(default_build).stages) - {"token_embedding"}  # a table lookup, no engine
    assert set(info["calls"]) == stages
    inputs = quick_quant.calibration
    # two prompts x steps, every decoder forced; capped at max_per_stage
    assert info["calls"]["image_unet"] == min(len(inputs.prompts) * inputs.steps, inputs.max_per_stage)
    cal, held = calib.load(captured, "image_unet")
    assert cal and held and cal[0]["sample"].shape[0] == 2  # both guidance branches in one batch
    assert len({float(f["timestep"][0]) for f in cal + held}) == inputs.steps  # the whole trajectory
    rows, _ = calib.load(captured, "llm")
    assert rows[0]["inputs_embeds"].ndim == 2
    stamp = (captured / "image_unet.npz").stat().st_mtime_ns
    calib.capture(default_build, captured, inputs, log=lambda _m: None)  # same inputs: reused
    assert (captured / "image_unet.npz").stat().st_mtime_ns == stamp


def test_calibration_folder_is_checked(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        CalibrationInputs.from_folder(tmp_path / "nope")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a cat"}\nnot json\n')
    with pytest.raises(InputError, match="line 2"):
        CalibrationInputs.from_folder(tmp_path)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a cat"}\n')
    from omniforge.runtime.media import write_png

    write_png(tmp_path / "a.png", np.zeros((8, 8, 3), np.float32))
    got = CalibrationInputs.from_folder(tmp_path)
    assert got.prompts == ["a cat"] and [p.name for p in got.images] == ["a.png"]
    assert got.digest() != CalibrationInputs(["a dog"], got.images).digest()


def test_static_int8_is_symmetric_qdq_and_the_fallback_keeps_layers_fp32(captured, default_build, tmp_path):
    m = load_manifest(default_build)
    src = default_build / m.stages["image_vae_decoder"].file
    cal, held = calib.load(captured, "image_vae_decoder")
    cfg = Int8Config(mode="static", op_types=("Conv", "MatMul", "Gemm"))
    plain = quantize_int8_with_fallback(src, tmp_path / "plain.onnx", cal, 0.0, 2, config=cfg)
    assert plain.excluded == []
    q = onnx.load(str(tmp_path / "plain.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    qnodes = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert qnodes and all(not np.any(inits[n.input[2]]) for n in qnodes if len(n.input) > 2)  # zero points 0
    strict = quantize_int8_with_fallback(src, tmp_path / "strict.onnx", cal, 1.0, 2, config=cfg)
    assert len(strict.excluded) == 2 and strict.sensitivity  # the two most harmful layers stay FP32
    worst = sorted(strict.sensitivity, key=strict.sensitivity.get, reverse=True)[:2]
    assert strict.excluded == worst
    ref = outputs(src, held)
    for path in ("plain.onnx", "strict.onnx"):
        got = outputs(tmp_path / path, held)
        assert min(cosine(a[0], b[0]) for a, b in zip(ref, got, strict=True)) > 0.99


def test_calibration_methods_choose_different_ranges(captured, default_build, tmp_path):
    from onnxruntime.quantization.calibrate import load_tensors_data

    from omniforge.calibration.fallback import _Quantizer

    src = default_build / load_manifest(default_build).stages["vocoder"].file
    cal, _ = calib.load(captured, "vocoder")
    ranges = {}
    for method in ("minmax", "percentile", "entropy"):
        work = tmp_path / method
        work.mkdir()
        _Quantizer(src, Int8Config(mode="static", method=method, op_types=("Conv",)), cal, work)(
            work / "q.onnx"
        )
        data = load_tensors_data(work / "ranges.json")
        ranges[method] = {k: float(np.max(np.abs(v.range_value))) for k, v in data.data.items()}
    keys = set(ranges["minmax"])
    for method in ("percentile", "entropy"):
        assert any(ranges[method][k] < ranges["minmax"][k] - 1e-6 for k in keys), method
        assert all(ranges[method][k] <= ranges["minmax"][k] + 1e-5 for k in keys), method


def test_static_calibration_takes_only_the_quantized_layers_tensors(captured, default_build, tmp_path):
    """The image UNet's attention score MatMuls (two activations) stay FP32, so their tensors are
    not calibrated; the QDQ graph is the one ONNX Runtime's own calibration of every MatMul gives."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import load_tensors_data

    from omniforge.calibration.fallback import _Quantizer, _Reader, weight_layers

    src = default_build / load_manifest(default_build).stages["image_unet"].file
    cal, _ = calib.load(captured, "image_unet")
    ops = ("Conv", "MatMul", "Gemm")
    ours = _Quantizer(src, Int8Config(mode="static", op_types=ops), cal, tmp_path)
    ours(tmp_path / "ours.onnx")
    model = onnx.load(str(src))
    layers = weight_layers(model, ops)
    scores = [n for n in model.graph.node if n.op_type == "MatMul" and n.name not in layers]
    assert scores  # the graph has activation-by-activation MatMuls
    calibrated = set(load_tensors_data(tmp_path / "ranges.json").data)
    assert calibrated and not calibrated & {t for n in scores for t in n.output}
    quantize_static(
        str(src),
        str(tmp_path / "theirs.onnx"),
        _Reader(cal),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        per_channel=True,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=list(ops),
        nodes_to_quantize=layers,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
    )

    def qdq(path):
        q = onnx.load(str(path))
        inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
        return {n.input[0]: inits[n.input[1]] for n in q.graph.node if n.op_type == "QuantizeLinear"}

    a, b = qdq(tmp_path / "ours.onnx"), qdq(tmp_path / "theirs.onnx")
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6, err_msg=name)


def _ln_linear_graph(outlier: float) -> tuple[onnx.ModelProto, list[dict]]:
    """x -> LayerNorm(gamma with an outlier channel) -> MatMul, and x -> Add (a residual reader)."""
    rng = np.random.default_rng(0)
    gamma = np.ones(16, np.float32)
    gamma[3] = outlier
    w = rng.standard_normal((16, 8)).astype(np.float32)
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, name="ln"),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="mm"),
        helper.make_node("ReduceSum", ["h"], ["r"], keepdims=0, name="sum"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8]),
            helper.make_tensor_value_info("r", TensorProto.FLOAT, [None]),
        ],
        [
            numpy_helper.from_array(gamma, "gamma"),
            numpy_helper.from_array(np.zeros(16, np.float32), "beta"),
            numpy_helper.from_array(w, "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"x": rng.standard_normal((32, 16)).astype(np.float32)} for _ in range(4)]
    return model, feeds


def test_smoothquant_keeps_the_function_and_shrinks_the_activation_range(tmp_path):
    from omniforge.calibration.smoothquant import channel_max, smooth_quant

    model, feeds = _ln_linear_graph(outlier=40.0)
    smoothed, report = smooth_quant(model, feeds, alpha=0.5)
    assert report.fired == 1 and "inserted a Mul" in report.notes[0]  # h has a non-linear reader too

    def run(m, f):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, f)  # noqa: E731

    for f in feeds:
        for a, b in zip(run(model, f), run(smoothed, f), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    mm_in = next(n.input[0] for n in smoothed.graph.node if n.op_type == "MatMul")
    before = channel_max(model, ["h"], feeds)["h"]
    after = channel_max(smoothed, [mm_in], feeds)[mm_in]
    assert after.max() / np.median(after) < 0.5 * before.max() / np.median(before)
    with pytest.raises(ValueError, match="alpha"):
        smooth_quant(model, feeds, alpha=1.5)


def test_gptq_reduces_output_error_and_packs_like_onnxruntime():
    from omniforge.calibration.codes import dequantize, gptq_codes, pack_matmul_nbits, rtn_codes
    from omniforge.calibration.weight_only import WeightOnlyConfig, quantize_weights

    rng = np.random.default_rng(0)
    k, n = 128, 24
    x = rng.standard_normal((512, k)) @ (np.eye(k) + 0.5 * rng.standard_normal((k, k)) / np.sqrt(k))
    x *= np.exp(rng.standard_normal(k))  # uneven channel scales, correlated channels
    w = rng.standard_normal((k, n)).astype(np.float32)
    h = x.T @ x / len(x)

    rtn = dequantize(rtn_codes(w, 4, 32), 32)
    gptq = dequantize(gptq_codes(w, h, 4, 32), 32)
    err = lambda q: float(np.mean((x @ q - x @ w) ** 2))  # noqa: E731
    assert err(gptq) < 0.8 * err(rtn)
    np.testing.assert_allclose(dequantize(gptq_codes(w, np.eye(k), 4, 32, damp=0.0), 32), rtn, atol=1e-6)
    # the packing matches ONNX Runtime's own quantizer byte for byte
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(w, "w")],
    )
    q = quantize_weights(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), WeightOnlyConfig()
    )
    packed = next(numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("_Q4"))
    np.testing.assert_array_equal(pack_matmul_nbits(rtn_codes(w, 4, 32).codes, 4, 32), packed)


def test_standard_form_is_dequantize_linear_with_positive_scales_per_channel_int8_and_fp16(default_build):
    from omniforge.calibration.codes import dequantize, rtn_codes
    from omniforge.calibration.standard_form import dequantize_linear_form, upgrade_opset

    m = load_manifest(default_build)
    spec = m.pipeline.stage("llm")
    canonical = onnx.load(str(default_build / m.stages["llm"].file))
    sess = lambda mm: ort.InferenceSession(mm.SerializeToString(), providers=["CPUExecutionProvider"])  # noqa: E731
    feeds = spec.sample_inputs("opt", seed=3)
    for opset in (19, 21):
        up = upgrade_opset(canonical, opset)
        assert next(o.version for o in up.opset_import if o.domain == "") == opset
        for a, b in zip(sess(canonical).run(None, feeds), sess(up).run(None, feeds), strict=True):
            np.testing.assert_array_equal(a, b)  # raising the opset changes nothing
    weights = {t.name: numpy_helper.to_array(t) for t in canonical.graph.initializer if len(t.dims) == 2}
    matmul_weights = {
        n.input[1] for n in canonical.graph.node if n.op_type == "MatMul" and n.input[1] in weights
    }
    ref = sess(canonical).run(["logits"], feeds)[0]
    for bits, fp16 in ((4, False), (4, True), (8, False), (8, True)):
        std = dequantize_linear_form(canonical, bits, 32, fp16=fp16)
        onnx.checker.check_model(std)  # nodes in order after the FP16 conversion too
        assert next(o.version for o in std.opset_import if o.domain == "") == (21 if bits == 4 else 19)
        dq = [n for n in std.graph.node if n.op_type == "DequantizeLinear"]
        assert len(dq) == len(matmul_weights)  # K = 64 and 160 are multiples of 32
        assert not [n for n in std.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
        inits = {t.name: t for t in std.graph.initializer}
        for node in dq:
            w = weights[node.input[0].rsplit(f"_q{bits}", 1)[0]]
            codes = numpy_helper.to_array(inits[node.input[0]])
            scale = numpy_helper.to_array(inits[node.input[1]])
            assert scale.dtype == (np.float16 if fp16 else np.float32) and (scale > 0).all()
            attrs = {a.name: a.i for a in node.attribute}
            if bits == 4:  # block-wise along K, MatMulNBits' rounding with the scales made positive
                assert inits[node.input[0]].data_type == TensorProto.INT4
                assert attrs == {"axis": 0, "block_size": 32}
                ours, nbits = rtn_codes(w, 4, 32, positive=True), rtn_codes(w, 4, 32)
                np.testing.assert_array_equal(codes, ours.codes)
                same = np.repeat(nbits.scales > 0, 32, axis=0)[: w.shape[0]]  # blocks whose extreme is < 0
                np.testing.assert_array_equal(dequantize(ours, 32)[same], dequantize(nbits, 32)[same])
            else:  # one scale per output column: TensorRT 10.x blocks INT4 only
                assert inits[node.input[0]].data_type == TensorProto.INT8 and attrs == {"axis": 1}
                assert scale.shape == (w.shape[1],)
                np.testing.assert_array_equal(codes, rtn_codes(w, 8, w.shape[0], positive=True).codes)
                step = scale.astype(np.float32)  # within half a step, a whole one for a clipped top code
                assert (np.abs(codes * step - w) <= step * 1.01).all()
        assert cosine(ref, sess(std).run(["logits"], feeds)[0]) > (0.95 if bits == 4 else 0.999)
    bad = helper.make_model(
        helper.make_graph(
            [helper.make_node("Resize", ["x", "", "s"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(np.ones(4, np.float32), "s")],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    with pytest.raises(ConfigError, match="Resize"):
        upgrade_opset(bad)
    with pytest.raises(ConfigError, match="4 or 8 bits"):
        dequantize_linear_form(canonical, 3)


def test_w4a16_form_keeps_whole_norms_fp32(default_build):
    """The TensorRT form's FP16 activations, on the exported and on the optimized LLM graph (norm
    gammas folded into the weights, constants lifted to initializers): each RMSNorm reads FP16 once
    and computes in FP32 throughout, so a hidden state of magnitude 1000 (x**2 far beyond FP16)
    changes nothing; the FP16 stage pass (to_fp16_keep_norms) does the same."""
    from omniforge.calibration.standard_form import dequantize_linear_form
    from omniforge.passes.manager import optimize_stage
    from omniforge.passes.precision import to_fp16_keep_norms

    m = load_manifest(default_build)
    spec = m.pipeline.stage("llm")
    exported = onnx.load(str(default_build / m.stages["llm"].file))
    optimized, report = optimize_stage(exported, spec)
    assert report.passed and report.nodes_after < report.nodes_before
    sess = lambda mm: ort.InferenceSession(mm.SerializeToString(), providers=["CPUExecutionProvider"])  # noqa: E731
    to = lambda n: next(a.i for a in n.attribute if a.name == "to")  # noqa: E731
    for canonical in (exported, optimized):
        a16, a32 = (dequantize_linear_form(canonical, 4, 64, fp16=fp16) for fp16 in (True, False))
        onnx.checker.check_model(a16, full_check=True)  # sorted, and its declared types are the real ones
        inferred = onnx.shape_inference.infer_shapes(a16).graph
        types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.input, *inferred.value_info)}
        casts = {n.output[0]: n for n in a16.graph.node if n.op_type == "Cast"}
        round_trips = [  # FP32 -> FP16 -> FP32: a rounding a norm (or an output) would go through
            n.name
            for n in casts.values()
            if to(n) == TensorProto.FLOAT
            and n.input[0] in casts
            and to(casts[n.input[0]]) == TensorProto.FLOAT16
            and types.get(casts[n.input[0]].input[0]) == TensorProto.FLOAT
        ]
        assert round_trips == []
        ref, ours, theirs = sess(a32), sess(a16), sess(to_fp16_keep_norms(a32))
        for magnitude in (1.0, 1000.0):
            feeds = spec.sample_inputs("opt", seed=3)
            feeds["inputs_embeds"] *= magnitude / np.abs(feeds["inputs_embeds"]).max()
            logits = [s.run(["logits"], feeds)[0] for s in (ref, ours, theirs)]
            assert cosine(logits[0], logits[1]) > 0.9999, magnitude
            assert cosine(logits[0], logits[2]) > 0.9999, (
                magnitude
            )  # 0.0 at 1000 when norms were blocked op by op


def test_positive_scales_keep_the_extreme_weight_exact():
    from omniforge.calibration.codes import dequantize, rtn_codes

    w = np.array([[1.0, -1.0], [0.5, 0.25], [-0.25, -0.5], [0.0, 0.1]], np.float32)  # one block of 4 rows
    nbits, ours = rtn_codes(w, 4, 4), rtn_codes(w, 4, 4, positive=True)
    assert nbits.scales[0, 0] < 0 < nbits.scales[0, 1]  # MatMulNBits: the extreme maps to -8 either way
    assert (ours.scales > 0).all() and ours.codes[0, 0] == 7 and ours.codes[0, 1] == -8
    np.testing.assert_array_equal(ours.codes[:, 1], nbits.codes[:, 1])  # negative extreme: the same codes
    np.testing.assert_allclose(dequantize(ours, 4)[0], [1.0, -1.0])  # both extremes exact
    assert ours.codes.min() >= -8 and ours.codes.max() <= 7


def test_quantized_build_holds_calibration_and_both_llm_forms(default_build, tmp_path, quick_quant):
    from dataclasses import replace

    from omniforge.calibration.quantize import quantize_build
    from omniforge.calibration.weight_only import WeightOnlyConfig
    from omniforge.runtime.llm import LlmRuntime
    from omniforge.runtime.sampling import GenerationConfig

    opts = replace(quick_quant, weight_only=WeightOnlyConfig(method="gptq"))
    out = tmp_path / "gptq"
    quantize_build(default_build, out, "int4", log=lambda _m: None, options=opts)
    m = load_manifest(out)
    assert m.files["calibration"] == "calibration/calibration.json"
    llm = m.stages["llm"]
    assert {v.role for v in llm.variants} >= {Role.CANONICAL, Role.ORT_INPLACE_LLM, Role.WEIGHT_ONLY_DQ}
    report = {r["stage"]: r for r in json.loads((out / "quantize.json").read_text())}
    assert "GPTQ" in report["llm"]["method"] and report["llm"]["metrics"]["qdq_cosine_min"] > 0.9
    assert report["image_unet"]["method"].startswith("static QDQ INT8")
    assert report["image_unet"]["metrics"]["cosine_min"] > 0.99  # on held-out captured inputs
    assert report["image_encoder"]["method"].startswith("dynamic INT8")
    assert not (out / "stages" / "llm.ort.onnx").exists()  # the FP32 runtime graph is replaced
    e2e = json.loads((out / m.files["accuracy_e2e"]).read_text())
    assert len(e2e["prompts"]) == 3 and set(e2e["worst"]) == {
        "token_agreement",
        "image_psnr_db",
        "video_psnr_db",
        "audio_snr_db",
    }
    # random weights: greedy INT4 decoding leaves FP32's path early; measured 1/12 (worst prompt) to 2/12
    assert e2e["worst"]["token_agreement"] >= 0.08 and np.isfinite(e2e["worst"]["image_psnr_db"])
    assert report["llm"]["metrics"]["top1_agreement"] >= 0.65  # teacher-forced, measured 0.72
    assert "End to end vs FP32" in (out / "quantize.md").read_text()
    # a re-run reuses the capture stored in the build it replaces; it quantizes the GPTQ LLM (which
    # takes its rows from that capture) and keeps the stages checked above FP32
    logs: list[str] = []
    keep = {name: "fp32" for name in m.stages if name != "llm"}
    rerun = replace(opts, end_to_end=False)
    quantize_build(default_build, out, "int4", log=logs.append, options=rerun, overrides=keep)
    assert any(line.startswith("calibration: reusing") for line in logs)
    assert not any(line.startswith("calibration: captured") for line in logs)
    assert LlmRuntime(out).generate("A dog runs", GenerationConfig(max_new_tokens=4)).new_tokens == 4


def test_psnr_and_end_to_end_table():
    from omniforge.calibration.end_to_end import end_to_end_table
    from omniforge.calibration.metrics import psnr

    a = np.linspace(0, 1, 100)
    assert psnr(a, a) == float("inf")
    assert psnr(a, a + 0.1) == pytest.approx(20.0)
    table = end_to_end_table(
        {"prompts": [{"prompt": "x", "image_psnr_db": 30.0}], "worst": {"image_psnr_db": 30.0}}
    )
    assert "| **worst** | **30** |" in table


def test_asymmetric_codes_round_trip_closer_for_offset_weights_and_reach_the_standard_form(default_build):
    from omniforge.calibration.codes import dequantize, rtn_codes
    from omniforge.calibration.standard_form import dequantize_linear_form

    w = np.random.default_rng(0).uniform(0.5, 1.5, (64, 8)).astype(np.float32)  # all positive
    asym = rtn_codes(w, 4, 32, symmetric=False)
    assert asym.codes.min() >= 0 and asym.codes.max() <= 15 and asym.zero_points is not None
    err = {sym: np.abs(dequantize(rtn_codes(w, 4, 32, sym), 32) - w).max() for sym in (True, False)}
    assert err[False] < 0.6 * err[True]  # the whole code range spans [0, max] instead of [-max, max]
    m = load_manifest(default_build)
    canonical = onnx.load(str(default_build / m.stages["llm"].file))
    std = dequantize_linear_form(canonical, 4, 32, symmetric=False)
    onnx.checker.check_model(std)
    inits = {t.name: t for t in std.graph.initializer}
    dq = [n for n in std.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(len(n.input) == 3 for n in dq)  # a zero point per block
    assert {inits[n.input[0]].data_type for n in dq} == {TensorProto.UINT4}
    assert {inits[n.input[2]].data_type for n in dq} == {TensorProto.UINT4}
    feeds = m.pipeline.stage("llm").sample_inputs("opt", seed=3)
    sess = lambda mm: ort.InferenceSession(mm.SerializeToString(), providers=["CPUExecutionProvider"])  # noqa: E731
    logits = sess(canonical).run(["logits"], feeds)[0], sess(std).run(["logits"], feeds)[0]
    assert cosine(*logits) > 0.95
    with pytest.raises(ConfigError, match="symmetric quantization only"):
        dequantize_linear_form(canonical, 4, 32, "gptq", [np.zeros((4, 8), np.float32)], symmetric=False)


def test_gptq_stops_when_the_graph_does_not_hold_the_weights_its_contract_names(default_build):
    from dataclasses import replace

    from omniforge.calibration.gptq import apply_gptq, target_weights
    from omniforge.calibration.weight_only import WeightOnlyConfig, quantize_weights
    from omniforge.errors import ExportError

    inplace = load_manifest(default_build).stages["llm"].variant(Role.ORT_INPLACE_LLM)
    graph = onnx.load(str(default_build / inplace.file))
    contract = inplace.contract
    q = quantize_weights(graph, WeightOnlyConfig())
    targets = target_weights(contract)
    assert len(targets) == 5 * (len(contract.inplace) // 2) + 1  # five linear groups per layer, the LM head
    assert sum(n.op_type == "MatMulNBits" for n in q.graph.node) == len(targets)  # every one of them
    renamed = replace(contract, taps={**contract.taps, "layers.0.qkv_weight": "layers.0.attn.packed"})
    rows = [np.zeros((4, 8), np.float32)]
    with pytest.raises(ExportError, match="'layers.0.attn.packed'"):
        apply_gptq(graph, q, renamed, rows, 4, 32)


def test_a_budgeted_metric_that_was_not_measured_fails():
    from omniforge.calibration.metrics import meets_budgets
    from omniforge.calibration.quantize import budgets_for
    from omniforge.pipeline.spec import StageKind

    budgets = {"cosine_min": 0.999, "logits_cosine": 0.99}
    assert budgets_for(StageKind.LLM, budgets) == {"logits_cosine": 0.99}
    assert budgets_for(StageKind.DECODER, budgets) == {"cosine_min": 0.999}
    assert meets_budgets({"cosine_min": 0.9995}, {"cosine_min": 0.999})
    assert not meets_budgets({"cosine_min": 0.99}, {"cosine_min": 0.999})
    assert not meets_budgets({"snr_db_min": 40.0}, {"cosine_min": 0.999})  # not measured: fails
    with pytest.raises(ConfigError, match="no accuracy budget applies"):
        budgets_for(StageKind.LLM, {"cosine_min": 0.999})


def test_each_stage_kind_and_precision_has_one_quantizer():
    from omniforge.calibration.quantize import (
        EmbeddingInt8,
        Fp16Stage,
        Int8WithFallback,
        WeightOnlyLlm,
        select_quantizer,
    )
    from omniforge.pipeline.spec import StageKind

    assert isinstance(select_quantizer(StageKind.LLM, "int4"), WeightOnlyLlm)
    assert isinstance(select_quantizer(StageKind.LLM, "int8"), WeightOnlyLlm)
    assert isinstance(select_quantizer(StageKind.EMBEDDING, "int8"), EmbeddingInt8)
    assert isinstance(select_quantizer(StageKind.VAE, "int8"), Int8WithFallback)
    assert isinstance(select_quantizer(StageKind.DECODER, "fp16"), Fp16Stage)
    for kind, precision in ((StageKind.VAE, "int4"), (StageKind.LLM, "fp32"), (StageKind.LLM, "bf16")):
        with pytest.raises(ConfigError):
            select_quantizer(kind, precision)
