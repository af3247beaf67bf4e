"""NExT-GPT's output projector, ``TextFcLayer`` (``code/model/layers.py``), in its three modes.

Parameter names are NExT-GPT's own, so a ``gen_text_hidden_fcs*.0.`` slice of its delta checkpoint,
with that prefix stripped, loads strictly:

- ``transformer`` (the release, all three modalities): ``fc`` Linear(in -> 512), ``tfm`` an
  ``nn.Transformer`` (d_model 512, 4 heads, 4 + 4 layers, feed-forward 2048, pre-norm, batch-first,
  no dropout), learnable ``query_embs`` (1, n_out, 512), ``model`` Linear(512 -> out);
  ``y = model(tfm(fc(x + e), query_embs))``.
- ``qformer``: ``fc`` Linear(in -> 768), ``Qformer`` the LAVIS BERT (bert-base: 12 heads,
  feed-forward 3072, LayerNorm eps 1e-12, 2 layers, cross-attention in every layer) with its word and
  position embeddings, its LM head and its text feed-forward removed, ``query_tokens``
  (1, n_out, 768), ``model`` Linear(768 -> out); ``y = model(bert(query_tokens, memory=fc(x + e)))``.
- ``linear``: ``model`` Linear(in -> out). NExT-GPT's own forward never handles this mode (it
  reaches ``outputs.shape`` with ``outputs = None``); this follows GILL's ``TextFcLayer``, which
  NExT-GPT's is copied from: ``y = model(x)[:, :n_out]``. The signal embeddings are not used, so
  its ONNX graph has the one input ``hidden_states``.

Head counts are not in the tensors: 4 for ``transformer`` (NExT-GPT's), 12 for ``qformer``
(bert-base-uncased's). Saved as ``config.json`` + ``model.safetensors``; loaded from safetensors only.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from omniforge.errors import ConfigError, ModelNotFoundError

MODES = ("linear", "transformer", "qformer")
DEFAULT_HEADS = {"linear": 0, "transformer": 4, "qformer": 12}


@dataclass(frozen=True)
class TextFcConfig:
    mode: str  # "linear" | "transformer" | "qformer"
    in_dim: int  # LLM hidden size (4096 for Vicuna-7B)
    out_dim: int  # decoder conditioning width: 768 SD, 1024 ZeroScope, 512 AudioLDM
    num_input_tokens: int  # signal tokens: 4 [IMG], 24 [VID], 8 [AUD]; not in the tensors, 0 when unknown
    num_output_tokens: int  # conditioning length: 77 SD / ZeroScope, 1 AudioLDM
    hidden_dim: int = 512  # transformer: d_model (512); qformer: BERT width (768); linear: unused
    num_heads: int = 4  # not in the tensors: 4 transformer, 12 qformer
    num_encoder_layers: int = 4  # transformer: encoder layers; qformer: BERT layers (2)
    num_decoder_layers: int = 4  # transformer only
    dim_feedforward: int = 2048  # transformer: 4 * 512; qformer: BERT intermediate (3072)
    layer_norm_eps: float = 1e-5  # nn.Transformer's 1e-5; BERT's 1e-12
    cross_attention_freq: int = 1  # qformer: layer i cross-attends when i % freq == 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"TextFcLayer mode {self.mode!r} is not one of {', '.join(MODES)}")
        if min(self.in_dim, self.out_dim, self.num_output_tokens) < 1 or self.num_input_tokens < 0:
            raise ConfigError(f"TextFcLayer sizes must be positive, got {self}")
        if self.mode != "linear":
            if self.num_heads < 1 or self.hidden_dim % self.num_heads:
                raise ConfigError(
                    f"TextFcLayer width {self.hidden_dim} is not divisible by {self.num_heads} heads"
                )
            if self.num_encoder_layers < 1 or self.dim_feedforward < 1:
                raise ConfigError(
                    f"TextFcLayer needs at least one layer and a feed-forward width, got {self}"
                )
        if self.mode == "transformer" and self.num_decoder_layers < 1:
            raise ConfigError("a transformer-mode TextFcLayer needs at least one decoder layer")
        if self.mode == "qformer" and self.cross_attention_freq < 1:
            raise ConfigError("a qformer-mode TextFcLayer needs cross_attention_freq >= 1")


class TextFcLayer(nn.Module):
    """Signal-token hidden states (+ their input embeddings) -> a diffusion decoder's conditioning."""

    def __init__(self, cfg: TextFcConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.mode == "linear":
            self.model = nn.Linear(cfg.in_dim, cfg.out_dim)
        elif cfg.mode == "transformer":
            d = cfg.hidden_dim
            layer = dict(d_model=d, nhead=cfg.num_heads, dim_feedforward=cfg.dim_feedforward, dropout=0.0)
            layer.update(layer_norm_eps=cfg.layer_norm_eps, batch_first=True, norm_first=True)
            # built as nn.Transformer builds them; nested tensors off (pre-norm cannot use them anyway)
            encoder = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(**layer),
                cfg.num_encoder_layers,
                nn.LayerNorm(d, eps=cfg.layer_norm_eps),
                enable_nested_tensor=False,
            )
            decoder = nn.TransformerDecoder(
                nn.TransformerDecoderLayer(**layer),
                cfg.num_decoder_layers,
                nn.LayerNorm(d, eps=cfg.layer_norm_eps),
            )
            self.fc = nn.Linear(cfg.in_dim, d)
            self.tfm = nn.Transformer(
                d_model=d,
                nhead=cfg.num_heads,
                batch_first=True,
                custom_encoder=encoder,
                custom_decoder=decoder,
            )
            self.model = nn.Linear(d, cfg.out_dim)
            self.query_embs = nn.Parameter(torch.randn(1, cfg.num_output_tokens, d))
        else:
            self.fc = nn.Linear(cfg.in_dim, cfg.hidden_dim)
            self.Qformer = _QformerLMHead(cfg)
            self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_output_tokens, cfg.hidden_dim))
            self.model = nn.Linear(cfg.hidden_dim, cfg.out_dim)

    def forward(self, hidden_states: torch.Tensor, signal_embeds: torch.Tensor) -> torch.Tensor:
        # (B, n_in, in_dim), (B, n_in, in_dim) -> (B, n_out, out_dim)
        if self.cfg.mode == "linear":
            return self.model(hidden_states)[:, : self.cfg.num_output_tokens]
        x = self.fc(hidden_states + signal_embeds)  # (B, n_in, d)
        if self.cfg.mode == "transformer":
            queries = self.query_embs.expand(x.shape[0], -1, -1)  # (B, n_out, d)
            return self.model(self.tfm(x, queries))
        queries = self.query_tokens.expand(x.shape[0], -1, -1)  # (B, n_out, d)
        return self.model(self.Qformer.bert(queries, x))


# ---- qformer: the LAVIS BERT of NExT-GPT's qformer.py, only what its TextFcLayer keeps and runs ----


class _Linear(nn.Module):
    """A module holding one ``dense`` Linear (BERT's ``intermediate_query``)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class _DenseNorm(nn.Module):
    """BERT's post-norm output: ``LayerNorm(dense(x) + residual)``."""

    def __init__(self, d_in: int, d: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _QKV(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        hs = d // self.heads
        q = self.query(x).view(B, T, self.heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.key(memory).view(B, -1, self.heads, hs).transpose(1, 2)  # (B, nh, S, hs)
        v = self.value(memory).view(B, -1, self.heads, hs).transpose(1, 2)  # (B, nh, S, hs)
        # the all-ones masks NExT-GPT passes add zeros to the scores: nothing is masked
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hs), dim=-1)  # (B, nh, T, S)
        return (att @ v).transpose(1, 2).reshape(B, T, d)


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int, eps: float) -> None:
        super().__init__()
        self.self = _QKV(d, heads)
        self.output = _DenseNorm(d, d, eps)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, memory), x)


class _BertLayer(nn.Module):
    def __init__(self, cfg: TextFcConfig, cross: bool) -> None:
        super().__init__()
        d, eps = cfg.hidden_dim, cfg.layer_norm_eps
        self.attention = _Attention(d, cfg.num_heads, eps)
        if cross:
            self.crossattention = _Attention(d, cfg.num_heads, eps)
        self.has_cross_attention = cross
        # the text feed-forward (intermediate / output) is set to None by NExT-GPT: queries only
        self.intermediate_query = _Linear(d, cfg.dim_feedforward)
        self.output_query = _DenseNorm(cfg.dim_feedforward, d, eps)

    def forward(self, q: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:  # (B, n_out, d)
        q = self.attention(q, q)
        if self.has_cross_attention:
            q = self.crossattention(q, memory)
        return self.output_query(F.gelu(self.intermediate_query.dense(q)), q)


class _Embeddings(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.LayerNorm = nn.LayerNorm(d, eps=eps)  # word / position embeddings removed by NExT-GPT


class _Encoder(nn.Module):
    def __init__(self, cfg: TextFcConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            _BertLayer(cfg, i % cfg.cross_attention_freq == 0) for i in range(cfg.num_encoder_layers)
        )


class _Bert(nn.Module):
    def __init__(self, cfg: TextFcConfig) -> None:
        super().__init__()
        self.embeddings = _Embeddings(cfg.hidden_dim, cfg.layer_norm_eps)
        self.encoder = _Encoder(cfg)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q = self.embeddings.LayerNorm(queries)  # query_embeds only: no input ids, no positions
        for layer in self.encoder.layer:
            q = layer(q, memory)
        return q  # last_hidden_state


class _QformerLMHead(nn.Module):
    """``BertLMHeadModel`` with ``cls = None``: only ``bert`` holds parameters."""

    def __init__(self, cfg: TextFcConfig) -> None:
        super().__init__()
        self.bert = _Bert(cfg)


# ---- config from a checkpoint's tensors, save / load ----


def _layer_indices(state: dict[str, torch.Tensor], prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := pat.match(k))})


def _shape(state: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise ConfigError(f"the TextFcLayer weights have no {key}")
    return tuple(state[key].shape)


def textfc_config_from_state(
    state: dict[str, torch.Tensor],
    num_heads: int | None = None,
    *,
    num_input_tokens: int = 0,
    num_output_tokens: int | None = None,
) -> TextFcConfig:
    """The config of a TextFcLayer state dict (NExT-GPT's names, prefix stripped): the mode from its
    keys, every size from its shapes. ``num_heads`` defaults to NExT-GPT's (4, or 12 for qformer);
    ``num_output_tokens`` is needed only for ``linear``, whose tensors do not hold it."""
    if any(k.startswith("Qformer.") for k in state) or "query_tokens" in state:
        mode = "qformer"
    elif any(k.startswith("tfm.") for k in state) or "query_embs" in state:
        mode = "transformer"
    elif set(state) == {"model.weight", "model.bias"}:
        mode = "linear"
    else:
        raise ConfigError(
            f"these weights are not a NExT-GPT TextFcLayer (keys {', '.join(sorted(state)[:4])}...)"
        )
    heads = DEFAULT_HEADS[mode] if num_heads is None else num_heads
    out_dim, width = _shape(state, "model.weight")
    if mode == "linear":
        if num_output_tokens is None:
            raise ConfigError(
                "a linear TextFcLayer's output token count is not in its tensors: pass num_output_tokens"
            )
        return TextFcConfig(
            mode, width, out_dim, num_input_tokens, num_output_tokens, hidden_dim=0, num_heads=0
        )
    hidden, in_dim = _shape(state, "fc.weight")
    if mode == "transformer":
        enc = _layer_indices(state, "tfm.encoder.layers.")
        dec = _layer_indices(state, "tfm.decoder.layers.")
        return TextFcConfig(
            mode,
            in_dim,
            out_dim,
            num_input_tokens,
            _shape(state, "query_embs")[1],
            hidden_dim=hidden,
            num_heads=heads,
            num_encoder_layers=len(enc),
            num_decoder_layers=len(dec),
            dim_feedforward=_shape(state, "tfm.encoder.layers.0.linear1.weight")[0],
        )
    prefix = "Qformer.bert.encoder.layer."
    layers = _layer_indices(state, prefix)
    cross = [i for i in layers if f"{prefix}{i}.crossattention.self.key.weight" in state]
    freq = (cross[1] - cross[0]) if len(cross) > 1 else max(len(layers), 1)
    if not cross or cross != [i for i in layers if i % freq == 0]:
        raise ConfigError(
            f"the Q-Former's cross-attention layers {cross} are not every n-th of {len(layers)}"
        )
    memory_width = _shape(state, f"{prefix}{cross[0]}.crossattention.self.key.weight")[1]
    if memory_width != hidden:
        raise ConfigError(
            f"the Q-Former cross-attends to width {memory_width}, not its fc output width {hidden}"
        )
    return TextFcConfig(
        mode,
        in_dim,
        out_dim,
        num_input_tokens,
        _shape(state, "query_tokens")[1],
        hidden_dim=hidden,
        num_heads=heads,
        num_encoder_layers=len(layers),
        num_decoder_layers=0,
        dim_feedforward=_shape(state, f"{prefix}0.intermediate_query.dense.weight")[0],
        layer_norm_eps=1e-12,
        cross_attention_freq=freq,
    )


def build_textfc(cfg: TextFcConfig, state: dict[str, torch.Tensor]) -> TextFcLayer:
    """A TextFcLayer holding ``state`` exactly (strict names and shapes), in the state's dtype, in eval mode."""
    module = TextFcLayer(cfg)
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        module = module.to(dtypes.pop())
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ConfigError(
            f"the TextFcLayer weights do not match its config ({cfg.mode}): missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}"
        )
    module.load_state_dict(state, strict=True)
    return module.eval()


def save_textfc(
    module_or_state: TextFcLayer | dict[str, torch.Tensor], cfg: TextFcConfig, folder: str | Path
) -> None:
    """``config.json`` ({"kind": "textfc", ...}) + ``model.safetensors`` in ``folder``."""
    from safetensors.torch import save_file

    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    build_textfc(cfg, state)  # refuse weights that would not load back
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"kind": "textfc", **asdict(cfg)}, indent=2) + "\n")
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))


def load_textfc(folder: str | Path) -> TextFcLayer:
    """The TextFcLayer saved in ``folder`` by ``save_textfc`` (safetensors only, strict)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise ModelNotFoundError(f"{folder} needs config.json and model.safetensors for a TextFcLayer")
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{folder / 'config.json'} is not valid JSON") from None
    if not isinstance(raw, dict) or raw.get("kind") != "textfc":
        raise ConfigError(f"{folder / 'config.json'} is not a TextFcLayer config (kind must be 'textfc')")
    names = {f.name for f in fields(TextFcConfig)}
    unknown = sorted(set(raw) - names - {"kind"})
    if unknown:
        raise ConfigError(f"{folder / 'config.json'} has unknown fields: {', '.join(unknown)}")
    try:
        cfg = TextFcConfig(**{k: v for k, v in raw.items() if k != "kind"})
    except TypeError as exc:
        raise ConfigError(f"{folder / 'config.json'} is not a valid TextFcConfig ({exc})") from None
    try:
        state = load_file(str(folder / "model.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(
            f"{folder / 'model.safetensors'} is not a readable safetensors file ({exc})"
        ) from None
    return build_textfc(cfg, state)
