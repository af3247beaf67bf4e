"""NExT-GPT's released checkpoints read safely: the delta, its TextFcLayers, the LoRA as a peft
adapter, the 4.29 slow tokenizer as tokenizer.json, and Vicuna's .bin shards as safetensors."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from omniforge.errors import ConfigError, ModelNotFoundError
from omniforge.importers.delta import read_delta, write_peft_adapter
from omniforge.importers.llama import convert_llama_folder
from omniforge.importers.tokenizer import convert_tokenizer
from omniforge.importers.weights import load_pickled_weights, read_sharded_folder, read_weights
from omniforge.model.textfc import (
    TextFcConfig,
    build_textfc,
    load_textfc,
    save_textfc,
    textfc_config_from_state,
)
from tests.release_format.delta import make_delta, make_malicious_pickle, reference_textfc, signal_tokens
from tests.release_format.vicuna import make_vicuna

ALPHA = 8.0  # r 4 in the fabricated delta: scaling 2, so a wrong scaling shows


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    vicuna = make_vicuna(root / "vicuna")
    delta = make_delta(root / "delta", root / "vicuna")
    return vicuna, delta


def _one_sentence(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# ---- weights-only reading ----


def test_malicious_pickle_is_refused_without_running_or_writing(tmp_path):
    marker = tmp_path / "marker"
    folder = tmp_path / "delta"
    evil = make_malicious_pickle(folder / "pytorch_model.pt", marker)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for read in (load_pickled_weights, read_weights, read_delta):
            with pytest.raises(ConfigError) as exc:
                read(evil)
            msg = _one_sentence(exc)
            assert "refused" in msg and str(evil) in msg and "posix.system" in msg
        with pytest.raises(ConfigError, match="refused"):
            read_delta(folder)
    assert not caught, [str(w.message) for w in caught]
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_damaged_files_are_one_sentence(tmp_path, release):
    _, delta = release
    good = (delta.folder / "pytorch_model.pt").read_bytes()
    cases = {
        "truncated.pt": good[: len(good) // 2],
        "garbage.bin": b"not a checkpoint at all",
        "empty.pth": b"",
        "bad.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError) as exc:
            read_weights(tmp_path / name)
        assert "not a readable" in _one_sentence(exc)
    with pytest.raises(ModelNotFoundError):
        read_weights(tmp_path / "absent.pt")
    with pytest.raises(ConfigError, match="not a weights file"):
        read_weights(tmp_path / "weights.pkl")


def test_wrapped_and_non_tensor_pickles(tmp_path):
    t = torch.arange(6.0).reshape(2, 3)
    torch.save({"state_dict": {"a.weight": t}, "epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "wrapped.pt")
    assert torch.equal(load_pickled_weights(tmp_path / "wrapped.pt")["a.weight"], t)
    torch.save({"model": {"state_dict": {"b": t}}}, tmp_path / "nested.pth")
    assert set(load_pickled_weights(tmp_path / "nested.pth")) == {"b"}
    torch.save({"a": t, "step": 7}, tmp_path / "mixed.pt")
    with pytest.raises(ConfigError, match="not named tensors"):
        load_pickled_weights(tmp_path / "mixed.pt")
    torch.save([t], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match="not a state dict"):
        load_pickled_weights(tmp_path / "list.pt")


def test_sharded_folder_one_shard_at_a_time(tmp_path, release):
    vicuna, _ = release
    shards = list(read_sharded_folder(vicuna.folder))
    assert [n for n, _ in shards] == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    merged = {k: v for _, s in shards for k, v in s.items()}
    assert merged.keys() == vicuna.state.keys()
    assert all(torch.equal(merged[k], v) for k, v in vicuna.state.items())
    assert [n for n, _ in read_sharded_folder(vicuna.folder / "pytorch_model-00002-of-00002.bin")] == [
        "pytorch_model-00002-of-00002.bin"
    ]

    bad = tmp_path / "bad"
    shutil.copytree(vicuna.folder, bad)
    index = json.loads((bad / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "../outside.bin"
    (bad / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="not a weights file in its folder"):
        list(read_sharded_folder(bad))
    index["weight_map"]["model.norm.weight"] = "pytorch_model-00001-of-00002.bin"
    (bad / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="does not match"):
        list(read_sharded_folder(bad))
    with pytest.raises(ModelNotFoundError):
        list(read_sharded_folder(tmp_path / "empty"))


# ---- the delta ----


def test_read_delta(release):
    vicuna, fab = release
    delta = read_delta(fab.folder)
    assert delta.dtype == torch.float16
    assert delta.vocab_size == vicuna.vocab_size + 38 and delta.hidden_size == vicuna.hidden
    assert delta.lora_rank == 4 and sorted(delta.lora) == [0, 1]
    assert delta.lora_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    a, b = delta.lora[1]["self_attn.v_proj"]
    assert a.shape == (4, vicuna.hidden) and b.shape == (vicuna.hidden, 4)
    assert torch.equal(
        b, fab.state["llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"]
    )
    assert delta.llama_proj_weight.shape == (vicuna.hidden, 32) and delta.llama_proj_bias.shape == (
        vicuna.hidden,
    )
    shapes = {
        m: (c.mode, c.num_input_tokens, c.num_output_tokens, c.out_dim) for m, (c, _) in delta.textfc.items()
    }
    assert shapes == {
        "image": ("transformer", 4, 77, 48),
        "video": ("transformer", 24, 77, 40),
        "audio": ("transformer", 8, 1, 24),
    }
    cfg = delta.textfc["image"][0]
    assert (
        cfg.hidden_dim,
        cfg.num_heads,
        cfg.num_encoder_layers,
        cfg.num_decoder_layers,
        cfg.dim_feedforward,
    ) == (
        32,
        4,
        2,
        2,
        64,
    )


def test_read_delta_stage_names_and_refusals(tmp_path, release):
    _, fab = release
    state = dict(fab.state)
    # a stage-1/2 checkpoint: no peft wrapper around the LLM, no LoRA
    staged = {k: v for k, v in state.items() if ".lora_" not in k}
    staged["llama_model.model.embed_tokens.weight"] = staged.pop(
        "llama_model.base_model.model.model.embed_tokens.weight"
    )
    staged["llama_model.lm_head.weight"] = staged.pop("llama_model.base_model.model.lm_head.weight")
    torch.save(staged, tmp_path / "staged.pt")
    delta = read_delta(tmp_path / "staged.pt")
    assert delta.lora_rank == 0 and not delta.lora and delta.vocab_size == fab.vocab + 38
    with pytest.raises(ConfigError, match="no LoRA"):
        write_peft_adapter(delta, tmp_path / "adapter", alpha=32)

    torch.save(
        {**state, "visual_encoder.trunk.weight": torch.zeros(1), "extra.bias": torch.zeros(1)},
        tmp_path / "u.pt",
    )
    with pytest.raises(ConfigError) as exc:
        read_delta(tmp_path / "u.pt")
    assert "2 tensors a NExT-GPT delta does not have" in _one_sentence(
        exc
    ) and "visual_encoder.trunk.weight" in str(exc.value)
    torch.save({k: v for k, v in state.items() if not k.startswith("llama_proj")}, tmp_path / "m.pt")
    with pytest.raises(ConfigError, match=r"no llama_proj\.weight, llama_proj\.bias"):
        read_delta(tmp_path / "m.pt")
    half = {
        k: v for k, v in state.items() if not k.endswith("layers.0.self_attn.q_proj.lora_B.default.weight")
    }
    torch.save(half, tmp_path / "h.pt")
    with pytest.raises(ConfigError, match="without its pair"):
        read_delta(tmp_path / "h.pt")
    with pytest.raises(ModelNotFoundError, match="pytorch_model.pt"):
        read_delta(tmp_path / "nowhere")


# ---- TextFcLayer ----


@pytest.mark.parametrize(
    "mode, heads",
    [("transformer", 4), ("linear", 0), ("qformer", 12)],  # NExT-GPT's heads; bert-base's for the Q-Former
)
def test_textfc_matches_independent_reference(tmp_path, release, mode, heads):
    vicuna, _ = release
    if mode == "transformer":
        fab = release[1]
    else:
        fab = make_delta(
            tmp_path / mode, vicuna.folder, textfc_mode=mode, textfc_hidden=48, textfc_ff=96, seed=1
        )
    delta = read_delta(fab.folder)  # the head count by mode
    g = torch.Generator().manual_seed(0)
    for modality, (cfg, state) in delta.textfc.items():
        assert cfg.mode == mode and cfg.num_heads == heads
        module = build_textfc(cfg, {k: v.float() for k, v in state.items()})
        x = torch.randn(3, cfg.num_input_tokens, cfg.in_dim, generator=g)
        e = torch.randn(3, cfg.num_input_tokens, cfg.in_dim, generator=g)
        with torch.no_grad():
            y = module(x, e)
        ref = reference_textfc(state, x, e, heads, num_output_tokens=cfg.num_output_tokens)
        rows = cfg.num_output_tokens if mode != "linear" else min(cfg.num_input_tokens, cfg.num_output_tokens)
        assert y.shape == (3, rows, cfg.out_dim), modality
        assert ref.abs().max() > 0.5  # not a degenerate output
        torch.testing.assert_close(y.double(), ref, atol=2e-5, rtol=1e-5)


def test_textfc_keys_are_nextgpt_names(release):
    _, fab = release
    prefix = "gen_text_hidden_fcs_video.0."
    state = {k.removeprefix(prefix): v for k, v in fab.state.items() if k.startswith(prefix)}
    cfg = textfc_config_from_state(state, num_input_tokens=24)
    from omniforge.model.textfc import TextFcLayer

    assert list(TextFcLayer(cfg).state_dict()) == list(state)  # same names, same order
    with pytest.raises(ConfigError, match="num_output_tokens"):
        textfc_config_from_state({"model.weight": torch.zeros(3, 2), "model.bias": torch.zeros(3)})
    with pytest.raises(ConfigError, match="not a NExT-GPT TextFcLayer"):
        textfc_config_from_state({"proj.weight": torch.zeros(3, 2)})
    with pytest.raises(ConfigError, match="not divisible"):
        TextFcConfig("transformer", 8, 8, 4, 77, hidden_dim=30, num_heads=4)
    with pytest.raises(ConfigError, match="mode"):
        TextFcConfig("mlp", 8, 8, 4, 77)


@pytest.mark.parametrize("mode", ["transformer", "qformer"])
def test_textfc_save_load_and_onnx_export(tmp_path, release, mode):
    import onnx
    import onnxruntime as ort

    vicuna, fab = release
    if mode == "qformer":
        fab = make_delta(
            tmp_path / "q", vicuna.folder, textfc_mode=mode, textfc_hidden=48, textfc_ff=96, seed=2
        )
    cfg, state = read_delta(fab.folder).textfc["image"]
    save_textfc({k: v.float() for k, v in state.items()}, cfg, tmp_path / "fc")
    saved = json.loads((tmp_path / "fc" / "config.json").read_text())
    assert saved["kind"] == "textfc" and saved["mode"] == mode
    assert sorted(p.name for p in (tmp_path / "fc").iterdir()) == ["config.json", "model.safetensors"]
    module = load_textfc(tmp_path / "fc")
    assert {p.dtype for p in module.parameters()} == {torch.float32}

    x, e = torch.randn(2, cfg.num_input_tokens, cfg.in_dim), torch.randn(2, cfg.num_input_tokens, cfg.in_dim)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # as omniforge's exporter does for nn.Transformer
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (x, e),
                str(tmp_path / "fc.onnx"),
                input_names=["hidden_states", "signal_embeds"],
                output_names=["conditioning"],
                dynamic_axes={n: {0: "batch"} for n in ("hidden_states", "signal_embeds", "conditioning")},
                opset_version=17,
                dynamo=False,
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    model = onnx.load(str(tmp_path / "fc.onnx"))
    assert [i.name for i in model.graph.input] == ["hidden_states", "signal_embeds"]
    session = ort.InferenceSession(str(tmp_path / "fc.onnx"), providers=["CPUExecutionProvider"])
    x5, e5 = (
        torch.randn(5, cfg.num_input_tokens, cfg.in_dim),
        torch.randn(5, cfg.num_input_tokens, cfg.in_dim),
    )
    (y,) = session.run(None, {"hidden_states": x5.numpy(), "signal_embeds": e5.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(y, module(x5, e5).numpy(), atol=1e-5, rtol=1e-5)


def test_load_textfc_refusals(tmp_path, release):
    _, fab = release
    cfg, state = read_delta(fab.folder).textfc["audio"]
    save_textfc(state, cfg, tmp_path / "fc")
    assert load_textfc(tmp_path / "fc").model.weight.dtype == torch.float16  # the stored dtype
    raw = json.loads((tmp_path / "fc" / "config.json").read_text())
    (tmp_path / "fc" / "config.json").write_text(json.dumps({**raw, "kind": "projector"}))
    with pytest.raises(ConfigError, match="kind must be 'textfc'"):
        load_textfc(tmp_path / "fc")
    (tmp_path / "fc" / "config.json").write_text(json.dumps({**raw, "num_decoder_layers": 3}))
    with pytest.raises(ConfigError, match="do not match"):
        load_textfc(tmp_path / "fc")
    fields = {k: v for k, v in raw.items() if k != "kind"}
    with pytest.raises(ConfigError, match="do not match"):
        save_textfc(state, TextFcConfig(**{**fields, "num_output_tokens": 5}), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ModelNotFoundError):
        load_textfc(tmp_path / "missing")


# ---- the LLM: Vicuna's .bin shards as safetensors, the LoRA as a peft adapter ----


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    _, fab = release
    delta = read_delta(fab.folder)
    dst = tmp_path_factory.mktemp("llm") / "llm"
    report = convert_llama_folder(fab.folder.parent / "vicuna", dst, delta.embed_tokens, delta.lm_head)
    return delta, dst, report


def test_convert_llama_folder(release, converted, monkeypatch, tmp_path):
    from transformers import LlamaForCausalLM

    vicuna, _ = release
    delta, dst, report = converted
    n_params = sum(v.numel() for k, v in vicuna.state.items() if "inv_freq" not in k) + 2 * 38 * vicuna.hidden
    assert report["parameters"] == n_params and report["dtype"] == "float16" and report["shards"] == 2
    assert report["vocab_size"] == vicuna.vocab_size + 38 and report["dropped_buffers"] == vicuna.layers
    assert sorted(p.name for p in dst.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    converted_state = {k: v for _, shard in read_sharded_folder(dst) for k, v in shard.items()}
    assert converted_state.keys() == {k for k in vicuna.state if "inv_freq" not in k}
    assert all(v.dtype == torch.float16 for v in converted_state.values())
    assert torch.equal(converted_state["model.embed_tokens.weight"], delta.embed_tokens)
    config = json.loads((dst / "config.json").read_text())
    assert config["vocab_size"] == vicuna.vocab_size + 38 and config["max_position_embeddings"] == 2048
    assert (
        "max_sequence_length" not in config
        and config["pad_token_id"] is None
        and config["dtype"] == "float16"
    )
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM.from_pretrained(dst, use_safetensors=True, dtype=torch.float32).eval()
        source = LlamaForCausalLM.from_pretrained(
            vicuna.folder, use_safetensors=False, dtype=torch.float32
        ).eval()
    assert model.model.embed_tokens.weight.shape == (vicuna.vocab_size + 38, vicuna.hidden)
    source.resize_token_embeddings(delta.vocab_size)
    with torch.no_grad():
        source.model.embed_tokens.weight.copy_(delta.embed_tokens.float())
        source.lm_head.weight.copy_(delta.lm_head.float())
        ids = torch.tensor([[1, 15, 200, vicuna.vocab_size + 2, vicuna.vocab_size + 37, 40]])
        torch.testing.assert_close(model(ids).logits, source(ids).logits, atol=1e-5, rtol=1e-5)

    # one shard in memory at a time: each shard is written before the next is read
    import safetensors.torch

    import omniforge.importers.llama as llama

    events, real_save, real_read = [], safetensors.torch.save_file, llama.read_sharded_folder

    def reading(folder):
        for name, state in real_read(folder):
            events.append(("read", name))
            yield name, state

    def saving(tensors, path, metadata=None):
        events.append(("save", Path(path).name))
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(llama, "read_sharded_folder", reading)
    monkeypatch.setattr(safetensors.torch, "save_file", saving)
    convert_llama_folder(vicuna.folder, tmp_path / "again")
    assert [e[0] for e in events] == ["read", "save", "read", "save"]
    assert json.loads((tmp_path / "again" / "config.json").read_text())["vocab_size"] == vicuna.vocab_size
    with pytest.raises(ConfigError, match="width"):
        convert_llama_folder(vicuna.folder, tmp_path / "x", embed_tokens=torch.zeros(5, 3))
    with pytest.raises(ConfigError, match="must not be the source"):
        convert_llama_folder(vicuna.folder, vicuna.folder)


def test_peft_adapter_merges_to_w_plus_scaled_ba(converted, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    delta, dst, _ = converted
    config = write_peft_adapter(delta, tmp_path / "adapter", alpha=ALPHA)
    assert config["r"] == 4 and config["lora_alpha"] == ALPHA
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 2 * 4 * 2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = LlamaForCausalLM.from_pretrained(dst, use_safetensors=True, dtype=torch.float32)
        before = {k: v.clone() for k, v in base.state_dict().items()}
        merged = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload()
    after = merged.state_dict()
    scaling = ALPHA / delta.lora_rank
    for layer, modules in delta.lora.items():
        for module, (a, b) in modules.items():
            key = f"model.layers.{layer}.{module}.weight"
            expected = before[key] + scaling * (b.float() @ a.float())
            torch.testing.assert_close(after[key], expected, atol=1e-6, rtol=1e-6)
            assert not torch.allclose(after[key], before[key])
    with pytest.raises(ConfigError, match="leave out"):
        write_peft_adapter(delta, tmp_path / "a2", alpha=32, target_modules=["q_proj"])


# ---- the tokenizer ----


def encode_as_transformers_4_29(sp, added: dict[str, int], text: str) -> list[int]:
    """What 4.29's slow LlamaTokenizer returned (add_bos_token, no legacy flag): the text split at
    added and special tokens; whitespace around an added token given as a string stripped (4.29's
    default), kept around <s> </s> <unk> (AddedToken objects); each other piece ``sp.encode``d."""
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab = {**specials, **added}
    pattern = "|".join(re.escape(t) for t in sorted(vocab, key=len, reverse=True))
    parts = re.split(f"({pattern})", text)
    for i, part in enumerate(parts):
        if part in added:
            if i > 0:
                parts[i - 1] = parts[i - 1].rstrip()
            if i + 1 < len(parts):
                parts[i + 1] = parts[i + 1].lstrip()
    ids = [1]
    for part in parts:
        if part in vocab:
            ids.append(vocab[part])
        elif part:
            ids += sp.encode(part)
    return ids


def test_tokenizer_conversion(release, tmp_path):
    import sentencepiece as spm
    from tokenizers import Tokenizer

    from omniforge.runtime.tokenizer import TextTokenizer

    vicuna, fab = release
    summary = convert_tokenizer(fab.folder, tmp_path / "tok")
    v = vicuna.vocab_size
    assert summary["source"] == "tokenizer.model"
    assert summary["base_vocab_size"] == v and summary["vocab_size"] == v + 38
    assert summary["tags"] == {"<Img>": "{'<Img>'}", "</Img>": "{'</Img>'}"}
    assert summary["tags_as_text"] == ["<Img>", "</Img>"]
    assert summary["added_tokens"] == fab.added_tokens
    assert list(summary["added_tokens"]) == ["{'<Img>'}", "{'</Img>'}", *signal_tokens()]
    assert summary["signal_tokens"]["image"] == {f"[IMG{i}]": v + 2 + i for i in range(4)}
    assert (
        summary["signal_tokens"]["video"]["[VID23]"] == v + 29
        and summary["signal_tokens"]["audio"]["[AUD7]"] == v + 37
    )
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<s>", "</s>", True)

    tok = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_file=str(fab.folder / "tokenizer.model"))
    plain = [
        "A picture of a small red boat resting on a quiet lake at sunrise.",
        "  two  spaces,\nnewline\tand tab ",
        "Ünïcödé ✓ 2024 日本語 — bytes",
        "### Human: Describe this photo\n### Assistant:",
        "",
    ]
    for text in plain:
        assert tok.encode(text).ids == [1, *sp.encode(text)], text
    with_added = [
        "### Human: {'<Img>'} {'</Img>'} What is this?\n### Assistant: [IMG0] [IMG1][IMG2]  [IMG3]",
        "a video:\n[VID0] [VID23] and a sound [AUD0] [AUD7].",
        "end of turn</s> next <s>start",
        "<Img> is not a token here",
    ]
    for text in plain + with_added:
        assert tok.encode(text).ids == encode_as_transformers_4_29(sp, fab.added_tokens, text), text
    assert tok.encode("[IMG0] [IMG1]").ids == [1, v + 2, v + 3]
    # the release's prompts wrote "<Img>": with the set-literal tags that is text, not id v
    assert tok.encode("<Img>").ids == [1, *sp.encode("<Img>")] and v not in tok.encode("<Img>").ids

    runtime = TextTokenizer(tmp_path / "tok" / "tokenizer.json", tmp_path / "tok" / "tokenizer_config.json")
    ids = runtime.encode("Make a picture [IMG0]")
    assert ids[0] == 1 and ids.count(1) == 1 and ids[-1] == v + 2 and runtime.eos_id == 2
    assert (
        runtime.decode(runtime.encode("The sky is orange."), skip_special_tokens=True) == "The sky is orange."
    )

    # tags added as plain strings, and a tokenizer.json source
    plain_tags = make_delta(tmp_path / "plain", vicuna.folder, tags_as_set_literal=False)
    plain_summary = convert_tokenizer(plain_tags.folder, tmp_path / "t2")
    assert (
        plain_summary["tags"] == {"<Img>": "<Img>", "</Img>": "</Img>"}
        and plain_summary["tags_as_text"] == []
    )
    assert Tokenizer.from_file(str(tmp_path / "t2" / "tokenizer.json")).encode("<Img>").ids == [1, v]
    again = convert_tokenizer(tmp_path / "tok", tmp_path / "t3")
    assert again["source"] == "tokenizer.json" and again["added_tokens"] == fab.added_tokens


def test_tokenizer_refusals(release, tmp_path):
    _, fab = release
    bad = tmp_path / "bad"
    shutil.copytree(fab.folder, bad, ignore=shutil.ignore_patterns("pytorch_model.pt"))
    added = dict(fab.added_tokens)
    added["[IMG0]"] += 100
    (bad / "added_tokens.json").write_text(json.dumps(added))
    with pytest.raises(ConfigError, match="next free id"):
        convert_tokenizer(bad, tmp_path / "out")
    (bad / "tokenizer.model").write_bytes(b"\x00\xffnot a model")
    with pytest.raises(ConfigError, match="SentencePiece"):
        convert_tokenizer(bad, tmp_path / "out")
    with pytest.raises(ModelNotFoundError):
        convert_tokenizer(tmp_path / "none", tmp_path / "out")
