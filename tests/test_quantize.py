"""``omniforge quantize``: INT4/INT8 builds that the runtime runs, with an accuracy report."""

import json

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
def int4_build(default_build, tmp_path_factory, quick_quant):
    out = tmp_path_factory.mktemp("q") / "int4"
    quantize_build(default_build, out, "int4", log=lambda _m: None, options=quick_quant)
    return out


def test_int4_build_has_quantized_llm_and_int8_encoders(int4_build, default_build):
    m = load_manifest(int4_build)
    assert m.stages["llm"].precision == "int4" and m.stages["image_encoder"].precision == "int8"
    q = onnx.load(str(int4_build / m.stages["llm"].variant(Role.ORT_INPLACE_LLM).file))
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("MatMulNBits") == 2 * 2 + 2 * 3 + 1  # qkv+o per layer, gate/up/down per layer, lm head
    assert "MatMul" not in ops
    fp32 = load_manifest(default_build).stages["llm"].variant(Role.ORT_INPLACE_LLM).file
    assert (int4_build / m.stages["llm"].variant(Role.ORT_INPLACE_LLM).file).stat().st_size < 0.3 * (
        default_build / fp32
    ).stat().st_size
    report = {r["stage"]: r for r in json.loads((int4_build / "quantize.json").read_text())}
    assert report["llm"]["metrics"]["logits_cosine"] > 0.95
    assert report["image_encoder"]["metrics"]["cosine_min"] > 0.99
    assert "embedding table is INT8" in report["llm"]["note"]
    assert report["token_embedding"]["size_after"] < 0.3 * report["token_embedding"]["size_before"]
    assert report["token_embedding"]["metrics"]["cosine_min"] > 0.999


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


def test_int8_weight_only_is_closer_to_fp32_than_int4(default_build, int4_build, tmp_path, quick_quant):
    out = tmp_path / "int8"
    quantize_build(default_build, out, "int8", log=lambda _m: None, options=quick_quant)
    r8 = {r["stage"]: r for r in json.loads((out / "quantize.json").read_text())}["llm"]["metrics"]
    r4 = {r["stage"]: r for r in json.loads((int4_build / "quantize.json").read_text())}["llm"]["metrics"]
    assert r8["kl_divergence"] < r4["kl_divergence"]


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
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
        assert not (tmp_path / "x").exists()


def test_metrics():
    a = np.array([1.0, 2.0, 3.0])
    assert cosine(a, a) == pytest.approx(1.0) and cosine(a, -a) == pytest.approx(-1.0)
    assert snr_db(a, a) == float("inf") and snr_db(a, a + 0.1) == pytest.approx(10 * np.log10(14 / 0.03))
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    assert kl_divergence(logits, logits) == pytest.approx(0.0, abs=1e-12)
    assert top1_agreement(logits, logits[::-1]) == 0.0


def test_awq_keeps_the_fp32_function_and_builds(default_build, tmp_path, quick_quant):
    import onnxruntime as ort

    from omniforge.calibration.awq import apply_awq
    from omniforge.calibration.quantize import calibration_rows

    m = load_manifest(default_build)
    g = m.pipeline.stage("llm").llm
    graph = onnx.load(str(default_build / m.stages["llm"].variant(Role.ORT_INPLACE_LLM).file))
    rows = calibration_rows(default_build, count=4, length=16)
    scaled = apply_awq(graph, rows, 32)
    s = rows[0].shape[0]
    feeds = {
        "inputs_embeds": rows[0][None],
        "seqlens_k": np.array([s - 1], np.int32),
        "total_sequence_length": np.array(s, np.int32),
    }
    for i in range(g.num_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, g.num_kv_heads, s, g.head_dim), np.float32)
    a = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["logits"], feeds
    )[0]
    b = ort.InferenceSession(scaled.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["logits"], feeds
    )[0]
    assert np.abs(a - b).max() <= 1e-4  # scales are folded, the FP32 function is unchanged
    gammas = {t.name for t in graph.graph.initializer if "layernorm" in t.name}
    changed = [
        n
        for n in gammas
        if not np.array_equal(
            *(
                onnx.numpy_helper.to_array(next(t for t in mm.graph.initializer if t.name == n))
                for mm in (graph, scaled)
            )
        )
    ]
    assert changed  # the search moved scale into the norms
    out = tmp_path / "awq"
    quantize_build(
        default_build, out, "int4", WeightOnlyConfig(method="awq"), log=lambda _m: None, options=quick_quant
    )
    assert "AWQ" in {r["stage"]: r for r in json.loads((out / "quantize.json").read_text())}["llm"]["method"]
    assert LlmRuntime(out).generate("A dog runs", GenerationConfig(max_new_tokens=4)).new_tokens == 4
