"""Whisper's log-mel front end in numpy (torch-free), as ``WhisperFeatureExtractor`` computes it.

16 kHz audio padded with zeros or cut to the window (30 s for Whisper as trained; a deployment may
choose a shorter window, and the encoder then reads only that many positions), a centred STFT
(reflect padding, periodic Hann window of 400, hop 160), power spectrum, Slaney-style mel filters
over 0-8 kHz (80 or 128 bins), log10 floored at 1e-10, the last frame dropped, values floored at
the maximum minus 8, then ``(x + 4) / 4``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from omniforge.errors import InputError

SAMPLE_RATE, N_FFT, HOP = 16000, 400, 160
MAX_WINDOW_S = 30
MAX_MELS = 256


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, np.float64)
    mel = 3.0 * f / 200.0
    log = f >= 1000.0
    return np.where(log, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * 27.0 / np.log(6.4), mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0)), 200.0 * m / 3.0)


@lru_cache(maxsize=8)
def mel_filters(n_mels: int, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """(1 + n_fft // 2, n_mels) triangular filters on Slaney's scale with Slaney area normalisation."""
    freqs = np.linspace(0, sample_rate // 2, 1 + n_fft // 2)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(8000.0), n_mels + 2))
    width = np.diff(edges)
    slopes = edges[None, :] - freqs[:, None]
    down, up = -slopes[:, :-2] / width[:-1], slopes[:, 2:] / width[1:]
    bank = np.maximum(0.0, np.minimum(down, up))
    return bank * (2.0 / (edges[2 : n_mels + 2] - edges[:n_mels]))[None, :]


def log_mel(samples: np.ndarray, n_mels: int = 80, window_s: int = MAX_WINDOW_S) -> np.ndarray:
    """(n_mels, window_s * 100) float32 features of 16 kHz mono ``samples``."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise InputError(f"Whisper's front end takes non-empty mono samples, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise InputError("the audio holds NaN or infinite samples")
    if isinstance(n_mels, bool) or not isinstance(n_mels, int) or not 1 <= n_mels <= MAX_MELS:
        raise InputError(f"n_mels must be an integer in [1, {MAX_MELS}], got {n_mels!r}")
    if isinstance(window_s, bool) or not isinstance(window_s, int) or not 1 <= window_s <= MAX_WINDOW_S:
        raise InputError(
            f"the window must be a whole number of seconds in [1, {MAX_WINDOW_S}], got {window_s!r}"
        )
    n = window_s * SAMPLE_RATE
    x = np.pad(x[:n], (0, max(0, n - x.size)))
    padded = np.pad(x, N_FFT // 2, mode="reflect")
    frames = 1 + (padded.size - N_FFT) // HOP
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(frames)[:, None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    power = np.abs(np.fft.rfft(padded[idx] * window, n=N_FFT, axis=1)) ** 2  # (frames, 201)
    mel = power @ mel_filters(n_mels)  # (frames, n_mels)
    spec = np.log10(np.maximum(mel, 1e-10)).T[:, :-1]
    spec = np.maximum(spec, spec.max() - 8.0)
    return ((spec + 4.0) / 4.0).astype(np.float32)
