"""The streaming LLM build (``omniforge.export.llm_stream``): graphs written from safetensors shards
layer by layer equal the in-memory writer's (same nodes and FP32 initializers, the same INT4/INT8
codes as ONNX Runtime's quantizer), builds made from them generate the non-streaming builds'
greedy tokens, and the build routes, refuses and reports as documented. The ``slow`` test (run
with ``-m slow``) does the same on a 1B-class model and records peak RSS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from omniforge.errors import ConfigError, ModelNotFoundError
from omniforge.export.llm_stream import (
    INLINE_BYTES,
    LlamaFolder,
    NBits,
    SafetensorsReader,
    nbits_codes,
    nbits_dequantize,
    stream_llm_build,
    write_llm_graph,
)
from omniforge.pipeline.contracts import llm_inplace_contract
from omniforge.pipeline.describe import describe
from omniforge.pipeline.model_config import load_model_config

PROMPTS = ["A dog runs", "The harbour at night"]
QUIET = lambda _m: None  # noqa: E731


def _llama_folder(folder: Path, dtype: torch.dtype, seed: int, **shape) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from omniforge.model.tokenizer import save_tokenizer, train_tokenizer

    tok = train_tokenizer(300)
    save_tokenizer(tok, folder)
    torch.manual_seed(seed)
    conf = LlamaConfig(vocab_size=tok.get_vocab_size(), eos_token_id=tok.token_to_id("</s>"), **shape)
    model = LlamaForCausalLM(conf).eval()
    with torch.no_grad():  # visible norms and biases, so a misplaced one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    model.to(dtype).save_pretrained(folder, max_shard_size="60KB")  # several shards and an index
    return folder


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory) -> Path:
    """BF16 shards, GQA with head size 16 (rotary fused into the attention)."""
    shape = dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return _llama_folder(tmp_path_factory.mktemp("bf16") / "llama", torch.bfloat16, 11, **shape)


@pytest.fixture(scope="module")
def fp16_tied_llama(tmp_path_factory) -> Path:
    """FP16 shards, head size 8 (rotary from standard ops), attention biases, tied LM head."""
    shape = dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=96,
        tie_word_embeddings=True,
        attention_bias=True,
    )
    return _llama_folder(tmp_path_factory.mktemp("fp16") / "llama", torch.float16, 12, **shape)


def _in_memory(folder: Path) -> tuple[onnx.ModelProto, object]:
    """The non-streaming writer's graph of the folder's LLM (loaded whole in FP32, as the export does)."""
    from omniforge.export.llm_ort import build_llama_gqa
    from omniforge.model.loader import load_llm

    cfg = load_model_config(folder)
    stage = describe(cfg).stage("llm")
    model = load_llm(cfg, cfg.merge_adapter)
    return build_llama_gqa(model, stage.llm.max_context, llm_inplace_contract(stage.llm)), stage


def _streamed(folder: Path, path: Path, nbits: NBits | None = None) -> onnx.ModelProto:
    cfg = load_model_config(folder)
    stage = describe(cfg).stage("llm")
    adapter = cfg.adapters[cfg.merge_adapter] if cfg.merge_adapter else None
    weights = LlamaFolder(cfg.llm, adapter)
    write_llm_graph(weights, stage.llm.max_context, llm_inplace_contract(stage.llm), path, nbits)
    return onnx.load(str(path))


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _logits(graph: onnx.ModelProto | Path, stage) -> np.ndarray:
    """Next-token logits of a seeded prompt and 6 decode rows through the in-place graph."""
    from omniforge.runtime.llm import LlmEngine, probe

    g = stage.llm
    rows = (np.random.default_rng(5).standard_normal((14, g.hidden_size)) * 0.05).astype(np.float32)
    src = graph if isinstance(graph, Path) else Path(_save(graph))
    engine = LlmEngine(src, g, contract=llm_inplace_contract(g), preset="measurement")
    return probe(engine, [rows[:8]], [rows[8:]]).logits[0]


def _save(model: onnx.ModelProto) -> str:
    import tempfile

    f = tempfile.NamedTemporaryFile(suffix=".onnx", delete=False)
    f.write(model.SerializeToString())
    f.close()
    return f.name


def test_reader_reads_each_dtype_like_safe_open(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "b": torch.randn(3, 4, 2, generator=g).to(torch.float16),
        "c": torch.randn(9, generator=g),
    }
    save_file(tensors, tmp_path / "x.safetensors")
    reader = SafetensorsReader(tmp_path)
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        for name in tensors:
            want = f.get_tensor(name).float().numpy()
            got = reader.tensor(name)
            assert got.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(reader.rows("a", np.array([4, 0, 4])), reader.tensor("a")[[4, 0, 4]])
    assert reader.bytes_read > 0
    with pytest.raises(ModelNotFoundError, match="no tensor 'nope'"):
        reader.tensor("nope")
    (tmp_path / "y.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ConfigError, match="y.safetensors"):
        SafetensorsReader(tmp_path)


def test_nbits_codes_are_onnxruntimes_and_dequantize_back():
    """Codes in row chunks equal the whole weight's; dequantized they stand within a step (half a
    step but where the symmetric range's short end clips)."""
    w = np.random.default_rng(1).standard_normal((40, 100)).astype(np.float32)
    for q in (NBits(4, 32, True), NBits(4, 16, False), NBits(8, 32, True), NBits(8, 64, False)):
        whole = nbits_codes(w, q)
        parts = [nbits_codes(w[a:b], q) for a, b in ((0, 13), (13, 40))]
        for i, arr in enumerate(whole):
            if arr is not None:
                np.testing.assert_array_equal(arr, np.concatenate([p[i] for p in parts]))
        back = nbits_dequantize(*whole, q, w.shape[1])
        step = np.repeat(np.abs(whole[1]), q.block_size, axis=1)[:, : w.shape[1]]
        assert np.all(np.abs(back - w) <= step + 1e-6)
        assert np.mean(np.abs(back - w) <= 0.5 * step + 1e-6) > 0.95


@pytest.mark.parametrize("which", ["bf16_llama", "fp16_tied_llama"])
def test_streamed_fp32_graph_is_the_in_memory_writers_graph(which, request, tmp_path):
    folder = request.getfixturevalue(which)
    ref, stage = _in_memory(folder)
    got = _streamed(folder, tmp_path / "llm.ort.onnx")
    assert [n.SerializeToString() for n in got.graph.node] == [n.SerializeToString() for n in ref.graph.node]
    a, b = _inits(ref), _inits(got)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    np.testing.assert_allclose(
        _logits(tmp_path / "llm.ort.onnx", stage), _logits(ref, stage), rtol=0, atol=1e-5
    )
    # the proto holds no large initializer: they lie in one external-data file beside it
    proto = onnx.load(str(tmp_path / "llm.ort.onnx"), load_external_data=False)
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            assert len(t.raw_data) < INLINE_BYTES, t.name
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"llm.ort.onnx.data"}


@pytest.mark.parametrize(
    "cfg",
    [
        dict(bits=4, block_size=32, symmetric=True),
        dict(bits=4, block_size=16, symmetric=False),
        dict(bits=8, block_size=32, symmetric=True),
    ],
)
def test_streamed_weight_only_codes_equal_onnxruntimes_quantizer(cfg, bf16_llama, fp16_tied_llama, tmp_path):
    from omniforge.calibration.weight_only import WeightOnlyConfig, quantize_weights

    for folder in (bf16_llama, fp16_tied_llama):
        ref, stage = _in_memory(folder)
        wcfg = WeightOnlyConfig(**cfg)
        q_ref = quantize_weights(ref, wcfg)
        path = tmp_path / f"{folder.parent.name}.onnx"
        got = _streamed(folder, path, NBits(wcfg.bits, wcfg.block_size, wcfg.symmetric, wcfg.accuracy_level))
        ops = lambda m: [(n.op_type, [a.SerializeToString() for a in n.attribute]) for n in m.graph.node]  # noqa: E731
        assert ops(got) == ops(q_ref)
        a, b = _inits(q_ref), _inits(got)
        assert b.keys() <= a.keys()
        assert sum(n.op_type == "MatMulNBits" for n in got.graph.node) == 5 * stage.llm.num_layers + 1
        for name in b:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        np.testing.assert_array_equal(_logits(path, stage), _logits(q_ref, stage))


@pytest.fixture(scope="module")
def bf16_builds(bf16_llama, tmp_path_factory):
    """The folder's non-streaming builds (export, then quantize_build to INT4) and its streamed ones."""
    from omniforge.calibration.quantize import QuantizeOptions, quantize_build
    from omniforge.export.exporter import export_pipeline

    root = tmp_path_factory.mktemp("bf16-builds")
    export_pipeline(bf16_llama, root / "fp32", log=QUIET)
    opts = QuantizeOptions(standard_form=False, end_to_end=False)
    quantize_build(root / "fp32", root / "int4", "int4", log=QUIET, options=opts)
    reports = {}
    for p in ("fp32", "int4"):
        _, reports[p] = stream_llm_build(bf16_llama, root / f"stream-{p}", p, canonical=False, log=QUIET)
    return root, reports


def _greedy(build: Path, n: int = 24) -> list[list[int]]:
    from omniforge.runtime.llm import LlmRuntime
    from omniforge.runtime.sampling import GenerationConfig

    rt = LlmRuntime(build, num_slots=1, prefix_cache_entries=0)
    cfg = GenerationConfig(max_new_tokens=n, stop_token_ids=())
    return [rt.generate(p, cfg).token_ids for p in PROMPTS]


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_streamed_build_generates_the_non_streaming_builds_tokens(precision, bf16_builds):
    from omniforge.pipeline.manifest import load_manifest

    root, reports = bf16_builds
    streamed, reference = root / f"stream-{precision}", root / precision
    assert _greedy(streamed) == _greedy(reference)
    m = load_manifest(streamed)
    assert list(m.stages) == ["token_embedding", "llm"]
    sb = m.stages["llm"]
    assert sb.precision == precision and sb.runtime_variant().file == sb.canonical.file
    assert "asked not to load the whole model" in m.source["llm_stream"]["canonical"]
    r = reports[precision]
    assert (
        r["peak_rss_total_bytes"]
        == json.loads((streamed / "stream.json").read_text())["peak_rss_total_bytes"]
    )
    assert r["source_dtypes"] == {"BF16": 3 + 9 * 3}
    parity = json.loads((streamed / "parity.json").read_text())
    assert all(s["passed"] for s in parity)
    if precision == "int4":
        q = {s["stage"]: s for s in json.loads((streamed / "quantize.json").read_text())}
        assert q["llm"]["metrics"]["logits_cosine"] > 0.9 and q["token_embedding"]["precision"] == "int8"
        labels = {p["stage"] for p in parity[1]["parity"]}
        assert labels == {"llm[streamed, accuracy_level 0]", "llm[streamed, served]"}


def test_default_models_llm_streams_to_the_exports_graphs(default_model, default_build, tmp_path):
    """The default NExT-GPT's LLM (its LoRA adapter merged from the shards, as PEFT merges it):
    the streamed FP32 build generates the exported build's tokens with logits within 1e-5, and
    its INT4 graph holds ONNX Runtime's quantizer's codes of the exported in-place graph."""
    from omniforge.calibration.weight_only import WeightOnlyConfig, quantize_weights
    from omniforge.pipeline.contracts import Role
    from omniforge.pipeline.manifest import load_manifest

    m = load_manifest(default_build)
    served = m.variant("llm", Role.ORT_INPLACE_LLM)
    stage = m.pipeline.stage("llm")
    stream_llm_build(default_model, tmp_path / "fp32", "fp32", canonical=False, log=QUIET)
    streamed = load_manifest(tmp_path / "fp32").variant("llm", Role.ORT_INPLACE_LLM)
    assert _greedy(tmp_path / "fp32") == _greedy(default_build)
    np.testing.assert_allclose(
        _logits(tmp_path / "fp32" / streamed.file, stage),
        _logits(default_build / served.file, stage),
        rtol=0,
        atol=1e-5,
    )
    stream_llm_build(default_model, tmp_path / "int4", "int4", canonical=False, log=QUIET)
    q_ref = _inits(quantize_weights(onnx.load(str(default_build / served.file)), WeightOnlyConfig()))
    got = _inits(
        onnx.load(
            str(
                tmp_path / "int4" / load_manifest(tmp_path / "int4").variant("llm", Role.ORT_INPLACE_LLM).file
            )
        )
    )
    codes = [n for n in got if n.endswith("_Q4") or n.endswith("_scales")]
    assert len(codes) == 2 * (5 * stage.llm.num_layers + 1)
    for name in codes:
        np.testing.assert_array_equal(got[name], q_ref[name], err_msg=name)


def test_build_streams_llm_only_folders_and_reports_peak_rss(bf16_llama, tmp_path):
    from omniforge.build import BuildOptions, build
    from omniforge.runtime.llm import LlmRuntime

    logs: list[str] = []
    opts = BuildOptions(precision="int4", cache=tmp_path / "cache", llm_stream="always")
    m, rows = build(bf16_llama, tmp_path / "b", opts, log=logs.append)
    assert any(line.startswith("streamed LLM build:") and "peak RSS" in line for line in logs)
    assert m.source["llm_stream"]["peak_rss_bytes"] > 0 and m.source["precision"] == "int4"
    assert [r["precision"] for r in rows] == ["int8", "int4"]
    for r in rows:  # the summary's sizes count the external data the graphs serve
        v = m.stage_build(r["stage"]).runtime_variant()
        assert r["size_kib"] == round(m.served_bytes(r["stage"]) / 1024) and (
            r["stage"] != "llm" or v.data_files
        )
    assert LlmRuntime(tmp_path / "b", num_slots=1).generate(PROMPTS[0]).new_tokens > 0
    logs.clear()
    build(bf16_llama, tmp_path / "b2", opts, log=logs.append)  # the streamed entry is cached
    assert "stream: up to date (cached)" in logs
    assert not any(p.name.startswith("export-") for p in (tmp_path / "cache").iterdir())


def test_cli_build_streams_a_folder_too_large_for_the_memory_available(
    bf16_llama, tmp_path, monkeypatch, capsys
):
    """``omniforge build`` takes the streaming build by itself when the FP32 export would not fit;
    the output reports the build's peak RSS and the manifest says why no FP32 canonical graph."""
    import omniforge.export.llm_stream as llm_stream
    from omniforge.cli import main
    from omniforge.pipeline.manifest import load_manifest

    monkeypatch.setattr(llm_stream, "available_memory", lambda: 1 << 20)
    out = tmp_path / "b"
    args = [
        "build",
        str(bf16_llama),
        "--out",
        str(out),
        "--precision",
        "int4",
        "--cache",
        str(tmp_path / "c"),
    ]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "streamed LLM build:" in err and "peak RSS" in err
    note = load_manifest(out).source["llm_stream"]["canonical"]
    assert "was not written" in note and "GiB was available" in note


def test_streaming_refusals_are_one_sentence(bf16_llama, tmp_path):
    from omniforge.build import BuildOptions, build
    from omniforge.calibration.weight_only import WeightOnlyConfig

    with pytest.raises(ConfigError, match="round-to-nearest only: AWQ"):
        stream_llm_build(bf16_llama, tmp_path / "a", "int4", WeightOnlyConfig(method="awq"), log=QUIET)
    with pytest.raises(ConfigError, match="not 'auto'"):
        stream_llm_build(bf16_llama, tmp_path / "a", "auto", log=QUIET)
    for bad in (dict(precision="auto"), dict(backend="tensorrt"), dict(stage_precision={"llm": "int8"})):
        opts = BuildOptions(llm_stream="always", cache=tmp_path / "c", **bad)
        with pytest.raises(Exception, match="streaming LLM build writes|tensorrt|TensorRT"):
            build(bf16_llama, tmp_path / "b", opts, log=QUIET)
    with pytest.raises(ConfigError, match="llm_stream"):
        BuildOptions(llm_stream="sometimes")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- real size (run with -m slow) -----------------------------------------------------------------

ONE_B = dict(  # TinyLlama-1.1B's shape, a shorter context
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=512,
)


def _child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (its own peak RSS); it prints one JSON line last."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=7200)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_1b_llama_streams_to_int4_with_the_non_streaming_builds_tokens(tmp_path_factory):
    """A 1B-class seeded LLaMA (BF16 shards, written shard by shard by the benchmark's writer)
    streamed to INT4 generates the non-streaming INT4 build's greedy tokens; each build runs in its
    own process and its peak RSS is recorded in ``benchmarks/results/real_size_1b_test.json``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from real_size import write_seeded_llama

    from omniforge.export.llm_stream import NON_STREAMING_FACTOR, available_memory

    root = tmp_path_factory.mktemp("real1b")
    folder = write_seeded_llama(root / "llama-1b", ONE_B, seed=0)
    params = LlamaFolder(folder).parameter_count()
    stream = _child(
        "import json; from omniforge.export.llm_stream import stream_llm_build\n"
        f"_, r = stream_llm_build({str(folder)!r}, {str(root / 'stream')!r}, 'int4', canonical=False, log=lambda m: None)\n"
        "print(json.dumps(r))"
    )
    result = {"parameters": params, "stream": stream}
    if NON_STREAMING_FACTOR * 4 * params > available_memory():
        result["non_streaming"] = "skipped: not enough memory available"
    else:
        result["non_streaming"] = _child(
            "import json, resource\n"
            "from omniforge.export.exporter import export_pipeline\n"
            "from omniforge.calibration.quantize import QuantizeOptions, quantize_build\n"
            f"export_pipeline({str(folder)!r}, {str(root / 'fp32')!r}, log=lambda m: None)\n"
            f"quantize_build({str(root / 'fp32')!r}, {str(root / 'int4')!r}, 'int4', log=lambda m: None,"
            " options=QuantizeOptions(standard_form=False, end_to_end=False))\n"
            "print(json.dumps({'peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))"
        )
        got, want = _greedy(root / "stream", 32), _greedy(root / "int4", 32)
        result["greedy_tokens_equal"] = got == want
        assert got == want
    out = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "real_size_1b_test.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    assert stream["peak_rss_total_bytes"] < 0.5 * 4 * params  # well under the FP32 model
