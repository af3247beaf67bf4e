"""BLIP-2's image side as an image encoder stage: vision tower + Q-Former + learned query tokens.

Read from a BLIP-2 folder (``Blip2Model`` / ``Blip2ForConditionalGeneration``, safetensors): only the
tensors of ``vision_model``, ``query_tokens`` and ``qformer`` are loaded, never the language model
beside them. The output is the Q-Former's query states (B, num_query_tokens, hidden), what BLIP-2
hands its ``language_projection``; here an input projector maps them into the LLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from omniforge.errors import ConfigError, ModelNotFoundError

PARTS = ("vision_model.", "qformer.", "query_tokens")


class Blip2QFormerEncoder(nn.Module):
    """(B, 3, S, S) pixels -> (B, num_query_tokens, qformer hidden) query states."""

    def __init__(self, config) -> None:
        super().__init__()
        from transformers import Blip2QFormerModel, Blip2VisionModel

        self.vision_model = Blip2VisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(
            torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size)
        )
        self.qformer = Blip2QFormerModel(config.qformer_config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image = self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
        mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        queries = self.query_tokens.expand(image.shape[0], -1, -1)
        out = self.qformer(
            query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=mask, return_dict=True
        )
        return out.last_hidden_state


def load_blip2_encoder(folder: Path) -> Blip2QFormerEncoder:
    from safetensors import safe_open
    from transformers import Blip2Config

    files = sorted(Path(folder).glob("*.safetensors"))
    if not (Path(folder) / "config.json").is_file() or not files:
        raise ModelNotFoundError(f"{folder} is not a BLIP-2 folder with config.json and safetensors weights")
    config = Blip2Config.from_dict(json.loads((Path(folder) / "config.json").read_text()))
    module = Blip2QFormerEncoder(config)
    state = {}
    for f in files:
        with safe_open(str(f), "pt") as sf:
            for key in sf.keys():
                if key.startswith(PARTS):
                    state[key] = sf.get_tensor(key).float()
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"{folder}: the BLIP-2 weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return module.eval()
