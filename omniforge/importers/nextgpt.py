"""``omniforge import nextgpt``: NExT-GPT's released checkpoints -> an omniforge model folder.

Inputs are local paths to what NExT-GPT's instructions have a user download: a Vicuna folder,
``imagebind_huge.pth``, NExT-GPT's delta checkpoint (``pytorch_model.pt`` with the tokenizer saved
beside it) and the diffusers folders of the decoders. Every pickle is opened once, with torch's
weights-only loader, and written as safetensors; the folder is written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from omniforge.errors import ConfigError, ModelNotFoundError
from omniforge.pipeline.atomic import atomic_folder
from omniforge.pipeline.model_config import FORMAT, FORMAT_VERSION
from omniforge.pipeline.protocol import PromptProtocol

MODALITIES = ("image", "video", "audio")
SIGNAL_PREFIX = {"image": "IMG", "video": "VID", "audio": "AUD"}
LORA_ALPHA = 32.0  # NExT-GPT's stage-3 config (r 32, alpha 32); the checkpoint does not store it
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class ImportOptions:
    vicuna: Path
    imagebind: Path
    delta: Path
    out: Path
    decoders: dict[str, Path] = field(default_factory=dict)  # modality -> diffusers folder
    lora_alpha: float = LORA_ALPHA
    merge_lora: bool = True
    max_context: int = 512  # NExT-GPT's max_length; the KV pool is sized by it
    vision_heads: int = 16  # ImageBind-huge; not inferable from the checkpoint
    audio_heads: int = 12
    projector_heads: int | None = None  # None: 4 for TextFcLayer's nn.Transformer, 12 for its Q-Former
    copy_decoders: bool = False  # False: nextgpt.json names the decoder folders where they lie


@dataclass
class ImportSummary:
    parts: list[tuple[str, str, int, str]] = field(default_factory=list)  # (part, kind, params, dtype)
    added_tokens: dict[str, int] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        rows = ["| part | kind | parameters | dtype |", "|---|---|---:|---|"]
        rows += [f"| {p} | {k} | {n:,} | {d} |" for p, k, n, d in self.parts]
        return "\n".join(rows)


def import_nextgpt(opts: ImportOptions, log: Callable[[str], None] = print) -> ImportSummary:
    """Write the omniforge model folder ``opts.out`` from NExT-GPT's release files."""
    _check_inputs(opts)
    out = Path(opts.out)
    if out.exists() and not (out / "nextgpt.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"'{out}' exists and is not a model folder; refusing to replace it")
    summary = ImportSummary()
    with atomic_folder(out) as tmp:
        _import_into(opts, tmp, summary, log)
    return summary


def _check_inputs(opts: ImportOptions) -> None:
    for name, path, want_dir in (
        ("--vicuna", opts.vicuna, True),
        ("--imagebind", opts.imagebind, False),
        ("--delta", opts.delta, None),
    ):
        p = Path(path)
        if not p.exists():
            raise ModelNotFoundError(f"{name} '{p}' does not exist")
        if want_dir is True and not p.is_dir():
            raise ModelNotFoundError(f"{name} '{p}' must be a folder (an HF LLaMA/Vicuna folder)")
        if want_dir is False and not p.is_file():
            raise ModelNotFoundError(f"{name} '{p}' must be a file (imagebind_huge.pth)")
    for m, folder in opts.decoders.items():
        if m not in MODALITIES:
            raise ConfigError(f"unknown decoder modality '{m}' (choose from {', '.join(MODALITIES)})")
        if not Path(folder).is_dir() or not (Path(folder) / "unet" / "config.json").is_file():
            raise ModelNotFoundError(f"--{m}-decoder '{folder}' is not a diffusers folder with unet/")
    if not 16 <= opts.max_context <= 1 << 16:
        raise ConfigError(f"--max-context must lie in [16, 65536], got {opts.max_context}")
    if not 0 < opts.lora_alpha <= 1e4:
        raise ConfigError(f"--lora-alpha must lie in (0, 10000], got {opts.lora_alpha}")


def _dtype(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


def _params(state: dict[str, torch.Tensor]) -> tuple[int, str]:
    dtypes = sorted({_dtype(t.dtype) for t in state.values()})
    return sum(t.numel() for t in state.values()), "/".join(dtypes)


def _import_into(opts: ImportOptions, root: Path, summary: ImportSummary, log: Callable[[str], None]) -> None:
    from omniforge.importers.delta import read_delta, write_peft_adapter
    from omniforge.importers.llama import convert_llama_folder
    from omniforge.importers.tokenizer import convert_tokenizer

    log("reading the delta checkpoint")
    delta = read_delta(opts.delta, num_heads=opts.projector_heads)
    delta_dir = Path(opts.delta) if Path(opts.delta).is_dir() else Path(opts.delta).parent

    log("converting ImageBind (vision and audio trunks)")
    enc_dim = _import_imagebind(opts, root / "imagebind", summary)

    log("converting the tokenizer saved beside the delta")
    tok = convert_tokenizer(delta_dir, root / "llm")
    added = dict(tok["added_tokens"])
    summary.added_tokens = added
    summary.tags = dict(tok.get("tags", {}))
    if delta.embed_tokens.shape[0] != tok["vocab_size"]:
        raise ConfigError(
            f"the delta's embedding has {delta.embed_tokens.shape[0]} rows but its tokenizer has "
            f"{tok['vocab_size']} tokens"
        )

    log("converting the LLM (shard by shard) with the delta's resized embeddings")
    llm = convert_llama_folder(
        opts.vicuna, root / "llm", embed_tokens=delta.embed_tokens, lm_head=delta.lm_head
    )
    summary.parts.append(("llm", "LlamaForCausalLM", int(llm["parameters"]), str(llm["dtype"])))
    _limit_context(root / "llm", opts.max_context)

    write_peft_adapter(delta, root / "lora" / "nextgpt", alpha=opts.lora_alpha, target_modules=LORA_TARGETS)
    lora_params = sum(a.numel() + b.numel() for mods in delta.lora.values() for a, b in mods.values())
    summary.parts.append(
        (
            "lora/nextgpt",
            f"LoRA r={delta.lora_rank} alpha={opts.lora_alpha:g}",
            lora_params,
            _dtype(delta.dtype),
        )
    )

    from omniforge.model.projectors import InputProjector, InputProjectorConfig, save_module

    w, b = delta.llama_proj_weight, delta.llama_proj_bias
    if w.shape[1] != enc_dim:
        raise ConfigError(f"the delta's llama_proj takes {w.shape[1]} features but ImageBind gives {enc_dim}")
    proj = InputProjector(InputProjectorConfig(in_dim=int(w.shape[1]), out_dim=int(w.shape[0])))
    proj.load_state_dict({"proj.weight": w.float(), "proj.bias": b.float()})
    save_module(proj, root / "input_projector")
    summary.parts.append(
        ("input_projector", "Linear (llama_proj)", w.numel() + b.numel(), _dtype(delta.dtype))
    )

    signal = _signal_tokens(added)
    output_projectors, decoders, uncond = {}, {}, {}
    for m in MODALITIES:
        if m not in opts.decoders:
            if m in delta.textfc:
                summary.notes.append(f"no {m} decoder given: the model cannot produce {m}")
            continue
        if m not in delta.textfc:
            raise ConfigError(
                f"the delta checkpoint has no {m} output projector, but a {m} decoder was given"
            )
        cfg, state = delta.textfc[m]
        _check_projector(m, cfg, len(signal.get(m, [])), Path(opts.decoders[m]))
        from omniforge.model.textfc import save_textfc

        save_textfc(state, cfg, root / "output_projectors" / m)
        n, dt = _params(state)
        summary.parts.append((f"output_projectors/{m}", f"TextFcLayer {cfg.mode}", n, dt))
        output_projectors[m] = f"output_projectors/{m}"
        decoders[m] = _decoder(m, Path(opts.decoders[m]), root, opts.copy_decoders, summary)
        emb = _empty_prompt_embedding(m, Path(opts.decoders[m]), cfg.num_output_tokens * cfg.out_dim)
        if emb is None:
            summary.notes.append(
                f"{m}: no text encoder beside the decoder, so guidance uses a zero embedding"
            )
        else:
            (root / "uncond").mkdir(exist_ok=True)
            np.save(root / "uncond" / f"{m}.npy", emb)
            uncond[m] = f"uncond/{m}.npy"

    desc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "llm": "llm",
        "max_context": opts.max_context,
        "adapters": {"nextgpt": "lora/nextgpt"},
        "encoders": {"image": "imagebind", "audio": "imagebind"},
        "input_projector": "input_projector",
        "output_projectors": output_projectors,
        "decoders": decoders,
        "signal_tokens": signal,
        "placeholders": {},
        "protocol": PromptProtocol().to_dict(),
        "uncond": uncond,
    }
    if opts.merge_lora:
        desc["merge_adapter"] = "nextgpt"
    else:  # switched at run time: NExT-GPT's one adapter serves every request
        desc["adapter_auto"] = {"text": "nextgpt"}
    (root / "nextgpt.json").write_text(json.dumps(desc, indent=2) + "\n")


def _limit_context(llm: Path, max_context: int) -> None:
    cfg = json.loads((llm / "config.json").read_text())
    if max_context > int(cfg.get("max_position_embeddings", max_context)):
        raise ConfigError(
            f"--max-context {max_context} exceeds the LLM's max_position_embeddings "
            f"{cfg['max_position_embeddings']}"
        )


def _import_imagebind(opts: ImportOptions, folder: Path, summary: ImportSummary) -> int:
    from omniforge.importers.weights import read_weights
    from omniforge.model.imagebind import config_from_state, encoder_state, save_imagebind

    state = read_weights(opts.imagebind)
    cfg = config_from_state(state, vision_heads=opts.vision_heads, audio_heads=opts.audio_heads)
    kept = encoder_state(state)
    save_imagebind(kept, cfg, folder)
    for part in ("vision", "audio"):
        sub = {k: v for k, v in kept.items() if f".{part}." in k}
        n, dt = _params(sub)
        summary.parts.append((f"imagebind/{part}", "ImageBind trunk + head", n, dt))
    return int(cfg.embed_dim)


def _signal_tokens(added: dict[str, int]) -> dict[str, list[str]]:
    """[IMG0..], [VID0..], [AUD0..] among the tokenizer's added tokens, in index order."""
    out: dict[str, list[str]] = {}
    for m, prefix in SIGNAL_PREFIX.items():
        toks, i = [], 0
        while f"[{prefix}{i}]" in added:
            toks.append(f"[{prefix}{i}]")
            i += 1
        if toks:
            out[m] = toks
    return out


def _check_projector(m: str, cfg, n_signal: int, decoder: Path) -> None:
    """The projector's token counts and width against the tokenizer and the decoder it feeds."""
    if cfg.num_input_tokens != n_signal:
        raise ConfigError(
            f"the {m} output projector reads {cfg.num_input_tokens} signal tokens but the tokenizer "
            f"has {n_signal} [{SIGNAL_PREFIX[m]}i] tokens"
        )
    unet = json.loads((decoder / "unet" / "config.json").read_text())
    if m == "audio":
        want = unet.get("projection_class_embeddings_input_dim")
        if cfg.num_output_tokens != 1 or cfg.out_dim != want:
            raise ConfigError(
                f"the audio output projector gives {cfg.num_output_tokens}x{cfg.out_dim} but the AudioLDM "
                f"UNet takes one {want}-wide class embedding"
            )
    else:
        want = unet.get("cross_attention_dim")
        if (cfg.num_output_tokens, cfg.out_dim) != (77, want):
            raise ConfigError(
                f"the {m} output projector gives {cfg.num_output_tokens}x{cfg.out_dim} but the {m} UNet "
                f"cross-attends to 77x{want}"
            )


def _decoder(m: str, src: Path, root: Path, copy: bool, summary: ImportSummary) -> str:
    """The decoder folder nextgpt.json names: where it lies when its weights are safetensors
    (and not ``copy``), else a copy under the model folder with pickled weights converted."""
    parts = ["unet", "vae", *(["vocoder"] if m == "audio" else [])]
    for part in parts:
        if not (src / part / "config.json").is_file():
            raise ModelNotFoundError(f"the {m} decoder '{src}' has no {part}/config.json")
    pickled = [p for p in parts if not any((src / p).glob("*.safetensors"))]
    for part in pickled:
        if not any((src / part).glob("*.bin")):
            raise ModelNotFoundError(f"the {m} decoder's {part}/ holds no weights (.safetensors or .bin)")
    total = 0
    if not pickled and not copy:
        from safetensors import safe_open

        for part in parts:
            for f in sorted((src / part).glob("*.safetensors")):
                with safe_open(str(f), "pt") as sf:
                    total += sum(int(np.prod(sf.get_slice(k).get_shape())) for k in sf.keys())
        summary.parts.append((f"decoders/{m}", _unet_class(src), total, "(in place)"))
        return str(src.resolve())
    from safetensors.torch import save_file

    from omniforge.importers.weights import read_weights

    dst = root / "decoders" / m
    for part in [*parts, "scheduler"]:
        (dst / part).mkdir(parents=True, exist_ok=True)
        for f in (src / part).glob("*.json"):
            (dst / part / f.name).write_bytes(f.read_bytes())
        if part == "scheduler":
            continue
        st = sorted((src / part).glob("*.safetensors"))
        if st:
            for f in st:
                (dst / part / f.name).write_bytes(f.read_bytes())
            continue
        for f in sorted((src / part).glob("*.bin")):
            state = read_weights(f)
            total += sum(t.numel() for t in state.values())
            save_file({k: v.contiguous() for k, v in state.items()}, str(dst / part / _safetensors_name(f)))
    summary.parts.append((f"decoders/{m}", _unet_class(src), total, "converted"))
    return f"decoders/{m}"


def _safetensors_name(f: Path) -> str:
    """The name diffusers / transformers look for: ``diffusion_pytorch_model.safetensors`` for
    ``diffusion_pytorch_model.bin``, ``model.safetensors`` for ``pytorch_model.bin``."""
    stem = f.stem if f.stem.startswith("diffusion_") else f.stem.replace("pytorch_model", "model")
    return f"{stem}.safetensors"


def _unet_class(src: Path) -> str:
    return str(json.loads((src / "unet" / "config.json").read_text()).get("_class_name", "UNet"))


def _empty_prompt_embedding(m: str, src: Path, size: int) -> np.ndarray | None:
    """What NExT-GPT's decoder pipelines use as the unconditional input when it passes
    ``prompt_embeds`` with guidance: the decoder's own text encoder on the empty prompt, padded to
    the conditioning's second dimension (CLIP's last hidden state over 77 tokens for Stable
    Diffusion and ZeroScope; CLAP's L2-normalised text embedding for AudioLDM, whose pipeline pads
    to the embedding width). None when the folder carries no text encoder."""
    enc, tok = src / "text_encoder", src / "tokenizer"
    if not (enc / "config.json").is_file() or not tok.is_dir():
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok)
    with torch.no_grad():
        if m == "audio":
            from transformers import ClapTextModelWithProjection

            model = ClapTextModelWithProjection.from_pretrained(enc, use_safetensors=True).eval()
            ids = tokenizer([""], padding="max_length", max_length=size, truncation=True, return_tensors="pt")
            out = model(ids.input_ids, attention_mask=ids.attention_mask).text_embeds
            out = torch.nn.functional.normalize(out, dim=-1)
        else:
            from transformers import CLIPTextModel

            model = CLIPTextModel.from_pretrained(enc, use_safetensors=True).eval()
            ids = tokenizer([""], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            out = model(ids.input_ids)[0]
    return out[0].float().numpy()
