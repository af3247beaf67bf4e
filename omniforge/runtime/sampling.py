"""Next-token selection in numpy: greedy, temperature, top-k, top-p, repetition penalty (seeded)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from omniforge.errors import ConfigError


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate. ``temperature == 0`` is greedy decoding."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off (HF semantics: divide positive logits, multiply negative)
    seed: int = 0
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's EOS
    stop_strings: tuple[str, ...] = ()
    collect_signal_hidden: bool = True  # return hidden states at generated signal tokens

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: np.ndarray, history: np.ndarray, penalty: float) -> np.ndarray:
    """(V,) logits with the tokens of ``history`` penalised."""
    if penalty == 1.0 or history.size == 0:
        return logits
    out = logits.copy()
    ids = np.unique(history)
    vals = out[ids]
    out[ids] = np.where(vals < 0, vals * penalty, vals / penalty)
    return out


def select_token(
    logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator, history: np.ndarray
) -> int:
    """One token id from (V,) logits."""
    logits = apply_repetition_penalty(logits.astype(np.float32, copy=False), history, cfg.repetition_penalty)
    if cfg.temperature == 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / cfg.temperature
    if cfg.top_k and cfg.top_k < z.size:
        kth = np.partition(z, -cfg.top_k)[-cfg.top_k]
        z = np.where(z < kth, -np.inf, z)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if cfg.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        keep = cum - probs[order] < cfg.top_p  # smallest set whose mass reaches top_p (always >= 1 token)
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))
