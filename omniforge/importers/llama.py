"""A Vicuna / LLaMA HF folder (pickled ``.bin`` shards or safetensors) rewritten as safetensors.

Vicuna-7B v0, as NExT-GPT's instructions build it, is two ``pytorch_model-*.bin`` shards saved by
transformers 4.28: pickles, read here weights-only, one shard at a time. Its config predates
transformers 5 (``max_sequence_length``, ``torch_dtype``, ``pad_token_id: -1``); what transformers 5
needs is fixed and reported. The embedding table and LM head can be replaced by the NExT-GPT delta's
resized ones (32000 + 38 rows), with ``vocab_size`` updated to match.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from omniforge.errors import ConfigError, ModelNotFoundError
from omniforge.importers.weights import INDEX_FILES, read_sharded_folder

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
# transformers <= 4.30 saved RoPE's inverse frequencies as a buffer; they are recomputed from the config
ROTARY_BUFFER = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def convert_llama_folder(
    src: str | Path,
    dst: str | Path,
    embed_tokens: torch.Tensor | None = None,
    lm_head: torch.Tensor | None = None,
) -> dict:
    """Rewrite the LLaMA folder ``src`` as safetensors shards in ``dst`` (dtype kept, one shard in
    memory at a time), optionally with a resized embedding and head. ``config.json`` and
    ``generation_config.json`` are copied, fixed for transformers 5; tokenizer files are not (see
    ``convert_tokenizer``). Returns the parameter count, dtype, vocabulary size, shard count and the
    config fixes made."""
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise ModelNotFoundError(f"{src} is not an HF model folder (no config.json)")
    if dst.resolve() == src.resolve():
        raise ConfigError(f"the converted folder must not be the source folder {src}")
    config = _read_json(src / "config.json")
    if config.get("model_type") != "llama":
        raise ConfigError(
            f"{src} holds a {config.get('model_type')!r} model, not a LLaMA (model_type 'llama')"
        )
    hidden = config.get("hidden_size")
    for name, t in (("embed_tokens", embed_tokens), ("lm_head", lm_head)):
        if t is not None and (t.dim() != 2 or t.shape[1] != hidden):
            raise ConfigError(
                f"the replacement {name} {tuple(t.shape)} does not have the model's width {hidden}"
            )
    if embed_tokens is not None and lm_head is not None and embed_tokens.shape != lm_head.shape:
        raise ConfigError(
            f"the replacement embed_tokens {tuple(embed_tokens.shape)} and lm_head {tuple(lm_head.shape)} differ"
        )
    replace = {k: v for k, v in ((EMBED, embed_tokens), (HEAD, lm_head)) if v is not None}

    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    shards = list(_shard_names(src))
    weight_map: dict[str, str] = {}
    seen, params, total_bytes, dropped = set(), 0, 0, 0
    dtypes: set[torch.dtype] = set()
    for n, (_, state) in enumerate(read_sharded_folder(src), start=1):
        out = {}
        for key, value in state.items():
            if ROTARY_BUFFER.fullmatch(key):
                dropped += 1
                continue
            if key in replace:
                value = replace[key].to(value.dtype)  # the source's dtype is kept
                seen.add(key)
            out[key] = value.contiguous()
        name = "model.safetensors" if len(shards) == 1 else f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(out, str(dst / name), metadata={"format": "pt"})
        for key, value in out.items():
            weight_map[key] = name
            params += value.numel()
            total_bytes += value.numel() * value.element_size()
            dtypes.add(value.dtype)
        del state, out
    absent = sorted(set(replace) - seen)
    if absent:
        raise ConfigError(f"{src} has no {', '.join(absent)} to replace")
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    vocab = embed_tokens.shape[0] if embed_tokens is not None else config.get("vocab_size")
    dtype_name = str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "mixed"
    fixes = _fix_config(config, vocab, dtype_name, untie=lm_head is not None)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (src / "generation_config.json").is_file():
        generation = _read_json(src / "generation_config.json")
        fixes += [f"generation_config: {f}" for f in _fix_special_ids(generation, config)]
        (dst / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return {
        "parameters": params,
        "dtype": dtype_name,
        "vocab_size": vocab,
        "shards": len(shards),
        "dropped_buffers": dropped,
        "config_fixes": fixes,
    }


def _shard_names(src: Path) -> list[str]:
    """The shard files the conversion will write, one per source shard."""
    for index in INDEX_FILES:
        if (src / index).is_file():
            weight_map = _read_json(src / index).get("weight_map", {})
            return list(dict.fromkeys(weight_map.values())) if isinstance(weight_map, dict) else []
    return ["model.safetensors"]


def _fix_config(config: dict, vocab: int, dtype: str, untie: bool) -> list[str]:
    """Bring a transformers 4.28-era LLaMA config up to what transformers 5 reads; returns what changed."""
    fixes = []
    if config.get("vocab_size") != vocab:
        fixes.append(f"vocab_size {config.get('vocab_size')} -> {vocab}")
        config["vocab_size"] = vocab
    if "max_sequence_length" in config:  # the 4.28.dev conversion's name
        if "max_position_embeddings" not in config:
            config["max_position_embeddings"] = config["max_sequence_length"]
            fixes.append(
                f"max_sequence_length -> max_position_embeddings {config['max_position_embeddings']}"
            )
        del config["max_sequence_length"]
    if "torch_dtype" in config:
        config.setdefault("dtype", config.pop("torch_dtype"))
        fixes.append("torch_dtype -> dtype")
    if dtype != "mixed" and config.get("dtype") != dtype:
        fixes.append(f"dtype {config.get('dtype')} -> {dtype}")
        config["dtype"] = dtype
    if untie and config.get("tie_word_embeddings"):
        config["tie_word_embeddings"] = False
        fixes.append("tie_word_embeddings -> false (the head is replaced on its own)")
    fixes += _fix_special_ids(config, config)
    return fixes


def _fix_special_ids(target: dict, config: dict) -> list[str]:
    """Drop special-token ids outside the vocabulary (4.28.dev's ``pad_token_id: -1``) and the
    transposed BOS/EOS of that conversion (0 / 1, where LLaMA's SentencePiece model has 1 / 2)."""
    fixes = []
    vocab = config.get("vocab_size") or 0
    if target.get("bos_token_id") == 0 and target.get("eos_token_id") == 1:
        target["bos_token_id"], target["eos_token_id"] = 1, 2
        fixes.append("bos/eos_token_id 0/1 -> 1/2 (LLaMA's <s> and </s>)")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = target.get(key)
        if isinstance(value, int) and not 0 <= value < vocab:
            target[key] = None
            fixes.append(f"{key} {value} -> null (outside the vocabulary)")
    return fixes


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{path} is not valid JSON") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return value
