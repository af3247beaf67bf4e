"""LoRA adapters switched per request over one base LLM: equal to merged models, mixed in one
batch, isolated in the prefix cache, verified at load."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from omniforge.errors import ConfigError, InputError, ManifestError
from omniforge.model.loader import load_llm
from omniforge.pipeline.contracts import Role
from omniforge.pipeline.model_config import load_model_config
from omniforge.runtime.batching import ContinuousBatcher
from omniforge.runtime.kv_cache import SlotRange
from omniforge.runtime.llm import LlmRuntime
from omniforge.runtime.sampling import GenerationConfig

ADAPTERS = ("image", "video", "audio", "text")
PROMPT = "Describe what you see and then make a short song about it"
GREEDY64 = GenerationConfig(max_new_tokens=64)
QUIET = lambda _m: None  # noqa: E731


@pytest.fixture(scope="module")
def runtime(default_build):
    return LlmRuntime(default_build, num_slots=8, prefix_cache_entries=0)


@pytest.fixture(scope="module")
def merged(default_model):
    """Each adapter merged into the base LLM by PEFT (and the base itself under None)."""
    cfg = load_model_config(default_model)
    return {name: load_llm(cfg, name) for name in (None, *ADAPTERS)}


def test_a_default_build_exports_four_adapters_with_hashes(default_build):
    m = json.loads((default_build / "manifest.json").read_text())
    hashed = {a["path"] for a in m["artifacts"]}
    index = json.loads((default_build / "adapters" / "adapters.json").read_text())
    assert sorted(index["adapters"]) == sorted(ADAPTERS)
    for name in ADAPTERS:
        rel = m["files"][f"adapter.{name}"]
        assert rel in hashed and (default_build / rel).is_file()
        # ONNX Runtime's own adapter format, one A/B pair per slot of the graph
        params = ort.AdapterFormat.read_adapter(str(default_build / rel)).get_parameters()
        assert len(params) == 2 * len(index["slots"])
    # the text adapter also targets the MLP, the media adapters only the attention
    assert index["adapters"]["text"]["modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert index["adapters"]["image"]["modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert index["adapters"]["text"]["rank"] > index["adapters"]["image"]["rank"] > 0


def _logits(runtime, rows, adapter):
    slot = runtime.allocate_slots(1)
    try:
        binding = runtime.engine.bind(runtime.pool, slot)
        binding.use_adapters(runtime.adapter_arrays([adapter]))
        logits, hidden = binding.step(rows[None])
    finally:
        runtime.pool.release(slot)
    return logits[0], hidden[0]


@pytest.mark.parametrize("adapter", [None, *ADAPTERS])
def test_switched_adapter_equals_the_merged_model(runtime, merged, adapter):
    """Logits within 1e-5 of PEFT's merged model, and 64 identical greedy tokens."""
    ids = runtime.tokenizer.encode(PROMPT)
    rows = runtime.embed_ids(ids)
    logits, hidden = _logits(runtime, rows, adapter)
    hf = merged[adapter]
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
    np.testing.assert_allclose(logits, out.logits[0, -1].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(hidden, out.hidden_states[-1][0].numpy(), atol=1e-5, rtol=0)
    result = runtime.generate(PROMPT, GREEDY64, adapter=adapter or "none")
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([ids]), max_new_tokens=64, do_sample=False, eos_token_id=-1, pad_token_id=0
        )[0, len(ids) :].tolist()
    assert result.adapter == adapter
    assert result.token_ids == ref[: len(result.token_ids)] and len(result.token_ids) >= 1
    if result.finish_reason == "length":
        assert len(result.token_ids) == 64


def test_the_adapters_visibly_change_the_output(runtime):
    outs = {
        a: tuple(runtime.generate(PROMPT, GenerationConfig(max_new_tokens=16), adapter=a).token_ids)
        for a in ("none", *ADAPTERS)
    }
    assert len(set(outs.values())) == len(outs), outs


def test_onnx_runtime_activates_the_same_adapter_files(default_build, runtime):
    """The adapter files are ONNX Runtime's own: ``RunOptions.add_active_adapter`` on a plain
    ``run`` gives the logits the runtime's bound inputs give."""
    from omniforge.runtime.build import Build

    variant = Build(default_build).manifest.variant("llm", Role.ORT_INPLACE_LLM)
    graph = (default_build / variant.file).read_bytes()
    rows = runtime.embed_ids(runtime.tokenizer.encode("a cat on a mat"))
    got = _plain_run(graph, runtime, rows, default_build / "adapters" / "video.onnx_adapter")
    np.testing.assert_allclose(got, _logits(runtime, rows, "video")[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(_plain_run(graph, runtime, rows), _logits(runtime, rows, None)[0], atol=1e-5)
    assert np.abs(got - _logits(runtime, rows, None)[0]).max() > 1e-3


def test_mixed_adapters_in_one_batch_equal_each_alone(runtime):
    names = ["text", "image", "none", "video", "audio", "text"]
    prompts = [PROMPT, "A dog runs", "Rain on a roof", PROMPT, "hello there", "A dog runs"]
    cfg = GenerationConfig(max_new_tokens=24)
    alone = [runtime.generate(p, cfg, adapter=a).token_ids for p, a in zip(prompts, names, strict=True)]
    together = runtime.generate_batch(prompts, cfg, adapters=names)
    assert [r.token_ids for r in together] == alone
    assert [r.adapter for r in together] == [None if a == "none" else a for a in names]
    with ContinuousBatcher(runtime) as batcher:
        handles = [batcher.submit(p, cfg, adapter=a) for p, a in zip(prompts, names, strict=True)]
        assert [h.result(timeout=120).token_ids for h in handles] == alone


def test_the_prefix_cache_never_mixes_adapters(default_build):
    rt = LlmRuntime(default_build, num_slots=4, prefix_cache_entries=2)
    fresh = LlmRuntime(default_build, num_slots=2, prefix_cache_entries=0)
    cfg = GenerationConfig(max_new_tokens=8)
    long_prompt = PROMPT + " " + PROMPT  # longer than a cache block
    first = rt.generate(long_prompt, cfg, adapter="image")
    other = rt.generate(long_prompt, cfg, adapter="audio")
    assert first.reused_prefix_tokens == 0 and other.reused_prefix_tokens == 0
    assert other.token_ids == fresh.generate(long_prompt, cfg, adapter="audio").token_ids
    again = rt.generate(long_prompt, cfg, adapter="image")
    assert again.reused_prefix_tokens > 0 and again.token_ids == first.token_ids


def test_auto_picks_the_adapter_from_the_request(runtime, default_build):
    from omniforge.runtime.pipeline import Pipeline

    assert runtime.resolve_adapter("auto") == "text"
    assert runtime.resolve_adapter("auto", ["image"]) == "image"
    assert runtime.resolve_adapter("auto", ["image", "video"]) == "video"  # the rule's order
    assert runtime.resolve_adapter("none") is None
    pipe = Pipeline(default_build, num_slots=2)
    out = pipe.run("hello", generation=GenerationConfig(max_new_tokens=2))
    assert out.generation.adapter == "text"
    with pytest.raises(InputError, match="unknown adapter 'smell'"):
        runtime.generate("hi", adapter="smell")
    with pytest.raises(InputError, match="2 adapters given for 1 prompts"):
        runtime.generate_batch(["hi"], adapters=["text", "image"])


def test_run_cli_takes_an_adapter(default_build):
    def run(*extra):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "omniforge",
                "run",
                str(default_build),
                "-p",
                "hello there",
                "--max-new-tokens",
                "4",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )

    ok = run("--adapter", "video")
    assert ok.returncode == 0, ok.stderr
    assert "adapter: video" in ok.stderr
    bad = run("--adapter", "smell")
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == [
        "omniforge: error: unknown adapter 'smell'; this build has ['audio', 'image', 'text', 'video'] (or 'auto', 'none')"
    ]


def test_an_adapter_with_a_flipped_byte_is_refused(default_build, tmp_path):
    copy = tmp_path / "build"
    shutil.copytree(default_build, copy)
    path = copy / "adapters" / "audio.onnx_adapter"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="audio.onnx_adapter"):
        LlmRuntime(copy)
    # also when the file is swapped after the build was opened
    shutil.copy(default_build / "adapters" / "audio.onnx_adapter", path)
    rt = LlmRuntime(copy)
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="audio.onnx_adapter"):
        rt.generate("hi", GenerationConfig(max_new_tokens=2), adapter="audio")


def test_an_adapter_for_another_base_model_is_refused(runtime, default_model, tmp_path):
    from omniforge.export.lora import write_adapter

    arrays = runtime.adapters.get("image").arrays
    other = tmp_path / "other.onnx_adapter"
    write_adapter(other, arrays, "f" * 64)  # the same shapes, another base's fingerprint
    with pytest.raises(ConfigError, match="was made for another base model"):
        runtime.adapters.add("other", other)
    # an adapter for this base, stored as FP16, is taken
    fp16 = tmp_path / "fp16.onnx_adapter"
    write_adapter(fp16, arrays, runtime.adapters.fingerprint, dtype="float16")
    runtime.adapters.add("image16", fp16)
    rows = runtime.embed_ids(runtime.tokenizer.encode(PROMPT))
    np.testing.assert_allclose(
        _logits(runtime, rows, "image16")[0], _logits(runtime, rows, "image")[0], atol=2e-3
    )
    # a PEFT adapter trained for a model of another width is refused at export, in one sentence
    from omniforge.export.llm_ort import TorchWeights
    from omniforge.export.lora import export_adapters

    cfg = load_model_config(default_model)
    hf = load_llm(cfg, None)
    wrong = tmp_path / "wrong"
    shutil.copytree(cfg.adapters["image"], wrong)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(wrong / "adapter_model.safetensors")
    save_file(
        {k: np.concatenate([v, v], axis=1) if ".lora_A." in k else v for k, v in tensors.items()},
        wrong / "adapter_model.safetensors",
    )
    with pytest.raises(ConfigError, match="was trained for another base model"):
        export_adapters({"wrong": wrong}, TorchWeights(hf), hf.config.num_hidden_layers, tmp_path / "b", {})


def test_a_build_without_switchable_adapters_refuses_a_name(tmp_path, default_model):
    from omniforge.export.exporter import ExportOptions, export_pipeline

    export_pipeline(
        default_model,
        tmp_path / "merged",
        ExportOptions(stages=["token_embedding", "llm"], adapter="text", parity=False),
        log=lambda _m: None,
    )
    rt = LlmRuntime(tmp_path / "merged", num_slots=2)
    assert rt.adapters is None and rt.engine.lora_inputs == []
    assert rt.generate("hi", GenerationConfig(max_new_tokens=2)).adapter is None
    with pytest.raises(InputError, match="no switchable adapters"):
        rt.generate("hi", adapter="text")


def _plain_run(model_bytes, runtime, rows, adapter_file=None, arrays=None):
    """Last-position logits of one prefill through ``session.run``, the adapter activated by
    ONNX Runtime's ``RunOptions.add_active_adapter`` (or its ``arrays`` fed as inputs)."""
    g = runtime.geometry
    quiet = ort.SessionOptions()
    quiet.log_severity_level = 3  # the optional low-rank inputs are initializers too: ORT warns
    sess = ort.InferenceSession(model_bytes, quiet, providers=["CPUExecutionProvider"])
    feeds = {
        "inputs_embeds": rows[None],
        "seqlens_k": np.array([len(rows) - 1], np.int32),
        "total_sequence_length": np.array(len(rows), np.int32),
    }
    for i in range(g.num_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros(
                (1, g.num_kv_heads, g.max_context, g.head_dim), np.float32
            )
    feeds.update(arrays or {})
    options = ort.RunOptions()
    if adapter_file is not None:
        adapter = ort.LoraAdapter()
        adapter.Load(str(adapter_file))
        options.add_active_adapter(adapter)
    return sess.run(["logits"], feeds, options)[0][0, -1]


def test_an_int4_base_takes_fp32_and_fp16_adapters(default_build, runtime, tmp_path):
    """Weight-only INT4 leaves the adapters' branches FP32 MatMuls over the bound inputs; an
    adapter stored as FP32 or FP16 moves the INT4 model's logits as it moves the FP32 model's."""
    import onnx

    from omniforge.calibration.weight_only import WeightOnlyConfig, quantize_weights
    from omniforge.export.lora import write_adapter
    from omniforge.runtime.build import Build

    variant = Build(default_build).manifest.variant("llm", Role.ORT_INPLACE_LLM)
    fp32 = onnx.load(str(default_build / variant.file))
    q = quantize_weights(fp32, WeightOnlyConfig(bits=4))
    ops = {n.name: n.op_type for n in q.graph.node}
    lora = {k: v for k, v in ops.items() if k.startswith("lora.")}
    assert lora and set(lora.values()) == {"MatMul", "Add"}
    assert sum(v == "MatMulNBits" for v in ops.values()) > 0
    fp16 = tmp_path / "text16.onnx_adapter"
    write_adapter(fp16, runtime.adapters.get("text").arrays, runtime.adapters.fingerprint, dtype="float16")
    rows = runtime.embed_ids(runtime.tokenizer.encode(PROMPT))
    f, qb = fp32.SerializeToString(), q.SerializeToString()
    base32, base4 = _plain_run(f, runtime, rows), _plain_run(qb, runtime, rows)
    # FP16 files are read as FP32 by the runtime (the graph's inputs are FP32)
    half = runtime.adapters.add("text16", fp16).arrays
    for file, arrays in ((default_build / "adapters" / "text.onnx_adapter", None), (None, half)):
        shift32 = _plain_run(f, runtime, rows, file, arrays) - base32
        shift4 = _plain_run(qb, runtime, rows, file, arrays) - base4
        assert np.abs(shift32).max() > 1e-2
        cos = float(shift32 @ shift4 / np.linalg.norm(shift32) / np.linalg.norm(shift4))
        assert cos > 0.9, cos


def test_merged_variants_serve_their_adapters_as_the_switched_graph_does(
    default_model, default_build, tmp_path
):
    from omniforge.build import BuildOptions, merged_variants

    out = tmp_path / "merged"
    merged_variants(default_model, default_build, out, BuildOptions(merge_adapters=("text", "video")), QUIET)
    merged = LlmRuntime(out, num_slots=6, prefix_cache_entries=0)
    switched = LlmRuntime(default_build, num_slots=6, prefix_cache_entries=0)
    assert merged.merged_adapters == ["text", "video"]
    ids = merged.tokenizer.encode(PROMPT)
    rows = merged.embed_ids(ids)
    for name in ("text", "video"):
        binding = merged.bind_for([name], SlotRange(0, 1))
        assert binding.engine is merged.engine_for(name) and not binding.engine.lora_inputs
        got = binding.step(rows[None])[0][0]
        merged.pool.release(SlotRange(0, 1))
        np.testing.assert_allclose(got, _logits(switched, rows, name)[0], atol=1e-5, rtol=0)
        a = merged.generate(PROMPT, GREEDY64, adapter=name)
        assert a.token_ids == switched.generate(PROMPT, GREEDY64, adapter=name).token_ids
    # a batch mixing merged variants, switched adapters and the base equals each alone
    names = ["text", "image", "video", "none", "text", "audio"]
    cfg = GenerationConfig(max_new_tokens=16)
    alone = [merged.generate(PROMPT, cfg, adapter=n).token_ids for n in names]
    assert [r.token_ids for r in merged.generate_batch([PROMPT] * 6, cfg, adapters=names)] == alone
    with ContinuousBatcher(merged) as batcher:
        handles = [batcher.submit(PROMPT, cfg, adapter=n) for n in names]
        assert [h.result(timeout=120).token_ids for h in handles] == alone


def test_merge_adapter_is_checked_before_any_work(default_model, tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "omniforge",
            "build",
            str(default_model),
            "--out",
            str(tmp_path / "b"),
            "--cache",
            str(tmp_path / "cache"),
            "--merge-adapter",
            "smell",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "omniforge: error: unknown adapter 'smell'; this model has ['audio', 'image', 'text', 'video']"
    ]
    assert not (tmp_path / "b").exists() and not (tmp_path / "cache").exists()


def test_tensorrt_refit_weights_make_the_base_graph_the_merged_model(default_model, default_build):
    """The weights a TensorRT refit would receive, put into the canonical base graph, give the
    merged model's logits; the refit itself says in one sentence that TensorRT is absent."""
    import onnx
    from onnx import numpy_helper

    from omniforge.engines.lora_refit import canonical_refit_map, refit_engine
    from omniforge.errors import MissingDependencyError
    from omniforge.export.llm_ort import TorchWeights
    from omniforge.export.llm_stream import LoraAdapter

    cfg = load_model_config(default_model)
    base = load_llm(cfg, None)
    graph = onnx.load(str(default_build / "stages" / "llm.onnx"))
    weights = canonical_refit_map(graph, TorchWeights(base), LoraAdapter(cfg.adapters["text"]))
    assert len(weights) == 7 * base.config.num_hidden_layers  # q, k, v, o, gate, up, down
    for t in graph.graph.initializer:
        if t.name in weights:
            t.CopyFrom(numpy_helper.from_array(weights[t.name], t.name))
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[5, 17, 42, 9, 3]], np.int64)
    emb = base.model.embed_tokens(torch.from_numpy(ids)).detach().numpy()
    g = base.config
    hd = g.hidden_size // g.num_attention_heads
    past = {
        f"past_key_values.{i}.{k}": np.zeros((1, g.num_key_value_heads, 0, hd), np.float32)
        for i in range(g.num_hidden_layers)
        for k in ("key", "value")
    }
    feeds = {
        "inputs_embeds": emb,
        "attention_mask": np.ones((1, 5), np.int64),
        "position_ids": np.arange(5)[None],
        **past,
    }
    got = sess.run(["logits"], feeds)[0]
    with torch.no_grad():
        want = load_llm(cfg, "text")(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    with pytest.raises(MissingDependencyError, match="TensorRT"):
        refit_engine(default_build / "none.engine", weights, default_build / "out.engine")
