"""``omniforge quantize``: INT4/INT8 builds that the runtime runs, with an accuracy report."""

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest

from omniforge.calibration.metrics import cosine, kl_divergence, snr_db, top1_agreement
from omniforge.calibration.quantize import quantize_build
from omniforge.calibration.weight_only import WeightOnlyConfig
from omniforge.cli import main
from omniforge.errors import ConfigError
from omniforge.pipeline.contracts import Role
from omniforge.pipeline.manifest import load_manifest
from omniforge.runtime.llm import LlmRuntime
from omniforge.runtime.pipeline import DiffusionConfig, Pipeline
from omniforge.runtime.sampling import GenerationConfig


@pytest.fixture(scope="module")
def stage_cache(tmp_path_factory):
    """One per-stage cache for this module's INT4 and INT8 builds of the default build: they
    quantize every stage but the LLM the same way (and from the same calibration capture), so the
    second build takes those stages from the first instead of quantizing them again."""
    return tmp_path_factory.mktemp("q") / "stage-cache"


@pytest.fixture(scope="module")
def int4_build(default_build, tmp_path_factory, quick_quant, stage_cache):
    out = tmp_path_factory.mktemp("q") / "int4"
    quantize_build(
        default_build, out, "int4", log=lambda _m: None, options=quick_quant, stage_cache=stage_cache
    )
    return out


def test_int4_build_has_quantized_llm_and_int8_encoders(int4_build, default_build):
    m = load_manifest(int4_build)
    assert m.stages["llm"].precision == "int4" and m.stages["image_encoder"].precision == "int8"
    q = onnx.load(str(int4_build / m.stages["llm"].variant(Role.ORT_INPLACE_LLM).file))
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("MatMulNBits") == 2 * 2 + 2 * 3 + 1  # qkv+o per layer, gate/up/down per layer, lm head
    # the only float MatMuls left are the switchable LoRA adapters' low-rank branches
    assert all(n.name.startswith("lora.") for n in q.graph.node if n.op_type == "MatMul")
    fp32 = load_manifest(default_build).stages["llm"].variant(Role.ORT_INPLACE_LLM).file
    assert (int4_build / m.stages["llm"].variant(Role.ORT_INPLACE_LLM).file).stat().st_size < 0.3 * (
        default_build / fp32
    ).stat().st_size
    report = {r["stage"]: r for r in json.loads((int4_build / "quantize.json").read_text())}
    assert report["llm"]["metrics"]["logits_cosine"] > 0.99  # measured 0.996
    assert report["llm"]["metrics"]["top1_agreement"] >= 0.75  # measured 0.84
    assert report["image_encoder"]["metrics"]["cosine_min"] > 0.99
    assert "embedding table is INT8" in report["llm"]["note"]
    assert report["token_embedding"]["size_after"] < 0.3 * report["token_embedding"]["size_before"]
    assert report["token_embedding"]["metrics"]["cosine_min"] > 0.999


def test_int4_build_is_tensorrt_ready_where_its_forms_are_documented(int4_build):
    """check-trt on the whole INT4 build: clean for 10.12 and 11; for 10.3 only the LLM's opset-21
    W4A16 form, which a build for 10.3 refuses (profiles.require_buildable)."""
    from omniforge.engines.trt_check import check_build

    found = {(f.stage, f.trt_version): f.violations for f in check_build(int4_build, ["10.3", "10.12", "11"])}
    assert {k: v for k, v in found.items() if v} == {("llm", "10.3"): found["llm", "10.3"]} and [
        (v.rule, v.node) for v in found["llm", "10.3"]
    ] == [("operator_support", "<model>")]
    report = {r["stage"]: r for r in json.loads((int4_build / "quantize.json").read_text())}["llm"]
    assert "W4A16 DequantizeLinear (opset 21, INT4 blocks of 64" in report["note"]
    assert report["metrics"]["qdq_cosine_min"] > 0.95


def test_the_runtime_runs_the_quantized_build(int4_build):
    rt = LlmRuntime(int4_build)
    assert rt.engine.session.get_inputs()[0].name == "inputs_embeds"
    r = rt.generate("A dog runs", GenerationConfig(max_new_tokens=12))
    assert r.new_tokens == 12
    p = Pipeline(int4_build)
    out = p.run(
        "Describe",
        image=np.zeros((24, 24, 3), np.uint8),
        generation=GenerationConfig(max_new_tokens=4),
        diffusion=DiffusionConfig(steps=2),
        force=["image"],
    )
    assert out.images[0].shape == (32, 32, 3)


def test_int8_weight_only_is_closer_to_fp32_than_int4(
    default_build, int4_build, tmp_path, quick_quant, stage_cache
):
    out = tmp_path / "int8"
    quantize_build(
        default_build, out, "int8", log=lambda _m: None, options=quick_quant, stage_cache=stage_cache
    )
    r8 = {r["stage"]: r for r in json.loads((out / "quantize.json").read_text())}["llm"]["metrics"]
    r4 = {r["stage"]: r for r in json.loads((int4_build / "quantize.json").read_text())}["llm"]["metrics"]
    assert r8["kl_divergence"] < r4["kl_divergence"]
    assert r8["top1_agreement"] >= 0.95  # measured 1.0
    e2e = json.loads((out / "accuracy_e2e.json").read_text())
    assert e2e["worst"]["token_agreement"] >= 0.9  # greedy INT8 tokens: measured 1.0 on every prompt


def test_quantize_refuses_bad_requests(int4_build, default_build, tmp_path, capsys):
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_build(int4_build, tmp_path / "again", "int4", log=lambda _m: None)
    with pytest.raises(ConfigError, match="4 or 8 bits"):
        WeightOnlyConfig(bits=3)
    assert main(["quantize", str(default_build), "--out", str(tmp_path / "x"), "--block-size", "48"]) == 1
    assert "block size must be one of" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    for extra, message in (
        (["--stage-precision", "vocoder=int4"], "int4 is for the LLM"),
        (["--stage-precision", "vocoder"], "takes STAGE=PRECISION"),
        (["--calibration-data", str(tmp_path / "nope")], "does not exist"),
        (["--smoothquant", "2"], "alpha must be in [0, 1]"),
        (["--method", "gptq", "--asymmetric"], "symmetric quantization only"),
    ):
        assert main(["quantize", str(default_build), "--out", str(tmp_path / "x"), *extra]) == 1, extra
        err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("quantizing ")]
        assert len(err) == 1 and message in err[0], (extra, err)  # one sentence after the progress line
        assert not (tmp_path / "x").exists()


def test_metrics():
    a = np.array([1.0, 2.0, 3.0])
    assert cosine(a, a) == pytest.approx(1.0) and cosine(a, -a) == pytest.approx(-1.0)
    assert snr_db(a, a) == float("inf") and snr_db(a, a + 0.1) == pytest.approx(10 * np.log10(14 / 0.03))
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    assert kl_divergence(logits, logits) == pytest.approx(0.0, abs=1e-12)
    assert top1_agreement(logits, logits[::-1]) == 0.0


def _weighted_error(fp32, model, contract, rows, bits):
    """Sum over the layers AWQ scales of ||X W - X Q(W)||^2 on activations captured through the
    contract's taps, in the FP32 graph's units (a column scale AWQ moved into up_proj undone)."""
    from omniforge.calibration.awq import GROUPS
    from omniforge.calibration.codes import fake_quantize
    from omniforge.calibration.tensors import capture_inplace, num_layers
    from omniforge.pipeline.contracts import layer_tap

    taps = [layer_tap(contract, i, g[0]) for i in range(num_layers(contract)) for g in GROUPS]
    ref_x, got_x = (capture_inplace(m, contract, taps, rows) for m in (fp32, model))
    w0, w1 = ({t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer} for m in (fp32, model))
    total = 0.0
    for i in range(num_layers(contract)):
        for act, weights, _, _ in GROUPS:
            x0, x1 = ref_x[layer_tap(contract, i, act)], got_x[layer_tap(contract, i, act)]
            for n in (layer_tap(contract, i, w) for w in weights):
                ref, fp = x0 @ w0[n], x1 @ w1[n]
                col = np.linalg.norm(ref, axis=0) / np.linalg.norm(fp, axis=0)
                total += float(np.sum(((fp - x1 @ fake_quantize(w1[n], bits, 32)) * col) ** 2))
    return total


def test_awq_keeps_the_fp32_function_and_lowers_the_weighted_error_below_rtn(
    default_build, tmp_path, quick_quant
):
    from omniforge.calibration.awq import apply_awq
    from omniforge.calibration.quantize import calibration_rows
    from omniforge.calibration.tensors import inplace_prefill
    from omniforge.runtime.engine import open_session

    inplace = load_manifest(default_build).stages["llm"].variant(Role.ORT_INPLACE_LLM)
    contract = inplace.contract
    graph = onnx.load(str(default_build / inplace.file))
    rows = calibration_rows(default_build, count=4, length=16)
    scaled = {bits: apply_awq(graph, contract, rows, bits, 32) for bits in (4, 8)}
    feeds = inplace_prefill(contract, rows[0])
    logits = contract.slot("logits")
    a, b = (open_session(m.SerializeToString(), "exact").run([logits], feeds)[0] for m in (graph, scaled[4]))
    assert np.abs(a - b).max() <= 1e-4  # scales are folded, the FP32 function is unchanged
    for bits in (4, 8):  # measured on the default build: 0.983 (int4) and 0.961 (int8) of RTN's error
        rtn, awq = (_weighted_error(graph, m, contract, rows, bits) for m in (graph, scaled[bits]))
        assert awq < 0.99 * rtn, (bits, awq, rtn)
    # scales searched for 8-bit codes beat the 4-bit ones at 8 bits (measured 0.974 of them)
    at8 = {bits: _weighted_error(graph, scaled[bits], contract, rows, 8) for bits in (4, 8)}
    assert at8[8] < 0.99 * at8[4]
    out = tmp_path / "awq"
    keep = {name: "fp32" for name in load_manifest(default_build).stages if name != "llm"}  # the LLM alone
    quantize_build(
        default_build,
        out,
        "int4",
        WeightOnlyConfig(method="awq"),
        log=lambda _m: None,
        options=replace(quick_quant, end_to_end=False),
        overrides=keep,
    )
    assert "AWQ" in {r["stage"]: r for r in json.loads((out / "quantize.json").read_text())}["llm"]["method"]
    assert LlmRuntime(out).generate("A dog runs", GenerationConfig(max_new_tokens=4)).new_tokens == 4


def test_asymmetric_reaches_matmulnbits_and_the_tensorrt_form_stays_symmetric(
    default_build, tmp_path, quick_quant
):
    m = load_manifest(default_build)
    keep = {name: "fp32" for name in m.stages if name != "llm"}
    opts = replace(quick_quant, weight_only=WeightOnlyConfig(symmetric=False), end_to_end=False)
    out = tmp_path / "asym"
    q, results = quantize_build(default_build, out, "int4", log=lambda _m: None, options=opts, overrides=keep)
    llm = q.stages["llm"]
    nbits = onnx.load(str(out / llm.variant(Role.ORT_INPLACE_LLM).file))
    assert all(len(n.input) == 4 for n in nbits.graph.node if n.op_type == "MatMulNBits")  # zero points
    std = onnx.load(str(out / llm.variant(Role.WEIGHT_ONLY_DQ).file))  # TensorRT has no zero points
    assert all(len(n.input) == 2 for n in std.graph.node if n.op_type == "DequantizeLinear")
    report = next(r for r in results if r.stage == "llm")
    assert "asymmetric" in report.method and "RTN symmetric codes" in report.note
    assert report.metrics["logits_cosine"] > 0.95 and report.metrics["qdq_cosine_min"] > 0.9
