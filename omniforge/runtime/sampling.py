"""Next-token selection in numpy: greedy, temperature, top-k, top-p, repetition penalty (seeded)."""

from __future__ import annotations

import math
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
        _int_at_least("max_new_tokens", self.max_new_tokens, 1)
        _int_at_least("top_k", self.top_k, 0)
        _int_at_least("seed", self.seed, 0)
        if self.seed >= MAX_SEED:
            raise ConfigError(f"seed must be < 2**64, got {self.seed}")
        t = _finite("temperature", self.temperature)
        if t < 0:
            raise ConfigError(f"temperature must be >= 0, got {t}")
        if 0 < t < MIN_TEMPERATURE or t > MAX_TEMPERATURE:
            raise ConfigError(
                f"temperature must be 0 (greedy) or lie in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {t}"
            )
        if not 0 < _finite("top_p", self.top_p) <= 1:
            raise ConfigError(f"top_p must lie in (0, 1], got {self.top_p}")
        penalty = _finite("repetition_penalty", self.repetition_penalty)
        if penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {penalty}")
        if not MIN_PENALTY <= penalty <= MAX_PENALTY:
            raise ConfigError(f"repetition_penalty must lie in [{MIN_PENALTY}, {MAX_PENALTY}], got {penalty}")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (tuple, list)):
                raise ConfigError("stop_token_ids must be a tuple of token ids or None")
            for t_id in self.stop_token_ids:
                _int_at_least("a stop token id", t_id, 0)
        if isinstance(self.stop_strings, str) or not isinstance(self.stop_strings, (tuple, list)):
            raise ConfigError("stop_strings must be a tuple of strings")
        for stop in self.stop_strings:
            if not isinstance(stop, str) or not stop:
                raise ConfigError(f"a stop string must be non-empty text, got {stop!r}")


MAX_SEED = 2**64
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3  # beyond these the softmax under- or overflows
MIN_PENALTY, MAX_PENALTY = 1e-3, 1e3


def _int_at_least(name: str, value: object, low: int) -> int:
    """``value`` if it is an integer >= ``low`` (bools and floats refused), else one ``ConfigError``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _finite(name: str, value: object) -> float:
    """``value`` as a float if it is a finite real number, else one ``ConfigError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value}")
    return float(value)


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
