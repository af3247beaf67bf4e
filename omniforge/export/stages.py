"""The PyTorch module each stage is exported from: positional inputs and outputs in spec order."""

from __future__ import annotations

import torch
from torch import nn

from omniforge.errors import StageError
from omniforge.export.llm import LlamaExplicitCache, LlamaReference
from omniforge.pipeline.spec import StageKind, StageSpec


class _Embedding(nn.Module):
    def __init__(self, llm: nn.Module) -> None:
        super().__init__()
        self.embed = llm.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, S) -> (B, S, H)
        return self.embed(input_ids)


class _Encoder(nn.Module):
    def __init__(self, vision: nn.Module) -> None:
        super().__init__()
        self.vision = vision

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, D)
        return self.vision(pixel_values=x).image_embeds


class _UNet(nn.Module):
    def __init__(self, unet: nn.Module, cond_as_class_labels: bool) -> None:
        super().__init__()
        self.unet = unet
        self.class_labels = cond_as_class_labels

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.class_labels:  # AudioLDM: one pooled vector, no cross-attention context
            return self.unet(sample, timestep, encoder_hidden_states=None, class_labels=cond).sample
        return self.unet(sample, timestep, encoder_hidden_states=cond).sample


class _VaeDecoder(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:  # latents already divided by scaling_factor
        return self.vae.decode(latent).sample


class _Vocoder(nn.Module):
    def __init__(self, vocoder: nn.Module) -> None:
        super().__init__()
        self.vocoder = vocoder

    def forward(self, mel: torch.Tensor) -> torch.Tensor:  # (B, frames, mel) -> (B, samples)
        return self.vocoder(mel)


def export_module(stage: StageSpec, module: nn.Module) -> nn.Module:
    """The module traced to ONNX for ``stage``."""
    if stage.kind is StageKind.EMBEDDING:
        return _Embedding(module)
    if stage.kind is StageKind.LLM:
        return LlamaExplicitCache(module)
    if stage.kind is StageKind.ENCODER:  # a CLIP vision model; ImageBind's modules return embeddings
        from transformers import PreTrainedModel

        return _Encoder(module) if isinstance(module, PreTrainedModel) else module
    if stage.kind in (StageKind.INPUT_PROJECTOR, StageKind.OUTPUT_PROJECTOR):
        return module
    if stage.kind is StageKind.DECODER and stage.component.endswith(".transformer"):  # CogVideoX
        from omniforge.export.cogvideox import CogVideoXDenoiser

        return CogVideoXDenoiser(module, stage)
    if stage.kind is StageKind.DECODER:
        return _UNet(module, cond_as_class_labels=stage.input_names[2] == "class_labels")
    if stage.kind is StageKind.VAE:
        return _VaeDecoder(module)
    if stage.kind is StageKind.VOCODER:
        return _Vocoder(module)
    raise StageError(f"no exporter for stage kind '{stage.kind}'")


def reference_module(stage: StageSpec, module: nn.Module) -> nn.Module:
    """What parity is measured against: the library's own forward where it differs from the export."""
    if stage.kind is StageKind.LLM:
        return LlamaReference(module)
    return export_module(stage, module)
