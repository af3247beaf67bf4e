"""NExT-GPT's input and output projectors.

NExT-GPT ships these as plain modules inside its own repository (no library provides them), so
they are written here, saved as ``config.json`` + ``model.safetensors`` like HF components.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from omniforge.errors import ConfigError, ModelNotFoundError


@dataclass(frozen=True)
class InputProjectorConfig:
    in_dim: int  # encoder embedding size (ImageBind: 1024)
    out_dim: int  # LLM hidden size
    groups: int = 1  # >1: group Linear (block-diagonal), as in NExT-GPT's grouped variant


class InputProjector(nn.Module):
    """Linear (or group Linear) from the encoder space into the LLM embedding space."""

    def __init__(self, cfg: InputProjectorConfig) -> None:
        super().__init__()
        if cfg.in_dim % cfg.groups or cfg.out_dim % cfg.groups:
            raise ConfigError(
                f"input projector dims {cfg.in_dim}->{cfg.out_dim} are not divisible by groups={cfg.groups}"
            )
        self.cfg = cfg
        if cfg.groups == 1:
            self.proj = nn.Linear(cfg.in_dim, cfg.out_dim)
        else:
            self.proj = nn.Conv1d(cfg.in_dim, cfg.out_dim, 1, groups=cfg.groups)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, N, in) -> (B, N, out)
        if self.cfg.groups == 1:
            return self.proj(features)
        return self.proj(features.transpose(1, 2)).transpose(1, 2)


@dataclass(frozen=True)
class OutputProjectorConfig:
    in_dim: int  # LLM hidden size
    num_signal_tokens: int  # 4 for [IMG0..3], 24 for [VID0..23], 8 for [AUD0..7]
    d_model: int
    num_queries: int  # decoder conditioning length: 77 for SD / ZeroScope, 1 for AudioLDM
    out_dim: int  # decoder conditioning width: 768 for SD, 1024 ZeroScope, 512 AudioLDM
    num_heads: int = 4
    num_encoder_layers: int = 1
    num_decoder_layers: int = 1
    dim_feedforward: int = 0  # 0: 4 * d_model


class OutputProjector(nn.Module):
    """A small transformer whose learnable queries attend to the signal-token hidden states."""

    def __init__(self, cfg: OutputProjectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_fc = nn.Linear(cfg.in_dim, cfg.d_model)
        self.queries = nn.Parameter(torch.zeros(cfg.num_queries, cfg.d_model))
        self.transformer = nn.Transformer(
            d_model=cfg.d_model,
            nhead=cfg.num_heads,
            num_encoder_layers=cfg.num_encoder_layers,
            num_decoder_layers=cfg.num_decoder_layers,
            dim_feedforward=cfg.dim_feedforward or 4 * cfg.d_model,
            dropout=0.0,
            batch_first=True,
        )
        self.out_fc = nn.Linear(cfg.d_model, cfg.out_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (B, S, in) -> (B, Q, out)
        x = self.in_fc(hidden_states)  # (B, S, d)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, Q, d)
        return self.out_fc(self.transformer(x, q))


def save_module(module: InputProjector | OutputProjector, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(asdict(module.cfg), indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(folder / "model.safetensors"))


def load_module(cls: type[InputProjector] | type[OutputProjector], folder: Path) -> nn.Module:
    """Load a projector from its folder (safetensors only: never pickle)."""
    cfg_cls = InputProjectorConfig if cls is InputProjector else OutputProjectorConfig
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise ModelNotFoundError(f"{folder} needs config.json and model.safetensors")
    try:
        cfg = cfg_cls(**json.loads((folder / "config.json").read_text()))
    except (TypeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{folder / 'config.json'} is not a valid {cfg_cls.__name__} ({exc})") from None
    module = cls(cfg)
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"{folder}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return module.eval()
