"""Qwen2 and Qwen3 LLM backbones: plain HF folders exported, run and quantized like LLaMA folders."""

import json

import pytest
import torch

from omniforge.errors import ConfigError, ModelNotFoundError
from omniforge.model import families
from omniforge.runtime.llm import LlmRuntime
from omniforge.runtime.sampling import GenerationConfig
from omniforge.runtime.tokenizer import TextTokenizer

PROMPTS = ["Describe the image in one sentence.", "A dog runs"]
SIGNALS = ["[IMG0]", "[IMG1]", "[AUD0]"]
CORPUS = [
    "Describe the image in one sentence. A dog runs across the harbour at dawn.",
    "Generate the sound of rain falling on a tin roof, then a picture of 3 boats.",
    "What do you hear? Summarise the clip: café, naïve, 東京, emoji 🙂 and tabs\tand\nnew lines.",
] * 20


def byte_level_bpe():
    """A small byte-level BPE in Qwen's form, with the signal tokens added as plain added tokens."""
    tok = families.byte_level_bpe(CORPUS, 400)
    tok.add_tokens(SIGNALS)
    return tok


def write_llm(folder, kind: str, tie: bool, seed: int, head_dim: int = 16, **config):
    """A seeded tiny HF LLM folder (``kind``: llama, qwen2 or qwen3; ``config``: more config
    fields) as HF writes it (config.json, safetensors) with a Qwen-style tokenizer.json."""
    import transformers

    tok = byte_level_bpe()
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "Qwen2Tokenizer",
                "bos_token": None,
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "add_prefix_space": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": 160,
            }
        )
    )
    name = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[kind]
    cls, conf_cls = getattr(transformers, f"{name}ForCausalLM"), getattr(transformers, f"{name}Config")
    extra = {"head_dim": head_dim} if kind == "qwen3" else {}
    conf = conf_cls(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=160,
        rope_theta=1_000_000.0,
        tie_word_embeddings=tie,
        eos_token_id=tok.token_to_id("<|endoftext|>"),
        initializer_range=0.1,  # HF's 0.02 makes a tiny tied model repeat the prompt's last token
        **extra,
        **config,
    )
    torch.manual_seed(seed)
    model = cls(conf).eval()
    with torch.no_grad():  # biases and norm gains away from HF's zeros and ones, so they matter
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(
    scope="module", params=[("qwen2", True, 2), ("qwen3", False, 1)], ids=["qwen2-tied", "qwen3-untied"]
)
def qwen(request, tmp_path_factory):
    """(folder, FP32 build, the model as transformers loads it back)."""
    from transformers import AutoModelForCausalLM

    from omniforge.export.exporter import export_pipeline

    kind, tie, seed = request.param
    root = tmp_path_factory.mktemp(kind)
    folder = write_llm(root / "model", kind, tie, seed)
    export_pipeline(folder, root / "build", log=lambda _m: None)
    hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if kind == "qwen2" else "Qwen3ForCausalLM")
    assert hf.config.tie_word_embeddings is tie
    return folder, root / "build", hf


def assert_llm_parity(build) -> None:
    llm = {r["stage"]: r for r in json.loads((build / "parity.json").read_text())}["llm"]
    assert llm["passed"] and len(llm["parity"]) >= 4  # canonical and in-place graphs, >= 2 shapes each


def assert_greedy_equals_transformers(build, hf) -> None:
    """64 greedy tokens of each of ``PROMPTS`` equal transformers' ``generate``."""
    rt = LlmRuntime(build, num_slots=2)
    eos = hf.config.eos_token_id
    for prompt in PROMPTS:
        ids = rt.tokenizer.encode(prompt)
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([ids]), max_new_tokens=64, do_sample=False, eos_token_id=eos, pad_token_id=eos
            )
        ref = out[0, len(ids) :].tolist()
        assert rt.generate(prompt, GenerationConfig(max_new_tokens=64)).token_ids == ref
        assert len(ref) == 64 or ref[-1] == eos


def test_export_meets_parity(qwen):
    assert_llm_parity(qwen[1])


def test_greedy_equals_transformers_generate_for_64_tokens(qwen):
    _, build, hf = qwen
    assert_greedy_equals_transformers(build, hf)


def test_int4_weight_only_build_runs_close_to_fp32(qwen, tmp_path, quick_quant):
    from omniforge.calibration.quantize import quantize_build

    _, build, _ = qwen
    quantize_build(build, tmp_path / "int4", "int4", log=lambda _m: None, options=quick_quant)
    report = {r["stage"]: r for r in json.loads((tmp_path / "int4" / "quantize.json").read_text())}
    assert report["llm"]["precision"] == "int4"
    assert report["llm"]["metrics"]["logits_cosine"] > 0.94  # measured 0.964 (qwen2), 0.957 (qwen3)
    result = LlmRuntime(tmp_path / "int4").generate(PROMPTS[0], GenerationConfig(max_new_tokens=8))
    assert len(result.token_ids) >= 1


def test_text_tokenizer_equals_transformers_on_byte_level_bpe(qwen):
    from transformers import AutoTokenizer

    folder, build, _ = qwen
    ours = TextTokenizer(build / "llm" / "tokenizer.json", build / "llm" / "tokenizer_config.json")
    theirs = AutoTokenizer.from_pretrained(folder)
    texts = [
        *PROMPTS,
        "café naïve 東京 🙂\tx\n\n  y",
        "Make a picture [IMG0][IMG1] of a harbour<|im_end|> and a sound [AUD0].",
        "<|im_start|>user\nWhat's this?<|im_end|>\n",
    ]
    for text in texts:
        ids = ours.encode(text)
        assert ids == theirs.encode(text)
        assert ours.decode(ids) == theirs.decode(ids) == text
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.bos_token is None and ours.eos_id == theirs.eos_token_id
    for s in SIGNALS:
        assert ours.token_id(s) == theirs.convert_tokens_to_ids(s) is not None


def test_a_qwen_llm_in_a_nextgpt_folder_and_refusals(qwen, tmp_path):
    from omniforge.model.loader import load_llm
    from omniforge.pipeline.describe import llm_geometry
    from omniforge.pipeline.model_config import load_model_config

    folder, _, hf = qwen
    (tmp_path / "nextgpt.json").write_text(
        json.dumps(
            {"format": "omniforge-nextgpt", "format_version": 1, "llm": str(folder), "max_context": 96}
        )
    )
    cfg = load_model_config(tmp_path)
    assert type(load_llm(cfg)) is type(hf) and llm_geometry(cfg).max_context == 96
    for model_type in ("gpt2", "mistral"):
        other = tmp_path / model_type
        other.mkdir()
        (other / "config.json").write_text(json.dumps({"model_type": model_type}))
        with pytest.raises(ModelNotFoundError, match="'llama' \\(LlamaForCausalLM\\), 'qwen2'"):
            load_model_config(other)
        (other / "nextgpt.json").write_text(
            json.dumps({"format": "omniforge-nextgpt", "format_version": 1, "llm": "."})
        )
        with pytest.raises(ConfigError, match=f"is a '{model_type}' model; omniforge exports LLMs"):
            load_model_config(other)
    cfg_json = json.loads((folder / "config.json").read_text())
    sliding = tmp_path / "sliding"
    sliding.mkdir()
    (sliding / "config.json").write_text(json.dumps({**cfg_json, "use_sliding_window": True}))
    with pytest.raises(ConfigError, match="sliding-window attention"):
        load_model_config(sliding)


def test_streaming_build(qwen, tmp_path):
    """The streamed writer takes Qwen2 and Qwen3 (its q/k head norms): its graph passes the
    layer-by-layer reference's parity and generates the traced export's tokens."""
    from omniforge.export.llm_stream import stream_llm_build

    folder, build, _ = qwen
    stream_llm_build(folder, tmp_path / "s", "fp32", canonical=False, log=lambda _m: None)
    assert all(s["passed"] for s in json.loads((tmp_path / "s" / "parity.json").read_text()))
    cfg = GenerationConfig(max_new_tokens=16)
    a = LlmRuntime(tmp_path / "s").generate(PROMPTS[1], cfg).token_ids
    assert a == LlmRuntime(build).generate(PROMPTS[1], cfg).token_ids


def test_qwen3_head_size_without_fused_rotary(tmp_path):
    """A head size GroupQueryAttention does not rotate itself (24): q/k norms, then rotary from standard ops."""
    from omniforge.export.exporter import export_pipeline

    folder = write_llm(tmp_path / "model", "qwen3", False, seed=1, head_dim=24)
    assert json.loads((folder / "config.json").read_text())["head_dim"] == 24
    export_pipeline(folder, tmp_path / "build", log=lambda _m: None)  # raises below its parity tolerance
    llm = {r["stage"]: r for r in json.loads((tmp_path / "build" / "parity.json").read_text())}["llm"]
    assert llm["passed"]
