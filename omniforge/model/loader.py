"""Load the PyTorch module behind each component of a model folder, with the libraries' own loaders.

Weights are read only from safetensors (``use_safetensors=True``); nothing is fetched from a hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from omniforge.errors import ConfigError, ModelNotFoundError
from omniforge.model.projectors import InputProjector, OutputProjector, load_module
from omniforge.pipeline.describe import encoder_kind, is_imagebind
from omniforge.pipeline.model_config import LLM_BACKBONES, ModelConfig, llm_backbone, read_json

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _quiet() -> None:
    """transformers' loading logs and progress bars off, unless ``omniforge -v`` asked for them."""
    if os.environ.get("OMNIFORGE_VERBOSE") == "1":
        return
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_llm(cfg: ModelConfig, adapter: str | None = None) -> nn.Module:
    """The LLM (``LlamaForCausalLM``, ``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM``, by its
    ``model_type``) in fp32, with one LoRA adapter merged into its weights when asked."""
    import transformers

    _quiet()
    cls = getattr(transformers, LLM_BACKBONES[llm_backbone(cfg.llm)])
    try:
        model = cls.from_pretrained(cfg.llm, torch_dtype=torch.float32, use_safetensors=True)
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load the LLM from {cfg.llm} ({str(exc).splitlines()[0]})") from None
    if adapter is not None:
        from peft import PeftModel

        if adapter not in cfg.adapters:
            raise ConfigError(f"unknown adapter '{adapter}'; this model has {sorted(cfg.adapters) or 'none'}")
        model = PeftModel.from_pretrained(model, cfg.adapters[adapter]).merge_and_unload()
    return model.eval()


def load_component(cfg: ModelConfig, component: str, adapter: str | None = None) -> nn.Module:
    """The module named by a stage's ``component`` (e.g. ``decoders.image.unet``)."""
    _quiet()
    parts = component.split(".")
    if parts[0] == "llm":
        return load_llm(cfg, adapter)
    if parts[0] == "encoders":
        if encoder_kind(cfg.encoders[parts[1]]) == "blip-2":
            from omniforge.model.qformer_encoder import load_blip2_encoder

            return load_blip2_encoder(cfg.encoders[parts[1]])
        if encoder_kind(cfg.encoders[parts[1]]) == "whisper":
            from omniforge.model.audio_encoders import load_whisper_encoder

            return load_whisper_encoder(cfg.encoders[parts[1]], cfg.audio_frontend)
        if encoder_kind(cfg.encoders[parts[1]]) == "clap":
            from omniforge.model.clap_encoder import load_clap_encoder

            return load_clap_encoder(cfg.encoders[parts[1]])
        if is_imagebind(cfg.encoders[parts[1]]):
            from omniforge.model.imagebind import load_imagebind

            return load_imagebind(cfg.encoders[parts[1]], parts[1])
        from transformers import CLIPVisionModelWithProjection

        return CLIPVisionModelWithProjection.from_pretrained(
            cfg.encoders[parts[1]], use_safetensors=True, torch_dtype=torch.float32
        ).eval()
    if parts[0] == "input_projector":
        assert cfg.input_projector is not None
        return load_module(InputProjector, cfg.input_projector)
    if parts[0] == "input_projectors":
        return load_module(InputProjector, cfg.input_projectors[parts[1]])
    if parts[0] == "output_projectors":
        folder = cfg.output_projectors[parts[1]]
        if read_json(folder / "config.json").get("kind") == "textfc":
            from omniforge.model.textfc import load_textfc

            return load_textfc(folder).float()  # exported in FP32 like every stage
        return load_module(OutputProjector, folder)
    if parts[0] == "decoders":
        folder: Path = cfg.decoders[parts[1]] / parts[2]
        if parts[2] == "vocoder":
            from transformers import SpeechT5HifiGan

            return SpeechT5HifiGan.from_pretrained(
                folder, use_safetensors=True, torch_dtype=torch.float32
            ).eval()  # FP32 from FP16/BF16 files too, like every stage
        if parts[2] == "vae":
            from diffusers import AutoencoderKL, AutoencoderKLCogVideoX

            causal = read_json(folder / "config.json").get("_class_name") == "AutoencoderKLCogVideoX"
            cls = AutoencoderKLCogVideoX if causal else AutoencoderKL
            return cls.from_pretrained(folder, use_safetensors=True).eval()
        if parts[2] == "transformer":  # CogVideoX
            from diffusers import CogVideoXTransformer3DModel

            return CogVideoXTransformer3DModel.from_pretrained(folder, use_safetensors=True).eval()
        if parts[2] == "unet":
            from diffusers import UNet2DConditionModel, UNet3DConditionModel

            cls = UNet3DConditionModel if parts[1] == "video" else UNet2DConditionModel
            return cls.from_pretrained(folder, use_safetensors=True).eval()
    raise ConfigError(f"unknown component '{component}'")
