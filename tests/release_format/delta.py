"""A small NExT-GPT delta folder as its ``DeepSpeedAgent.save_model`` wrote it, and references.

``make_delta`` writes, beside a ``make_vicuna`` folder's weights:

- ``pytorch_model.pt``: ``torch.save`` of a plain dict of fp16 tensors under NExT-GPT's names, in
  ``named_parameters`` order: ``llama_model.base_model.model.model.embed_tokens.weight`` (resized:
  the Vicuna rows, tuned, + 38), ``...layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.default.weight``,
  ``llama_model.base_model.model.lm_head.weight``, ``llama_proj.{weight,bias}``,
  ``gen_text_hidden_fcs{,_video,_audio}.0.*`` (a ``layers.py`` TextFcLayer built from torch modules);
- the tokenizer as transformers 4.29's slow ``LlamaTokenizer.save_pretrained`` left it:
  ``tokenizer.model``, ``tokenizer_config.json``, ``special_tokens_map.json`` (pad = ``</s>``) and
  ``added_tokens.json`` with the 38 tokens in NExT-GPT's order: the two tags (as the literal strings
  ``{'<Img>'}`` / ``{'</Img>'}`` that ``add_tokens({"<Img>"})`` stored), ``[IMG0..3]``,
  ``[VID0..23]``, ``[AUD0..7]`` from the SentencePiece vocabulary size on;
- ``config.json``: the LLM config (Vicuna's, ``vocab_size`` resized) as 4.29 saved it.

The release has no other config file. ``make_malicious_pickle`` writes a ``.pt`` whose unpickling
runs a shell command. ``reference_textfc`` computes a TextFcLayer from its tensors with functional
ops only (no ``nn`` modules, no omniforge code), following ``layers.py`` / ``qformer.py`` in eval mode.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tests.release_format.vicuna import added_token, vicuna_tokenizer_config

P = "llama_model.base_model.model."
SIGNALS = (
    ("image", "IMG", 4, "gen_text_hidden_fcs"),
    ("video", "VID", 24, "gen_text_hidden_fcs_video"),
    ("audio", "AUD", 8, "gen_text_hidden_fcs_audio"),
)


@dataclass
class DeltaFolder:
    folder: Path
    state: dict[str, torch.Tensor]  # pytorch_model.pt's dict, in its order
    added_tokens: dict[str, int]  # added_tokens.json
    tags: tuple[str, str]  # the literal strings of <Img> and </Img>
    vocab: int  # the Vicuna vocabulary (the added tokens follow it)
    hidden: int
    layers: int
    lora_rank: int


def signal_tokens() -> list[str]:
    return [f"[{tag}{i}]" for _, tag, n, _ in SIGNALS for i in range(n)]


def make_delta(
    folder: str | Path,
    vicuna_folder: str | Path,
    image_out: tuple[int, int] = (77, 48),
    video_out: tuple[int, int] = (77, 40),
    audio_out: tuple[int, int] = (1, 24),
    enc_dim: int = 32,
    lora_rank: int = 4,
    seed: int = 0,
    tags_as_set_literal: bool = True,
    textfc_mode: str = "transformer",
    textfc_hidden: int = 32,
    textfc_heads: int = 4,
    textfc_layers: tuple[int, int] = (2, 2),
    textfc_ff: int = 64,
) -> DeltaFolder:
    """``*_out`` are (conditioning length, width) per modality; the TextFcLayers are NExT-GPT's at
    ``textfc_hidden`` / ``textfc_layers`` / ``textfc_ff`` (the release: 512, (4, 4), 2048)."""
    folder, vicuna_folder = Path(folder), Path(vicuna_folder)
    folder.mkdir(parents=True, exist_ok=True)
    vicuna_config = json.loads((vicuna_folder / "config.json").read_text())
    hidden, layers, vocab = (
        vicuna_config["hidden_size"],
        vicuna_config["num_hidden_layers"],
        vicuna_config["vocab_size"],
    )
    index = json.loads((vicuna_folder / "pytorch_model.bin.index.json").read_text())
    embed_file = vicuna_folder / index["weight_map"]["model.embed_tokens.weight"]
    head_file = vicuna_folder / index["weight_map"]["lm_head.weight"]
    old_embed = torch.load(embed_file, weights_only=True)["model.embed_tokens.weight"].float()
    old_head = torch.load(head_file, weights_only=True)["lm_head.weight"].float()

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    n_added = 2 + sum(n for *_, n, _ in SIGNALS)
    state: dict[str, torch.Tensor] = {}
    # resize_token_embeddings keeps the old rows and draws the new ones; training then moved all of them
    state[P + "model.embed_tokens.weight"] = torch.cat(
        [old_embed + rnd(*old_embed.shape, scale=0.01), rnd(n_added, hidden, scale=0.5)]
    )
    for i in range(layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            key = f"{P}model.layers.{i}.self_attn.{proj}"
            state[f"{key}.lora_A.default.weight"] = rnd(lora_rank, hidden, scale=hidden**-0.5)
            state[f"{key}.lora_B.default.weight"] = rnd(hidden, lora_rank, scale=0.2)
    state[P + "lm_head.weight"] = torch.cat(
        [old_head + rnd(*old_head.shape, scale=0.01), rnd(n_added, hidden, scale=hidden**-0.5)]
    )
    state["llama_proj.weight"] = rnd(hidden, enc_dim, scale=enc_dim**-0.5)
    state["llama_proj.bias"] = rnd(hidden, scale=0.1)
    for (*_, name), (n_out, width) in zip(SIGNALS, (image_out, video_out, audio_out), strict=True):
        fc = _textfc_state(
            textfc_mode, hidden, width, n_out, textfc_hidden, textfc_heads, textfc_layers, textfc_ff
        )
        state.update({f"{name}.0.{k}": v for k, v in fc.items()})
    state = {k: v.detach().half().contiguous() for k, v in state.items()}
    torch.save(state, folder / "pytorch_model.pt")

    tags = ("{'<Img>'}", "{'</Img>'}") if tags_as_set_literal else ("<Img>", "</Img>")
    added = {t: vocab + i for i, t in enumerate([*tags, *signal_tokens()])}
    shutil.copyfile(vicuna_folder / "tokenizer.model", folder / "tokenizer.model")
    (folder / "added_tokens.json").write_text(json.dumps(added, ensure_ascii=False))  # 4.29: no indent
    smap = {
        "bos_token": _plain(added_token("<s>")),
        "eos_token": _plain(added_token("</s>")),
        "pad_token": "</s>",
    }
    smap["unk_token"] = _plain(added_token("<unk>"))
    _write_json(folder / "special_tokens_map.json", smap)
    _write_json(folder / "tokenizer_config.json", vicuna_tokenizer_config())
    llm_config = {**vicuna_config, "vocab_size": vocab + n_added, "transformers_version": "4.29.2"}
    llm_config["_name_or_path"] = "../ckpt/pretrained_ckpt/vicuna_ckpt/7b_v0"
    _write_json(folder / "config.json", llm_config)
    return DeltaFolder(folder, state, added, tags, vocab, hidden, layers, lora_rank)


def _plain(token: dict) -> dict:
    """special_tokens_map.json's AddedToken form (4.29 wrote it without ``__type``)."""
    return {k: v for k, v in token.items() if k != "__type"}


def _textfc_state(
    mode: str,
    in_dim: int,
    out_dim: int,
    n_out: int,
    hidden: int,
    heads: int,
    layers: tuple[int, int],
    ff: int,
) -> dict[str, torch.Tensor]:
    """A TextFcLayer's parameters as ``layers.py`` registers them (named_parameters order)."""
    if mode == "linear":
        return {f"model.{k}": v for k, v in nn.Linear(in_dim, out_dim).named_parameters()}
    if mode == "transformer":
        mods = nn.Module()
        mods.fc = nn.Linear(in_dim, hidden)
        mods.tfm = nn.Transformer(
            batch_first=True, norm_first=True, d_model=hidden, num_encoder_layers=layers[0],
            num_decoder_layers=layers[1], dim_feedforward=ff, dropout=0.0, nhead=heads,
        )  # fmt: skip
        mods.model = nn.Linear(hidden, out_dim)
        mods.query_embs = nn.Parameter(torch.randn(1, n_out, hidden))
        state = dict(mods.named_parameters())
        for k, v in state.items():  # LayerNorms away from (1, 0), so a wrong norm placement shows
            if ".norm" in k:
                v.data += torch.randn_like(v) * 0.2
        return state
    if mode != "qformer":
        raise ValueError(mode)
    # qformer.py's BertLMHeadModel as NExT-GPT keeps it (no word/position embeddings, no cls, no text FFN)
    state = {"fc.weight": torch.randn(hidden, in_dim) * in_dim**-0.5, "fc.bias": torch.randn(hidden) * 0.1}
    b = "Qformer.bert."
    state[b + "embeddings.LayerNorm.weight"] = 1 + torch.randn(hidden) * 0.2
    state[b + "embeddings.LayerNorm.bias"] = torch.randn(hidden) * 0.2
    for i in range(layers[0]):
        p = f"{b}encoder.layer.{i}."
        for att in ("attention", "crossattention"):
            for lin in ("self.query", "self.key", "self.value", "output.dense"):
                state[f"{p}{att}.{lin}.weight"] = torch.randn(hidden, hidden) * hidden**-0.5
                state[f"{p}{att}.{lin}.bias"] = torch.randn(hidden) * 0.1
            state[f"{p}{att}.output.LayerNorm.weight"] = 1 + torch.randn(hidden) * 0.2
            state[f"{p}{att}.output.LayerNorm.bias"] = torch.randn(hidden) * 0.2
        state[p + "intermediate_query.dense.weight"] = torch.randn(ff, hidden) * hidden**-0.5
        state[p + "intermediate_query.dense.bias"] = torch.randn(ff) * 0.1
        state[p + "output_query.dense.weight"] = torch.randn(hidden, ff) * ff**-0.5
        state[p + "output_query.dense.bias"] = torch.randn(hidden) * 0.1
        state[p + "output_query.LayerNorm.weight"] = 1 + torch.randn(hidden) * 0.2
        state[p + "output_query.LayerNorm.bias"] = torch.randn(hidden) * 0.2
    state["query_tokens"] = torch.randn(1, n_out, hidden) * 0.5
    state["model.weight"] = torch.randn(out_dim, hidden) * hidden**-0.5
    state["model.bias"] = torch.randn(out_dim) * 0.1
    return state


class _RunsCode:
    """Unpickling this runs ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def make_malicious_pickle(path: str | Path, marker: str | Path) -> Path:
    """A ``.pt`` that looks like a delta but whose unpickling would create ``marker``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "llama_proj.weight": torch.zeros(4, 2),
        "llama_proj.bias": torch.zeros(4),
        "x": _RunsCode(f"touch '{marker}'"),
    }
    torch.save(payload, path)
    return path


# ---- an independent reference of NExT-GPT's TextFcLayer (eval mode), functional ops only ----


def _ln(x: torch.Tensor, s: dict, p: str, eps: float) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * s[p + ".weight"] + s[p + ".bias"]


def _lin(x: torch.Tensor, s: dict, p: str) -> torch.Tensor:
    return x @ s[p + ".weight"].T + s[p + ".bias"]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    B, T, D = q.shape
    hs = D // heads
    q, k, v = (t.reshape(B, -1, heads, hs).permute(0, 2, 1, 3) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hs), dim=-1)
    return (w @ v).permute(0, 2, 1, 3).reshape(B, T, D)


def _mha(x: torch.Tensor, mem: torch.Tensor, s: dict, p: str, heads: int) -> torch.Tensor:
    wq, wk, wv = s[p + ".in_proj_weight"].chunk(3)
    bq, bk, bv = s[p + ".in_proj_bias"].chunk(3)
    out = _attend(x @ wq.T + bq, mem @ wk.T + bk, mem @ wv.T + bv, heads)
    return _lin(out, s, p + ".out_proj")


def reference_textfc(
    state: dict[str, torch.Tensor],
    x: torch.Tensor,
    input_embs: torch.Tensor,
    heads: int = 4,
    num_output_tokens: int | None = None,
) -> torch.Tensor:
    """NExT-GPT's TextFcLayer on ``x`` (B, n_in, in) and ``input_embs`` from its tensors (prefix
    stripped), in float64. Linear mode follows GILL (NExT-GPT's own forward has no linear branch)."""
    s = {k: v.double() for k, v in state.items()}
    x, e = x.double(), input_embs.double()
    if set(s) == {"model.weight", "model.bias"}:
        return _lin(x, s, "model")[:, :num_output_tokens]
    h = _lin(x + e, s, "fc")
    if "query_embs" in s:  # transformer: nn.Transformer, pre-norm, ReLU, eps 1e-5, final norms
        n_enc = len({k.split(".")[3] for k in s if k.startswith("tfm.encoder.layers.")})
        n_dec = len({k.split(".")[3] for k in s if k.startswith("tfm.decoder.layers.")})
        for i in range(n_enc):
            p = f"tfm.encoder.layers.{i}"
            y = _ln(h, s, p + ".norm1", 1e-5)
            h = h + _mha(y, y, s, p + ".self_attn", heads)
            h = h + _lin(F.relu(_lin(_ln(h, s, p + ".norm2", 1e-5), s, p + ".linear1")), s, p + ".linear2")
        mem = _ln(h, s, "tfm.encoder.norm", 1e-5)
        q = s["query_embs"].expand(x.shape[0], -1, -1)
        for i in range(n_dec):
            p = f"tfm.decoder.layers.{i}"
            y = _ln(q, s, p + ".norm1", 1e-5)
            q = q + _mha(y, y, s, p + ".self_attn", heads)
            q = q + _mha(_ln(q, s, p + ".norm2", 1e-5), mem, s, p + ".multihead_attn", heads)
            q = q + _lin(F.relu(_lin(_ln(q, s, p + ".norm3", 1e-5), s, p + ".linear1")), s, p + ".linear2")
        return _lin(_ln(q, s, "tfm.decoder.norm", 1e-5), s, "model")
    # qformer: BERT post-norm layers over the query tokens, cross-attending to fc(x + e); eps 1e-12
    b = "Qformer.bert."
    q = _ln(s["query_tokens"].expand(x.shape[0], -1, -1), s, b + "embeddings.LayerNorm", 1e-12)
    n_layers = len({k.split(".")[4] for k in s if k.startswith(b + "encoder.layer.")})
    for i in range(n_layers):
        p = f"{b}encoder.layer.{i}."
        for att, mem in (("attention", None), ("crossattention", h)):
            if f"{p}{att}.self.query.weight" not in s:
                continue
            kv = q if mem is None else mem
            a = _attend(
                _lin(q, s, f"{p}{att}.self.query"),
                _lin(kv, s, f"{p}{att}.self.key"),
                _lin(kv, s, f"{p}{att}.self.value"),
                heads,
            )
            q = _ln(_lin(a, s, f"{p}{att}.output.dense") + q, s, f"{p}{att}.output.LayerNorm", 1e-12)
        mid = F.gelu(_lin(q, s, p + "intermediate_query.dense"))
        q = _ln(_lin(mid, s, p + "output_query.dense") + q, s, p + "output_query.LayerNorm", 1e-12)
    return _lin(q, s, "model")


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
