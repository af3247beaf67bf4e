"""The embedded default: a tiny NExT-GPT built from the real architectures with seeded weights.

Every component is a real library class (transformers' LlamaForCausalLM, CLIPVisionModelWithProjection
and SpeechT5HifiGan, peft LoRA, diffusers' UNet2D/UNet3DConditionModel and AutoencoderKL, diffusers'
scheduler) built from a small config and saved in its library's on-disk format, so exporting the
default goes through the same loading code as a user's real checkpoints. Nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from omniforge.model.projectors import (
    InputProjector,
    InputProjectorConfig,
    OutputProjector,
    OutputProjectorConfig,
    save_module,
)
from omniforge.model.tokenizer import (
    BOS,
    EOS,
    PAD,
    PLACEHOLDERS,
    SIGNAL_TOKENS,
    save_tokenizer,
    train_tokenizer,
)
from omniforge.pipeline.atomic import temp_folder
from omniforge.pipeline.model_config import (
    DEFAULT_VERSION,
    FORMAT,
    FORMAT_VERSION,
    AudioFrontend,
    default_model_dir,
)


@dataclass(frozen=True)
class TinyConfig:
    """Sizes of the tiny default; small enough that export and tests run in minutes on 2 cores."""

    seed: int = 0
    # LLM (GQA: fewer KV heads than query heads)
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 160
    vocab: int = 512
    max_context: int = 256
    lora_rank: int = 4
    # ImageBind-style encoders (CLIP vision ViT + projection into a shared embedding space)
    enc_hidden: int = 32
    enc_layers: int = 2
    enc_dim: int = 32  # shared embedding size (ImageBind: 1024)
    image_size: int = 32
    patch: int = 8
    # decoders
    cond_dim: int = 32  # SD / ZeroScope cross-attention width (real: 768 / 1024)
    audio_cond_dim: int = 16  # AudioLDM class-label width (real: 512)
    image_latent: int = 16
    video_latent: int = 8
    video_frames: int = 4
    audio_latent: tuple[int, int] = (16, 8)  # (frames, mel bins) / VAE scale
    proj_d_model: int = 32


def _perturb_norms(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every norm a non-trivial affine (real checkpoints have one; fresh inits are 1 and 0),
    so that passes folding norms into linear layers are exercised by the default."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[0].lower()
            if any(k in leaf for k in ("norm", "layrnorm", "ln_")) and p.ndim == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
    return module


def _llm(cfg: TinyConfig, folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer(cfg.vocab)
    save_tokenizer(tok, folder)
    torch.manual_seed(cfg.seed + 1)
    conf = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_context,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
        tie_word_embeddings=False,
    )
    model = _perturb_norms(LlamaForCausalLM(conf).eval(), cfg.seed + 2)
    model.save_pretrained(folder)


def seeded_lora(llm_folder: Path, out: Path, rank: int, targets: list[str], scale: float, seed: int) -> None:
    """A PEFT LoRA adapter of the LLM at ``llm_folder`` (``lora_alpha`` = 2 * ``rank``) with seeded
    A and B (B non-zero, so that it changes the model), both scaled by ``scale``, saved to ``out``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(llm_folder)
    lcfg = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False, lora_dropout=0.0
    )
    peft_model = get_peft_model(base, lcfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(scale)
    peft_model.save_pretrained(out)


def _lora(cfg: TinyConfig, llm_folder: Path, root: Path) -> dict[str, str]:
    """One seeded adapter per modality and one for text: the media adapters on the attention
    projections (rank ``lora_rank``), the text adapter on attention and MLP (twice the rank), each
    large enough to change greedy output visibly."""
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    out = {}
    for i, name in enumerate([*SIGNAL_TOKENS, "text"]):
        text = name == "text"
        targets = attention + (["gate_proj", "up_proj", "down_proj"] if text else [])
        rank = cfg.lora_rank * (2 if text else 1)
        seeded_lora(llm_folder, root / "lora" / name, rank, targets, 0.5, cfg.seed + 10 + i)
        out[name] = f"lora/{name}"
    return out


def _encoder(cfg: TinyConfig, folder: Path, channels: int, seed: int) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    conf = CLIPVisionConfig(
        hidden_size=cfg.enc_hidden,
        intermediate_size=2 * cfg.enc_hidden,
        projection_dim=cfg.enc_dim,
        num_hidden_layers=cfg.enc_layers,
        num_attention_heads=2,
        num_channels=channels,
        image_size=cfg.image_size,
        patch_size=cfg.patch,
    )
    _perturb_norms(CLIPVisionModelWithProjection(conf).eval(), seed + 100).save_pretrained(folder)
    if channels == 3:  # the CLIP preprocessing the runtime's image front end reproduces
        pre = {
            "image_processor_type": "CLIPImageProcessor",
            "size": {"shortest_edge": cfg.image_size},
            "crop_size": {"height": cfg.image_size, "width": cfg.image_size},
            "do_resize": True,
            "do_center_crop": True,
            "do_normalize": True,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "resample": 3,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
        }
        (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")


def _vae(folder: Path, channels: int, seed: int) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        latent_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
    ).eval().save_pretrained(folder)


def _scheduler(folder: Path) -> None:
    from diffusers import DDIMScheduler

    DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    ).save_pretrained(folder)


def _unet_kwargs() -> dict:
    return dict(
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def _visual_decoder(cfg: TinyConfig, folder: Path, video: bool) -> None:
    """Stable Diffusion-style (2D UNet) or ZeroScope-style (3D UNet) decoder with its VAE and scheduler."""
    from diffusers import UNet2DConditionModel, UNet3DConditionModel

    dim = "3D" if video else "2D"
    seed = cfg.seed + (50 if video else 40)
    torch.manual_seed(seed)
    unet = (UNet3DConditionModel if video else UNet2DConditionModel)(
        sample_size=cfg.video_latent if video else cfg.image_latent,
        down_block_types=(f"CrossAttnDownBlock{dim}", f"DownBlock{dim}"),
        up_block_types=(f"UpBlock{dim}", f"CrossAttnUpBlock{dim}"),
        cross_attention_dim=cfg.cond_dim,
        **_unet_kwargs(),
    )
    _perturb_norms(unet.eval(), seed + 100).save_pretrained(folder / "unet")
    _vae(folder / "vae", 3, seed + 1)
    _scheduler(folder / "scheduler")


def _audio_decoder(cfg: TinyConfig, folder: Path) -> None:
    from diffusers import UNet2DConditionModel
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    torch.manual_seed(cfg.seed + 60)
    # AudioLDM: conditioned through class_labels with one pooled vector, no cross-attention input
    unet = UNet2DConditionModel(
        sample_size=cfg.audio_latent,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=cfg.audio_cond_dim,
        class_embeddings_concat=True,
        **_unet_kwargs(),
    )
    _perturb_norms(unet.eval(), cfg.seed + 160).save_pretrained(folder / "unet")
    _vae(folder / "vae", 1, cfg.seed + 61)
    _scheduler(folder / "scheduler")
    torch.manual_seed(cfg.seed + 62)
    n_mel = cfg.audio_latent[1] * 2
    SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=n_mel,
            sampling_rate=16000,
            upsample_initial_channel=32,
            upsample_rates=[4, 4],
            upsample_kernel_sizes=[8, 8],
            resblock_kernel_sizes=[3, 5],
            resblock_dilation_sizes=[[1, 3], [1, 3]],
            normalize_before=False,
            # the library's 0.01 init shrinks the signal at every layer (a trained vocoder's does
            # not): the waveform would peak near 2e-5, silence once written as 16-bit; 0.12 peaks
            # around 0.3-0.6 full scale without saturating the final tanh
            initializer_range=0.12,
        )
    ).eval().save_pretrained(folder / "vocoder")


def _projectors(cfg: TinyConfig, root: Path) -> dict[str, str]:
    torch.manual_seed(cfg.seed + 30)
    save_module(
        InputProjector(InputProjectorConfig(cfg.enc_dim, cfg.hidden)).eval(), root / "input_projector"
    )
    shapes = {"image": (77, cfg.cond_dim), "video": (77, cfg.cond_dim), "audio": (1, cfg.audio_cond_dim)}
    out = {}
    for i, (modality, (q, d)) in enumerate(shapes.items()):
        torch.manual_seed(cfg.seed + 31 + i)
        pcfg = OutputProjectorConfig(
            in_dim=cfg.hidden,
            num_signal_tokens=len(SIGNAL_TOKENS[modality]),
            d_model=cfg.proj_d_model,
            num_queries=q,
            out_dim=d,
            num_heads=2,
        )
        module = OutputProjector(pcfg)
        with torch.no_grad():
            module.queries.normal_(0.0, 0.02)
        save_module(_perturb_norms(module.eval(), cfg.seed + 131 + i), root / "output_projectors" / modality)
        out[modality] = f"output_projectors/{modality}"
    return out


def create_default(folder: str | Path, cfg: TinyConfig = TinyConfig(), families: Sequence[str] = ()) -> Path:
    """Write the tiny NExT-GPT to ``folder`` (atomically) and return its path. ``families`` swap
    parts for other families' (``omniforge.model.families.FAMILIES``: Qwen LLMs, Whisper or CLAP
    audio, a BLIP-2 image encoder, a CogVideoX video decoder), at most one per slot."""
    from omniforge.model.families import FAMILIES, apply_families, check_families

    names = check_families(families)
    llm_swap = [n for n in names if FAMILIES[n].slot == "llm"]
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder(folder.parent, f".{folder.name}.")
    try:
        desc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": "-".join(["tiny-nextgpt", *names]),
            "default_version": DEFAULT_VERSION,
            "tiny_config": asdict(cfg),
            **({"families": names} if names else {}),
            "llm": "llm",
            "max_context": cfg.max_context,
            "adapters": {},
            "adapter_auto": {"video": "video", "audio": "audio", "image": "image", "text": "text"},
            "encoders": {"image": "image_encoder", "audio": "audio_encoder"},
            "audio_frontend": asdict(AudioFrontend(n_mels=cfg.image_size, num_frames=cfg.image_size)),
            "video_frames": cfg.video_frames,
            "input_projector": "input_projector",
            "output_projectors": {},
            "decoders": {"image": "image_decoder", "video": "video_decoder", "audio": "audio_decoder"},
            "signal_tokens": SIGNAL_TOKENS,
            "placeholders": PLACEHOLDERS,
        }
        if llm_swap:
            apply_families(tmp, desc, cfg, llm_swap)
        else:
            _llm(cfg, tmp / "llm")
        desc["adapters"] = _lora(cfg, tmp / "llm", tmp)
        _encoder(cfg, tmp / "image_encoder", 3, cfg.seed + 20)
        _encoder(cfg, tmp / "audio_encoder", 1, cfg.seed + 21)
        desc["output_projectors"] = _projectors(cfg, tmp)
        _visual_decoder(cfg, tmp / "image_decoder", video=False)
        _visual_decoder(cfg, tmp / "video_decoder", video=True)
        _audio_decoder(cfg, tmp / "audio_decoder")
        apply_families(tmp, desc, cfg, [n for n in names if n not in llm_swap])
        (tmp / "nextgpt.json").write_text(json.dumps(desc, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def ensure_default() -> Path:
    """The default model folder, created on first use."""
    folder = default_model_dir()
    if not (folder / "nextgpt.json").is_file():
        create_default(folder)
    return folder
