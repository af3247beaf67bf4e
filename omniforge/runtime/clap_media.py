"""CLAP's audio front end in numpy (torch-free), as ``ClapFeatureExtractor`` computes it, made
deterministic.

A centred STFT (reflect padding, periodic Hann window, power spectrum), mel filters over
[``f_min``, ``f_max``], ``10 * log10`` floored at 1e-10 (dB), as frames x mel bins. The model's
``enable_fusion`` picks the route, named as the extractor names its ``truncation`` modes:

- ``fusion`` (fused models; HTK mel filters, no normalisation): four channels. A clip no longer
  than the window is padded (``padding``) and its log-mel repeated four times. A longer clip gives
  its whole log-mel shrunk in time to the window (bilinear, as ``torch.nn.functional.interpolate``)
  and three window-long crops from the front, middle and back thirds of the possible starts. The
  extractor draws each crop's start at random; here it is the middle start of its third.
- ``rand_trunc`` (unfused models; Slaney mel filters and normalisation): one channel. A shorter
  clip is padded (``padding``); a longer one is cut to its first window (the extractor cuts at a
  random start).

One clip always takes the fusion branch of a fused model: the extractor marks a lone clip
``is_longer`` whatever its length, and the exported stage does the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from omniforge.errors import InputError, ManifestError

KIND = "clap"
TRUNCATIONS = ("fusion", "rand_trunc")
PADDINGS = ("repeatpad", "repeat", "pad")
FUSION_MELS = 64  # the extractor shrinks the whole clip to 64 mel bins whatever its feature_size
FUSION_CHANNELS = 4  # the shrunk clip + three crops
LONGEST_S = 300.0  # a fused model's clip is read up to this many seconds (its whole length shapes the input)
BLOCK_FRAMES = 2048  # STFT frames transformed at once (bounds the front end's memory on long clips)
MAX_WINDOW_SAMPLES = 1 << 23


@dataclass(frozen=True)
class ClapFrontEnd:
    """``ClapFeatureExtractor``'s settings that shape the features (``audio_frontend.json`` of a
    build, with ``kind: clap``)."""

    sample_rate: int = 48000
    n_fft: int = 1024
    hop_length: int = 480
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float = 14000.0
    max_length_s: float = 10.0
    padding: str = "repeatpad"
    truncation: str = "fusion"

    @property
    def max_samples(self) -> int:
        """The window in samples (the extractor's ``nb_max_samples``)."""
        return int(self.max_length_s * self.sample_rate)

    @property
    def frames(self) -> int:
        """Log-mel frames of one window."""
        return self.max_samples // self.hop_length + 1

    @property
    def channels(self) -> int:
        return FUSION_CHANNELS if self.truncation == "fusion" else 1

    @property
    def read_seconds(self) -> float:
        """Seconds of a recording the features depend on."""
        return LONGEST_S if self.truncation == "fusion" else self.max_samples / self.sample_rate

    def problem(self) -> str | None:
        """Why these settings cannot be computed, in one sentence; None when they can."""
        ints = {
            "sample_rate": (1000, 384000),
            "n_fft": (2, 1 << 16),
            "hop_length": (1, 1 << 16),
            "n_mels": (1, 512),
        }
        for key, (lo, hi) in ints.items():
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                return f"{key} must be an integer in [{lo}, {hi}], got {v!r}"
        for key in ("f_min", "f_max", "max_length_s"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                return f"{key} must be a finite number >= 0, got {v!r}"
        if self.n_fft % 2:
            return f"n_fft must be even, got {self.n_fft}"
        if not self.f_min < self.f_max <= self.sample_rate / 2:
            return f"the mel range [{self.f_min}, {self.f_max}] Hz must be increasing and within the Nyquist frequency"
        if not self.n_fft <= self.max_samples <= MAX_WINDOW_SAMPLES:
            return f"the window of {self.max_samples} samples must lie in [n_fft, {MAX_WINDOW_SAMPLES}]"
        if self.padding not in PADDINGS:
            return f"padding '{self.padding}' is not one of {', '.join(PADDINGS)}"
        if self.truncation not in TRUNCATIONS:
            return f"truncation '{self.truncation}' is not one of {', '.join(TRUNCATIONS)}"
        if self.truncation == "fusion" and self.n_mels != FUSION_MELS:
            return f"the fusion route needs {FUSION_MELS} mel bins (the extractor shrinks to 64), got {self.n_mels}"
        return None

    def to_config(self) -> dict[str, Any]:
        return {"kind": KIND, **asdict(self)}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ClapFrontEnd:
        """The front end a build's ``audio_frontend`` config describes (``ManifestError`` if invalid)."""
        known = set(cls.__dataclass_fields__)
        fe = cls(**{k: v for k, v in cfg.items() if k in known})
        why = fe.problem()
        if why is not None:
            raise ManifestError(f"the CLAP audio front-end config is invalid: {why}")
        return fe


def _htk_mel(f: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def _htk_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def _slaney_mel(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, np.float64)
    log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * 27.0 / np.log(6.4)
    return np.where(f >= 1000.0, log, 3.0 * f / 200.0)


def _slaney_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0)), 200.0 * m / 3.0)


@lru_cache(maxsize=8)
def mel_filters(
    sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float, slaney: bool
) -> np.ndarray:
    """(1 + n_fft // 2, n_mels) triangular filters: HTK's scale unnormalised (``fusion``), or
    Slaney's scale with Slaney's area normalisation (``rand_trunc``)."""
    to_mel, to_hz = (_slaney_mel, _slaney_hz) if slaney else (_htk_mel, _htk_hz)
    edges = to_hz(np.linspace(to_mel(f_min), to_mel(f_max), n_mels + 2))
    freqs = np.linspace(0, sample_rate // 2, 1 + n_fft // 2)
    width = np.diff(edges)
    slopes = edges[None, :] - freqs[:, None]
    bank = np.maximum(0.0, np.minimum(-slopes[:, :-2] / width[:-1], slopes[:, 2:] / width[1:]))
    if slaney:
        bank = bank * (2.0 / (edges[2 : n_mels + 2] - edges[:n_mels]))[None, :]
    return bank


def log_mel_db(x: np.ndarray, fe: ClapFrontEnd, slaney: bool) -> np.ndarray:
    """(frames, n_mels) log-mel power in dB of mono float samples ``x`` (longer than n_fft / 2)."""
    n = fe.n_fft
    padded = np.pad(np.asarray(x, np.float64), n // 2, mode="reflect")
    frames = 1 + (padded.size - n) // fe.hop_length
    window = np.hanning(n + 1)[:-1]  # periodic Hann
    bank = mel_filters(fe.sample_rate, n, fe.n_mels, float(fe.f_min), float(fe.f_max), slaney)
    out = np.empty((frames, fe.n_mels), np.float64)
    for start in range(0, frames, BLOCK_FRAMES):
        idx = (
            np.arange(n)[None, :]
            + fe.hop_length * np.arange(start, min(frames, start + BLOCK_FRAMES))[:, None]
        )
        power = np.abs(np.fft.rfft(padded[idx] * window, n=n, axis=1)) ** 2
        out[start : start + len(idx)] = power @ bank
    return 10.0 * np.log10(np.maximum(out, 1e-10))


def _fit(x: np.ndarray, n: int, padding: str) -> np.ndarray:
    """A clip of at most ``n`` samples padded to ``n`` as the extractor pads it."""
    if x.size < n:
        if padding == "repeat":
            x = np.tile(x, n // x.size + 1)[:n]
        elif padding == "repeatpad":
            x = np.tile(x, n // x.size)
        x = np.pad(x, (0, n - x.size))
    return x


def shrink_time(mel: np.ndarray, frames: int) -> np.ndarray:
    """``mel`` (T, F) resized to ``frames`` rows, as ``interpolate(..., mode='bilinear',
    align_corners=False)`` resizes it (the mel axis keeps its size). Indices and weights are
    computed as torch computes them (a float32 scale, each index one fused multiply-add rounded to
    float32): an index off by one float32 step moves a value by up to 1e-3."""
    total = mel.shape[0]
    f32 = np.float32
    scale = np.float64(f32(total) / f32(frames))
    src = np.maximum(f32(0), (scale * (np.arange(frames) + 0.5) - 0.5).astype(f32))
    i0 = np.minimum(np.floor(src).astype(np.int64), total - 1)
    i1 = np.minimum(i0 + 1, total - 1)
    w1 = np.clip(src - i0.astype(f32), f32(0), f32(1))[:, None]
    m = mel.astype(f32)
    return (f32(1) - w1) * m[i0] + w1 * m[i1]


def fusion_starts(total: int, chunk: int) -> list[int]:
    """The start frame of each of the three crops: the middle of the front, middle and back thirds
    of the possible starts (the extractor draws one at random from each)."""
    thirds = np.array_split(np.arange(total - chunk + 1), 3)
    return [int(r[len(r) // 2]) if len(r) else 0 for r in thirds]


def features(samples: np.ndarray, fe: ClapFrontEnd) -> np.ndarray:
    """(channels, frames, n_mels) float32 input features of mono ``samples`` at ``fe.sample_rate``."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise InputError(f"CLAP's front end takes non-empty mono samples, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise InputError("the audio holds NaN or infinite samples")
    n = fe.max_samples
    slaney = fe.truncation == "rand_trunc"
    if x.size > n and slaney:
        x = x[:n]
    if x.size <= n:
        mel = log_mel_db(_fit(x, n, fe.padding), fe, slaney)
        return np.repeat(mel[None], fe.channels, axis=0).astype(np.float32)
    mel = log_mel_db(x, fe, slaney=False)
    chunk = n // fe.hop_length + 1
    if mel.shape[0] == chunk:  # longer by less than a hop: the whole clip fits
        return np.repeat(mel[None], FUSION_CHANNELS, axis=0).astype(np.float32)
    mel = mel.astype(np.float32)  # the extractor crops and shrinks its float32 log-mel
    crops = [mel[s : s + chunk] for s in fusion_starts(mel.shape[0], chunk)]
    return np.stack([shrink_time(mel, chunk), *crops])
