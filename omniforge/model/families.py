"""Tiny seeded members of the model families a NExT-GPT-style system is built from, written with
their libraries' own ``save_pretrained`` (as the default model is), and the swaps that put one
into the default model folder (``omniforge create-default --family NAME``).

Each writer makes a folder a real checkpoint of that family would have: a Qwen2/Qwen3 LLM with a
byte-level BPE tokenizer and a ChatML template; a Whisper encoder; a CLAP audio tower with its
feature extractor; a BLIP-2 vision tower + Q-Former; a CogVideoX transformer, causal VAE and
scheduler. The tests check each against its library's own forward or pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from omniforge.errors import ConfigError

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer split (as its released tokenizer.json has it), before the byte-level mapping
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
# ChatML, the layout of Qwen's instruct models (their released templates add tool calls around it)
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
COGVIDEOX_LATENT = (5, 4, 8, 8)  # latent frames, channels, rows, columns: 17 frames of 32 x 32 pixels


def _perturb_1d(module: Any, seed: int, scale: float) -> None:
    """Move every bias and norm gain away from the library's zeros and ones, so that they matter."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def byte_level_bpe(
    corpus: Sequence[str], vocab_size: int, added: Sequence[str] = (), special: Sequence[str] = QWEN_SPECIAL
) -> Any:
    """A byte-level BPE in Qwen's form: NFC, Qwen2's regex split, byte-level mapping, its special
    tokens, and ``added`` (signal tokens, placeholders) as added special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    if added:
        tok.add_special_tokens(list(added))
    return tok


@dataclass(frozen=True)
class QwenShape:
    """A tiny Qwen: the default LLM's sizes unless told otherwise."""

    kind: str = "qwen2"  # qwen2 (q/k/v biases) or qwen3 (per-head q/k RMSNorm)
    hidden: int = 64
    intermediate: int = 160
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16  # qwen3 only (Qwen2 derives it from hidden / heads)
    max_context: int = 256
    vocab: int = 512
    tie: bool = True


def write_qwen(
    folder: Path,
    shape: QwenShape = QwenShape(),
    seed: int = 0,
    added: Sequence[str] = (),
    corpus: Sequence[str] | None = None,
) -> Path:
    """A seeded Qwen2/Qwen3 folder as transformers writes it (config.json, safetensors) with
    tokenizer.json and a tokenizer_config.json naming ChatML's tokens and template."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    if corpus is None:
        corpus = resources.files("omniforge").joinpath("data/corpus.txt").read_text().splitlines()
    tok = byte_level_bpe(corpus, shape.vocab, added)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": shape.max_context,
        "chat_template": CHATML_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    qwen3 = shape.kind == "qwen3"
    conf_cls, cls = (Qwen3Config, Qwen3ForCausalLM) if qwen3 else (Qwen2Config, Qwen2ForCausalLM)
    conf = conf_cls(
        vocab_size=tok.get_vocab_size(),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_context,
        rope_theta=1_000_000.0,
        tie_word_embeddings=shape.tie,
        eos_token_id=tok.token_to_id("<|im_end|>"),
        pad_token_id=tok.token_to_id("<|endoftext|>"),
        initializer_range=0.1,  # the library's 0.02 makes a tiny tied model repeat the prompt's last token
        **({"head_dim": shape.head_dim} if qwen3 else {}),
    )
    torch.manual_seed(seed)
    model = cls(conf).eval()
    _perturb_1d(model, seed + 1, 0.2)
    model.save_pretrained(folder)
    return folder


def write_whisper(folder: Path, d_model: int = 32, n_mels: int = 80, seed: int = 0) -> Any:
    """A seeded ``WhisperModel`` (of which omniforge reads the encoder); returns the model."""
    import torch
    from transformers import WhisperConfig, WhisperModel

    torch.manual_seed(seed)
    cfg = WhisperConfig(
        d_model=d_model,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model,
        num_mel_bins=n_mels,
        vocab_size=64,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    model = WhisperModel(cfg).eval()
    _perturb_1d(model.get_encoder(), seed + 1, 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return model


CLAP_PROJECTION = 24


def clap_audio_config(fusion: bool) -> dict[str, Any]:
    """A tiny HTS-AT tower: 64 mel bins, spec_size 128 (a 2 s window's 201 frames resized to 256
    and folded into 128 x 128), a 24-wide projection."""
    return dict(
        num_mel_bins=64,
        spec_size=128,
        window_size=4,
        depths=[1, 1],
        num_attention_heads=[2, 4],
        patch_embeds_hidden_size=16,
        hidden_size=32,
        projection_dim=CLAP_PROJECTION,
        enable_fusion=fusion,
        fusion_type="aff_2d" if fusion else None,
    )


def write_clap(
    folder: Path, fusion: bool = True, full: bool = False, window_s: int = 2, seed: int = 0
) -> Any:
    """A seeded CLAP audio tower (``ClapAudioModelWithProjection``, or inside a ``ClapModel`` with
    ``full``) and its ``ClapFeatureExtractor``; returns the model."""
    import torch
    from transformers import (
        ClapAudioConfig,
        ClapAudioModelWithProjection,
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
    )

    torch.manual_seed(seed)
    if full:
        text = dict(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=40,
        )
        model = ClapModel(
            ClapConfig(
                audio_config=clap_audio_config(fusion), text_config=text, projection_dim=CLAP_PROJECTION
            )
        )
    else:
        model = ClapAudioModelWithProjection(ClapAudioConfig(**clap_audio_config(fusion)))
    # log-mel statistics in the tower's input BatchNorm (dB values around -50), so that real
    # features reach the tower at unit scale as in a trained checkpoint
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                big = m is model.audio_model.audio_encoder.batch_norm
                m.running_mean.copy_(torch.randn(n, generator=g) * 5 - (50 if big else 0))
                m.running_var.copy_(torch.rand(n, generator=g) * (400 if big else 1) + (100 if big else 0.5))
    model.eval().save_pretrained(folder, safe_serialization=True)
    ClapFeatureExtractor(
        max_length_s=window_s,
        frequency_min=50,
        frequency_max=14000,
        truncation="fusion" if fusion else "rand_trunc",
    ).save_pretrained(folder)
    return model


BLIP2_WIDTH = 32  # the Q-Former's hidden size: the width of each query row


def write_blip2(folder: Path, seed: int = 0) -> Any:
    """A seeded ``Blip2Model`` (vision tower, 4 learned queries, Q-Former; a 1-layer OPT beside them
    that omniforge never reads) with its ``BlipImageProcessor``; returns the model."""
    import torch
    from transformers import Blip2Config, Blip2Model, BlipImageProcessor

    torch.manual_seed(seed)
    cfg = Blip2Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=28,
            patch_size=14,
        ),
        qformer_config=dict(
            hidden_size=BLIP2_WIDTH,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            encoder_hidden_size=32,
            vocab_size=64,
        ),
        text_config=dict(
            model_type="opt",
            hidden_size=16,
            ffn_dim=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=64,
            word_embed_proj_dim=16,
        ),
        num_query_tokens=4,
    )
    model = Blip2Model(cfg).eval()
    model.save_pretrained(folder, safe_serialization=True)
    BlipImageProcessor(size={"height": 28, "width": 28}).save_pretrained(folder)
    return model


def write_cogvideox(
    folder: Path,
    rotary: bool = True,
    scheduler: str = "CogVideoXDDIMScheduler",
    text_length: int = 77,
    text_dim: int = 32,
    seed: int = 0,
    **scheduler_options: object,
) -> Path:
    """``transformer/``, ``vae/`` and ``scheduler/`` of a 2-layer CogVideoX (CogVideoX-5b's layout
    with ``rotary``, else CogVideoX-2b's sin-cos positions), with norms and biases perturbed.
    Five latent frames: the VAE decodes them in two batches (3 + 2), its causal convolution caches
    carried from the first to the second."""
    import diffusers
    import torch
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

    frames, channels, h, w = COGVIDEOX_LATENT
    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=channels,
        out_channels=channels,
        time_embed_dim=16,
        text_embed_dim=text_dim,
        num_layers=2,
        sample_width=w,
        sample_height=h,
        sample_frames=(frames - 1) * 4 + 1,
        patch_size=2,
        max_text_seq_length=text_length,
        use_rotary_positional_embeddings=rotary,
    )
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8),
        down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3,
        latent_channels=channels,
        layers_per_block=1,
        norm_num_groups=4,
        sample_height=h * 4,
        sample_width=w * 4,
    )
    with torch.no_grad():  # fresh zero-initialised output layers would hide errors
        for m in (transformer, vae):
            for name, p in m.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    transformer.eval().save_pretrained(folder / "transformer")
    vae.eval().save_pretrained(folder / "vae")
    options = {
        "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
        "clip_sample": False,
        "snr_shift_scale": 3.0,
        **scheduler_options,
    }
    getattr(diffusers, scheduler)(**options).save_pretrained(folder / "scheduler")
    return folder


# --- swapping a family into the default model folder ---


@dataclass(frozen=True)
class Family:
    """One choice for one slot of the model folder."""

    slot: str  # the nextgpt.json slot it fills: llm, image encoder, audio encoder, video decoder
    summary: str
    swap: Callable[[Path, dict[str, Any], Any], None]  # (model folder, nextgpt.json dict, TinyConfig)


def _own_projector(
    root: Path, desc: dict[str, Any], modality: str, width: int, hidden: int, seed: int
) -> None:
    """A seeded input projector from the new encoder's ``width`` to the LLM, under ``input_projectors``."""
    import torch

    from omniforge.model.projectors import InputProjector, InputProjectorConfig, save_module

    torch.manual_seed(seed)
    save_module(
        InputProjector(InputProjectorConfig(in_dim=width, out_dim=hidden)).eval(),
        root / f"{modality}_projector",
    )
    desc.setdefault("input_projectors", {})[modality] = f"{modality}_projector"


def _replace(root: Path, name: str) -> Path:
    import shutil

    shutil.rmtree(root / name, ignore_errors=True)
    return root / name


def _swap_qwen(kind: str) -> Callable[[Path, dict[str, Any], Any], None]:
    def swap(root: Path, desc: dict[str, Any], cfg: Any) -> None:
        from omniforge.model.tokenizer import PLACEHOLDERS, SIGNAL_TOKENS

        added = [t for m in ("image", "video", "audio") for t in SIGNAL_TOKENS[m]] + list(
            PLACEHOLDERS.values()
        )
        shape = QwenShape(
            kind=kind,
            hidden=cfg.hidden,
            intermediate=cfg.intermediate,
            layers=cfg.layers,
            heads=cfg.heads,
            kv_heads=cfg.kv_heads,
            head_dim=cfg.hidden // cfg.heads,
            max_context=cfg.max_context,
            vocab=cfg.vocab,
            tie=kind == "qwen2",  # one of each: Qwen2.5's small models tie, this Qwen3 does not
        )
        write_qwen(_replace(root, "llm"), shape, seed=cfg.seed + 1, added=added)

    return swap


def _swap_whisper(root: Path, desc: dict[str, Any], cfg: Any) -> None:
    write_whisper(_replace(root, "audio_encoder"), d_model=32, seed=cfg.seed + 21)
    _own_projector(root, desc, "audio", 32, cfg.hidden, cfg.seed + 36)
    # a 2 s window (Whisper was trained on 30: see docs/model-folder.md), 100 positions pooled by 4
    desc["audio_frontend"] = {"window_s": 2, "pool": 4}


def _swap_clap(root: Path, desc: dict[str, Any], cfg: Any) -> None:
    write_clap(_replace(root, "audio_encoder"), fusion=True, seed=cfg.seed + 21)
    _own_projector(root, desc, "audio", CLAP_PROJECTION, cfg.hidden, cfg.seed + 36)
    desc.pop("audio_frontend", None)  # CLAP's front end is its folder's preprocessor_config.json


def _swap_blip2(root: Path, desc: dict[str, Any], cfg: Any) -> None:
    write_blip2(_replace(root, "image_encoder"), seed=cfg.seed + 20)
    _own_projector(root, desc, "image", BLIP2_WIDTH, cfg.hidden, cfg.seed + 35)


def _swap_cogvideox(root: Path, desc: dict[str, Any], cfg: Any) -> None:
    # fed where CogVideoXPipeline feeds T5's prompt embeddings: the video output projector's 77 x cond_dim
    write_cogvideox(
        _replace(root, "video_decoder"), text_length=77, text_dim=cfg.cond_dim, seed=cfg.seed + 50
    )


FAMILIES: dict[str, Family] = {
    "qwen2": Family(
        "llm", "Qwen2/Qwen2.5 LLM (q/k/v biases, tied embeddings, ChatML tokenizer)", _swap_qwen("qwen2")
    ),
    "qwen3": Family(
        "llm", "Qwen3 LLM (per-head q/k RMSNorm, untied embeddings, ChatML tokenizer)", _swap_qwen("qwen3")
    ),
    "whisper": Family(
        "audio encoder", "Whisper encoder (80-bin log-mel, 2 s window, pooled by 4)", _swap_whisper
    ),
    "clap": Family("audio encoder", "CLAP audio tower with projection (fusion, 48 kHz)", _swap_clap),
    "blip2": Family("image encoder", "BLIP-2 vision tower + Q-Former (4 query rows per image)", _swap_blip2),
    "cogvideox": Family(
        "video decoder", "CogVideoX transformer + causal 3D VAE (17 frames of 32 x 32)", _swap_cogvideox
    ),
}


def check_families(names: Sequence[str]) -> list[str]:
    """``names`` without repeats, each known and at most one per slot; one sentence otherwise."""
    out: list[str] = []
    slots: dict[str, str] = {}
    for name in names:
        if name not in FAMILIES:
            raise ConfigError(f"unknown family '{name}'; choose from {', '.join(FAMILIES)}")
        slot = FAMILIES[name].slot
        if slots.get(slot, name) != name:
            raise ConfigError(f"'{slots[slot]}' and '{name}' both fill the {slot}; choose one")
        if name not in out:
            slots[slot] = name
            out.append(name)
    return out


def apply_families(root: Path, desc: dict[str, Any], cfg: Any, names: Sequence[str]) -> None:
    """Swap each named family into the model folder being written at ``root`` (``desc`` is its
    nextgpt.json, edited in place)."""
    import shutil

    for name in names:
        FAMILIES[name].swap(root, desc, cfg)
    own = desc.get("input_projectors", {})
    if desc.get("input_projector") and all(m in own for m in desc.get("encoders", {})):
        shutil.rmtree(
            root / desc.pop("input_projector")
        )  # every encoder has its own: the shared one is unused
