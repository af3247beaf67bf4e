"""A small Vicuna-7B v0 look-alike, in the format NExT-GPT's ``prepare_vicuna.md`` leaves it.

``make_vicuna`` writes what FastChat's ``apply_delta`` (transformers 4.28.dev) saved: two pickled
``pytorch_model-0000N-of-00002.bin`` shards of fp16 tensors under LLaMA's 4.28 names (with the
``rotary_emb.inv_freq`` buffers that version still saved) and their ``pytorch_model.bin.index.json``,
the 4.28.dev ``config.json`` (``max_sequence_length``, ``torch_dtype``, BOS/EOS ids 0/1,
``pad_token_id: -1``) and ``generation_config.json``, and a slow-tokenizer folder: a SentencePiece
``tokenizer.model`` trained like LLaMA's (BPE, byte fallback, digits split, identity normalisation,
dummy prefix, unk 0 / bos 1 / eos 2) on ``omniforge/data/corpus.txt``, with
``tokenizer_config.json`` and ``special_tokens_map.json`` holding AddedToken dicts.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

SHARDS = ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin")


def added_token(content: str) -> dict:
    """How transformers 4.28/4.29 wrote an ``AddedToken`` into tokenizer json files."""
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


@dataclass
class VicunaFolder:
    folder: Path
    config: dict  # config.json as written (4.28.dev)
    state: dict[str, torch.Tensor]  # every tensor written, fp16, under the saved names
    vocab_size: int  # SentencePiece pieces (LLaMA: 32000)
    hidden: int
    layers: int
    heads: int


def train_sentencepiece(vocab_size: int = 480) -> bytes:
    """A SentencePiece model trained with LLaMA's trainer settings on the shipped corpus."""
    import sentencepiece as spm

    lines = resources.files("omniforge").joinpath("data/corpus.txt").read_text().splitlines()
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        max_sentencepiece_length=16,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return out.getvalue()


def make_vicuna(
    folder: str | Path,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 172,
    vocab_size: int = 480,
    seed: int = 0,
) -> VicunaFolder:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sp_model = train_sentencepiece(vocab_size)
    (folder / "tokenizer.model").write_bytes(sp_model)
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_proto=sp_model).get_piece_size()

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).half()

    head_size = hidden // heads
    inv_freq = (1.0 / 10000 ** (torch.arange(0, head_size, 2).float() / head_size)).half()
    state: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rnd(vocab, hidden, scale=0.5)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[p + f"self_attn.{proj}.weight"] = rnd(hidden, hidden, scale=hidden**-0.5)
        state[p + "self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
        state[p + "mlp.gate_proj.weight"] = rnd(intermediate, hidden, scale=hidden**-0.5)
        state[p + "mlp.down_proj.weight"] = rnd(hidden, intermediate, scale=intermediate**-0.5)
        state[p + "mlp.up_proj.weight"] = rnd(intermediate, hidden, scale=hidden**-0.5)
        state[p + "input_layernorm.weight"] = (1 + rnd(hidden, scale=0.1)).half()
        state[p + "post_attention_layernorm.weight"] = (1 + rnd(hidden, scale=0.1)).half()
    state["model.norm.weight"] = (1 + rnd(hidden, scale=0.1)).half()
    state["lm_head.weight"] = rnd(vocab, hidden, scale=hidden**-0.5)

    # shard 1: the embedding and the first layer; shard 2: the rest (as HF's size-based split would)
    first = {
        k: v for k, v in state.items() if k == "model.embed_tokens.weight" or k.startswith("model.layers.0.")
    }
    second = {k: v for k, v in state.items() if k not in first}
    weight_map = {}
    for name, part in zip(SHARDS, (first, second), strict=True):
        torch.save(part, folder / name)
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")

    config = {
        "_name_or_path": "vicuna-7b-v0",
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 0,
        "eos_token_id": 1,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_sequence_length": 2048,
        "model_type": "llama",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "pad_token_id": -1,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.28.0.dev0",
        "use_cache": True,
        "vocab_size": vocab,
    }
    _write_json(folder / "config.json", config)
    _write_json(
        folder / "generation_config.json",
        {
            "_from_model_config": True,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": -1,
            "transformers_version": "4.28.0.dev0",
        },
    )
    _write_json(
        folder / "special_tokens_map.json",
        {
            "bos_token": added_token("<s>"),
            "eos_token": added_token("</s>"),
            "unk_token": added_token("<unk>"),
        },
    )
    _write_json(folder / "tokenizer_config.json", vicuna_tokenizer_config())
    return VicunaFolder(folder, config, state, vocab, hidden, layers, heads)


def vicuna_tokenizer_config() -> dict:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added_token("<s>"),
        "clean_up_tokenization_spaces": False,
        "eos_token": added_token("</s>"),
        "model_max_length": 2048,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": added_token("<unk>"),
    }


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
