"""Whisper's encoder as an audio encoder stage: log-mel features -> tokens for the input projector.

transformers' ``WhisperEncoder`` insists on 30-second inputs (3000 frames); a deployment may choose
a shorter window, so the stage runs the encoder's own modules with the first ``frames / 2``
positions (at 30 s it is exactly transformers' forward, which the tests check). Optionally it
average-pools ``pool`` consecutive positions into one token, so that the LLM gets fewer rows.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from omniforge.errors import ModelNotFoundError
from omniforge.pipeline.model_config import AudioFrontend


class WhisperEncoderStage(nn.Module):
    """(B, n_mels, 100 * window_s) features -> (B, 50 * window_s / pool, d_model) tokens."""

    def __init__(self, encoder: nn.Module, window_s: int = 30, pool: int = 1) -> None:
        super().__init__()
        self.encoder = encoder
        self.positions = 50 * window_s
        self.pool = pool

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        e = self.encoder
        x = nn.functional.gelu(e.conv1(input_features))
        x = nn.functional.gelu(e.conv2(x)).permute(0, 2, 1)
        x = x + e.embed_positions.weight[: self.positions]
        for layer in e.layers:
            out = layer(x, None)
            x = out[0] if isinstance(out, tuple) else out
        x = e.layer_norm(x)
        if self.pool > 1:
            b, t, d = x.shape
            x = x.reshape(b, t // self.pool, self.pool, d).mean(dim=2)
        return x


def load_whisper_encoder(folder: Path, frontend: AudioFrontend) -> WhisperEncoderStage:
    """The encoder of an HF Whisper folder (``WhisperModel`` or ``WhisperForConditionalGeneration``;
    safetensors only), in eval mode."""
    from transformers import WhisperModel

    try:
        model = WhisperModel.from_pretrained(folder, use_safetensors=True, torch_dtype=torch.float32)
    except OSError as exc:
        raise ModelNotFoundError(
            f"cannot load a Whisper encoder from {folder} ({str(exc).splitlines()[0]})"
        ) from None
    return WhisperEncoderStage(model.get_encoder(), frontend.window_s, frontend.pool).eval()
