"""CLAP's audio tower as an audio encoder stage: log-mel features -> the projected embedding.

The stage is transformers' ``ClapAudioModelWithProjection`` forward, returning ``audio_embeds``
(not L2-normalised; ``ClapModel.get_audio_features`` normalises it). A fused tower always takes
its fusion branch (``is_longer`` true), as it does for a lone clip from ``ClapFeatureExtractor``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from omniforge.errors import ModelNotFoundError
from omniforge.pipeline.clap_folder import read_clap_folder


class ClapAudioStage(nn.Module):
    """(B, 4 or 1, frames, n_mels) log-mel features -> (B, projection_dim)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.fusion = bool(model.config.enable_fusion)

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        longer = torch.ones(input_features.shape[0], 1, dtype=torch.bool) if self.fusion else None
        return self.model(input_features=input_features, is_longer=longer).audio_embeds


def load_clap_encoder(folder: Path) -> ClapAudioStage:
    """The audio tower and projection of an HF CLAP folder (``ClapAudioModelWithProjection`` or
    ``ClapModel``; safetensors only), in eval mode."""
    from transformers import ClapAudioModelWithProjection

    read_clap_folder(folder)  # unsupported options refused before loading
    try:
        model = ClapAudioModelWithProjection.from_pretrained(
            folder, use_safetensors=True, torch_dtype=torch.float32
        )
    except OSError as exc:
        raise ModelNotFoundError(
            f"cannot load a CLAP audio tower from {folder} ({str(exc).splitlines()[0]})"
        ) from None
    return ClapAudioStage(model).eval()
