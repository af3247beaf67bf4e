"""NExT-GPT's released delta checkpoint (``pytorch_model.pt``), read weights-only and split into parts.

The delta holds what NExT-GPT trained on top of Vicuna and ImageBind (``agent.py``'s ``save_model``
keeps every parameter with ``requires_grad`` plus the projectors): the resized embedding table and
LM head (32000 + 38 added tokens), the LoRA A/B of every ``{q,k,v,o}_proj``, the input projector
``llama_proj`` (ImageBind 1024 -> LLM width) and the three output projectors
``gen_text_hidden_fcs{,_video,_audio}.0``. Stage-1/2 checkpoints, saved before the LLM was wrapped
by peft, name the embedding ``llama_model.model.embed_tokens.weight`` and the head
``llama_model.lm_head.weight``; NExT-GPT renames those on load and so does this reader.

The LoRA alpha is not stored (NExT-GPT's stage-3 config: r 32, alpha 32); ``write_peft_adapter``
takes it as an argument.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omniforge.errors import ConfigError, ModelNotFoundError
from omniforge.importers.weights import load_pickled_weights
from omniforge.model.textfc import TextFcConfig, textfc_config_from_state

DELTA_FILE = "pytorch_model.pt"
EMBED_KEYS = (
    "llama_model.base_model.model.model.embed_tokens.weight",
    "llama_model.model.embed_tokens.weight",
)
HEAD_KEYS = ("llama_model.base_model.model.lm_head.weight", "llama_model.lm_head.weight")
LORA_RE = re.compile(
    r"llama_model\.base_model\.model\.model\.layers\.(\d+)\.((?:self_attn|mlp)\.\w+)\.lora_([AB])(?:\.default)?\.weight"
)
# modality -> NExT-GPT's module list, its signal-token prefix and count, its conditioning length (base.yaml)
TEXTFC = {
    "image": ("gen_text_hidden_fcs", "IMG", 4, 77),
    "video": ("gen_text_hidden_fcs_video", "VID", 24, 77),
    "audio": ("gen_text_hidden_fcs_audio", "AUD", 8, 1),
}
TEXTFC_RE = re.compile(r"(gen_text_hidden_fcs(?:_video|_audio)?)\.(\d+)\.(.+)")
# a buffer (never saved by NExT-GPT, which keeps parameters only) that full state dicts may carry
QFORMER_BUFFER = "Qformer.bert.embeddings.position_ids"


@dataclass
class NextGptDelta:
    embed_tokens: torch.Tensor  # (V + 38, H): the resized input embedding table
    lm_head: torch.Tensor  # (V + 38, H)
    lora: dict[
        int, dict[str, tuple[torch.Tensor, torch.Tensor]]
    ]  # layer -> "self_attn.q_proj" -> (A (r, in), B (out, r))
    lora_rank: int  # 0 when the delta has no LoRA (a stage-1/2 checkpoint)
    llama_proj_weight: torch.Tensor  # (H, 1024): ImageBind embedding -> one LLM input row
    llama_proj_bias: torch.Tensor  # (H,)
    textfc: dict[str, tuple[TextFcConfig, dict[str, torch.Tensor]]] = field(
        default_factory=dict
    )  # "image" / "video" / "audio"
    dtype: torch.dtype = torch.float16  # the embedding table's (the release is fp16 throughout)

    @property
    def vocab_size(self) -> int:
        return self.embed_tokens.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.embed_tokens.shape[1]

    @property
    def lora_modules(self) -> list[str]:
        """The LoRA-adapted projections' names, e.g. ``["q_proj", "k_proj", "v_proj", "o_proj"]``."""
        names = {m.split(".")[-1] for mods in self.lora.values() for m in mods}
        return sorted(names, key=lambda n: ("qkvo".find(n[0]) if n[1:] == "_proj" else 9, n))


def read_delta(path_or_dir: str | Path, num_heads: int | None = None) -> NextGptDelta:
    """NExT-GPT's delta from ``pytorch_model.pt`` (or a folder holding it), read weights-only.

    ``num_heads`` is the output projectors' head count, which the tensors do not hold (default:
    NExT-GPT's 4; 12 for a Q-Former). The signal-token counts come from ``added_tokens.json``
    beside the checkpoint when it is there, else from NExT-GPT's config (4 / 24 / 8).
    """
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / DELTA_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} does not exist: a NExT-GPT delta folder holds {DELTA_FILE}")
    state = load_pickled_weights(path)

    embed = _first(state, EMBED_KEYS)
    head = _first(state, HEAD_KEYS)
    missing = [k for k, v in (("embed_tokens", embed), ("lm_head", head)) if v is None]
    missing += [k for k in ("llama_proj.weight", "llama_proj.bias") if k not in state]
    if missing:
        raise ConfigError(f"{path} is not a NExT-GPT delta: it has no {', '.join(missing)}")
    if embed.shape != head.shape or embed.dim() != 2:
        raise ConfigError(f"{path}: embed_tokens {tuple(embed.shape)} and lm_head {tuple(head.shape)} differ")
    proj_w, proj_b = state["llama_proj.weight"], state["llama_proj.bias"]
    if proj_w.dim() != 2 or proj_w.shape[0] != embed.shape[1] or tuple(proj_b.shape) != (proj_w.shape[0],):
        raise ConfigError(
            f"{path}: llama_proj {tuple(proj_w.shape)} does not map into the LLM width {embed.shape[1]}"
        )

    known = {*EMBED_KEYS, *HEAD_KEYS, "llama_proj.weight", "llama_proj.bias"}
    lora_parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    fc_parts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    unknown = []
    for key, value in state.items():
        if key in known:
            continue
        if m := LORA_RE.fullmatch(key):
            lora_parts.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = value
        elif m := TEXTFC_RE.fullmatch(key):
            if m.group(3) != QFORMER_BUFFER:
                fc_parts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = value
        else:
            unknown.append(key)
    if unknown:
        raise ConfigError(
            f"{path} has {len(unknown)} tensors a NExT-GPT delta does not have (e.g. {', '.join(unknown[:3])})"
        )

    lora, rank = _lora(lora_parts, path)
    signals = _signal_counts(path.parent)
    textfc = {}
    for modality, (name, _, default_n_in, n_out) in TEXTFC.items():
        if name not in fc_parts:
            continue
        # NExT-GPT generates from its last projector ([-1]); the release has one per modality
        fc_state = fc_parts[name][max(fc_parts[name])]
        cfg = textfc_config_from_state(
            fc_state, num_heads, num_input_tokens=signals.get(modality, default_n_in), num_output_tokens=n_out
        )
        textfc[modality] = (cfg, fc_state)
    return NextGptDelta(embed, head, lora, rank, proj_w, proj_b, textfc, embed.dtype)


def _first(state: dict[str, torch.Tensor], keys: tuple[str, ...]) -> torch.Tensor | None:
    return next((state[k] for k in keys if k in state), None)


def _lora(
    parts: dict[tuple[int, str], dict[str, torch.Tensor]], path: Path
) -> tuple[dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]], int]:
    lora: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    ranks = set()
    for (layer, module), ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise ConfigError(f"{path}: layer {layer} {module} has lora_{''.join(ab)} without its pair")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ConfigError(
                f"{path}: layer {layer} {module} LoRA shapes {tuple(a.shape)}, {tuple(b.shape)} do not chain"
            )
        ranks.add(a.shape[0])
        lora.setdefault(layer, {})[module] = (a, b)
    if len(ranks) > 1:
        raise ConfigError(f"{path}: the LoRA layers have different ranks {sorted(ranks)}")
    return lora, ranks.pop() if ranks else 0


def _signal_counts(folder: Path) -> dict[str, int]:
    """Signal tokens per modality from the ``added_tokens.json`` saved beside the delta ({} if absent)."""
    file = folder / "added_tokens.json"
    if not file.is_file():
        return {}
    try:
        added = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{file} is not valid JSON") from None
    if not isinstance(added, dict):
        raise ConfigError(f"{file} is not a JSON object of token -> id")
    counts = {}
    for modality, (_, tag, _, _) in TEXTFC.items():
        n = sum(1 for t in added if re.fullmatch(rf"\[{tag}\d+\]", str(t)))
        if n:
            counts[modality] = n
    return counts


def write_peft_adapter(
    delta: NextGptDelta, folder: str | Path, alpha: float, target_modules: list[str] | None = None
) -> dict:
    """The delta's LoRA as a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)
    for a LlamaForCausalLM whose vocabulary is the resized one. ``alpha`` is not in the checkpoint
    (NExT-GPT's stage 3 used 32 with r 32). Returns the adapter config."""
    from safetensors.torch import save_file

    if not delta.lora:
        raise ConfigError(
            "this NExT-GPT delta has no LoRA weights (a stage-1/2 checkpoint), so there is no adapter to write"
        )
    if not alpha > 0:
        raise ConfigError(f"the LoRA alpha must be positive, got {alpha}")
    present = delta.lora_modules
    targets = list(present if target_modules is None else target_modules)
    if set(present) - set(targets):
        raise ConfigError(
            f"target_modules {targets} leave out {sorted(set(present) - set(targets))}, which the delta adapts"
        )
    tensors = {}
    for layer, modules in delta.lora.items():
        for module, (a, b) in modules.items():
            base = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{base}.lora_A.weight"] = a.contiguous()
            tensors[f"{base}.lora_B.weight"] = b.contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": delta.lora_rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,  # training-only (0.1 in NExT-GPT's stage 3)
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": None,
        "modules_to_save": None,  # the resized embedding and head go into the LLM folder itself
        "init_lora_weights": True,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return config
