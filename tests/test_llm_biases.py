"""LLaMA backbones with biases beyond q/k/v: ``attention_bias`` (q/k/v and o_proj) and
``mlp_bias`` (gate/up/down). The export meets parity, greedy decoding equals transformers', the
streaming build writes the same graph from the shards, and the INT4 weight-only forms (biases
kept FP32) stay close to FP32."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from omniforge.runtime.llm import LlmRuntime
from omniforge.runtime.sampling import GenerationConfig
from tests.test_llm_stream import _in_memory, _save, _streamed
from tests.test_qwen import PROMPTS, assert_greedy_equals_transformers, assert_llm_parity, write_llm

QUIET = lambda _m: None  # noqa: E731


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    """(folder, FP32 build, the model as transformers loads it back) of a tiny LLaMA with every bias."""
    from transformers import AutoModelForCausalLM

    from omniforge.export.exporter import export_pipeline

    root = tmp_path_factory.mktemp("biased")
    folder = write_llm(root / "model", "llama", False, seed=3, attention_bias=True, mlp_bias=True)
    export_pipeline(folder, root / "build", log=QUIET)  # raises below its parity tolerance
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    layer = hf.model.layers[0]
    linears = [getattr(layer.self_attn, f"{k}_proj") for k in "qkvo"]
    linears += [getattr(layer.mlp, f"{k}_proj") for k in ("gate", "up", "down")]
    assert all(m.bias is not None and m.bias.abs().max() > 0.1 for m in linears)
    return folder, root / "build", hf


def test_export_meets_parity(biased):
    assert_llm_parity(biased[1])


def test_greedy_equals_transformers_generate_for_64_tokens(biased):
    _, build, hf = biased
    assert_greedy_equals_transformers(build, hf)


def test_streamed_builds_generate_the_exports_tokens(biased, tmp_path):
    """FP32 from the shards: the traced export's tokens; INT4: its own check (biases FP32 beside
    the codes, exact at accuracy level 0) passes and it generates."""
    from omniforge.export.llm_stream import stream_llm_build

    folder, build, _ = biased
    cfg = GenerationConfig(max_new_tokens=16)
    stream_llm_build(folder, tmp_path / "fp32", "fp32", canonical=False, log=QUIET)
    for prompt in PROMPTS:
        want = LlmRuntime(build).generate(prompt, cfg).token_ids
        assert LlmRuntime(tmp_path / "fp32").generate(prompt, cfg).token_ids == want
    stream_llm_build(folder, tmp_path / "int4", "int4", canonical=False, log=QUIET)
    parity = json.loads((tmp_path / "int4" / "parity.json").read_text())
    assert all(s["passed"] for s in parity)
    q = {s["stage"]: s for s in json.loads((tmp_path / "int4" / "quantize.json").read_text())}
    assert q["llm"]["metrics"]["logits_cosine"] > 0.9
    assert LlmRuntime(tmp_path / "int4").generate(PROMPTS[0], cfg).new_tokens > 0


def test_int4_weight_only_build_runs_close_to_fp32(biased, tmp_path, quick_quant):
    from omniforge.calibration.quantize import quantize_build

    _, build, _ = biased
    quantize_build(build, tmp_path / "int4", "int4", log=QUIET, options=quick_quant)
    report = {r["stage"]: r for r in json.loads((tmp_path / "int4" / "quantize.json").read_text())}
    assert report["llm"]["precision"] == "int4"
    assert report["llm"]["metrics"]["logits_cosine"] > 0.94
    result = LlmRuntime(tmp_path / "int4").generate(PROMPTS[0], GenerationConfig(max_new_tokens=8))
    assert len(result.token_ids) >= 1


def _last_logits(graph, stage, rows: np.ndarray, adapters: dict | None = None) -> np.ndarray:
    """The in-place graph's logits of the last of ``rows`` (T, H), prefilled into one slot."""
    from omniforge.pipeline.contracts import llm_inplace_contract
    from omniforge.runtime.kv_cache import KVCachePool, SlotRange
    from omniforge.runtime.llm import LlmEngine

    g = stage.llm
    engine = LlmEngine(Path(_save(graph)), g, contract=llm_inplace_contract(g), preset="measurement")
    binding = engine.bind(KVCachePool(g, 1, max_context=len(rows)), SlotRange(0, 1))
    binding.use_adapters(adapters)
    return binding.step(rows[None])[0][0]  # (B, V): the last row's


@pytest.mark.parametrize("flag", ["attention_bias", "mlp_bias"])
def test_each_bias_in_the_in_place_graph_with_a_lora_branch(flag, tmp_path):
    """One kind of bias at a time: the in-place graph's logits equal transformers' (the streamed
    graph is the same graph), also with a low-rank branch on the o/gate/up/down groups, which
    adds to the biased output as a weight delta ``A @ B`` would."""
    from omniforge.export.llm_ort import build_llama_gqa
    from omniforge.model.loader import load_llm
    from omniforge.pipeline.contracts import llm_inplace_contract, lora_slot
    from omniforge.pipeline.model_config import load_model_config
    from omniforge.runtime.adapters import lora_input_names

    folder = write_llm(tmp_path / "model", "llama", False, seed=5, **{flag: True})
    graph, stage = _in_memory(folder)
    streamed = _streamed(folder, tmp_path / "llm.ort.onnx")
    assert [n.SerializeToString() for n in streamed.graph.node] == [
        n.SerializeToString() for n in graph.graph.node
    ]
    biases = [n.input[1] for n in graph.graph.node if n.op_type == "Add" and n.input[1].endswith(".bias")]
    groups = ("qkv", "o") if flag == "attention_bias" else ("gate", "up", "down")
    assert biases == [f"layers.{i}.{g}.bias" for i in range(stage.llm.num_layers) for g in groups]
    model = load_llm(load_model_config(folder))
    rows = torch.randn(9, stage.llm.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.5
    with torch.no_grad():
        want = model(inputs_embeds=rows[None]).logits[0, -1].numpy()
    np.testing.assert_allclose(_last_logits(graph, stage, rows.numpy()), want, rtol=0, atol=1e-4)

    modules = {"o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    rng = np.random.default_rng(1)
    slots, arrays = {}, {}
    for i, layer in enumerate(model.model.layers):
        for group, module in modules.items():
            lin = layer.get_submodule(module)
            n, k = lin.weight.shape
            slot = lora_slot(i, group)
            a_name, b_name = lora_input_names(slot)
            slots[slot] = (k, n)
            arrays[a_name] = (0.1 * rng.standard_normal((1, k, 2))).astype(np.float32)
            arrays[b_name] = (0.1 * rng.standard_normal((1, 2, n))).astype(np.float32)
            with torch.no_grad():
                lin.weight += torch.from_numpy(arrays[a_name][0] @ arrays[b_name][0]).T
    lora = build_llama_gqa(
        load_llm(load_model_config(folder)),
        stage.llm.max_context,
        llm_inplace_contract(stage.llm),
        lora_slots=slots,
    )
    with torch.no_grad():
        want = model(inputs_embeds=rows[None]).logits[0, -1].numpy()
    np.testing.assert_allclose(_last_logits(lora, stage, rows.numpy(), arrays), want, rtol=0, atol=1e-4)


def test_awq_scaling_keeps_the_fp32_function_with_mlp_biases(biased):
    """AWQ divides up_proj's output columns by down_proj's scale: its bias must be divided too."""
    import onnx

    from omniforge.calibration.awq import apply_awq
    from omniforge.calibration.quantize import calibration_rows
    from omniforge.calibration.tensors import inplace_prefill
    from omniforge.pipeline.contracts import Role
    from omniforge.pipeline.manifest import load_manifest
    from omniforge.runtime.engine import open_session

    _, build, _ = biased
    inplace = load_manifest(build).stages["llm"].variant(Role.ORT_INPLACE_LLM)
    graph = onnx.load(str(build / inplace.file))
    rows = calibration_rows(build, count=2, length=16)
    scaled = apply_awq(graph, inplace.contract, rows, 4, 32)
    feeds = inplace_prefill(inplace.contract, rows[0])
    logits = inplace.contract.slot("logits")
    a, b = (open_session(m.SerializeToString(), "exact").run([logits], feeds)[0] for m in (graph, scaled))
    assert np.abs(a - b).max() <= 1e-4
