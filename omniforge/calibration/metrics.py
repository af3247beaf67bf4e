"""Accuracy of a quantized stage against its FP32 original."""

from __future__ import annotations

import numpy as np


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float(na == nb)


def snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """Signal-to-noise ratio of ``got`` against ``ref`` in dB (inf when equal)."""
    noise = float(np.sum((ref.astype(np.float64) - got) ** 2))
    signal = float(np.sum(ref.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(signal / noise) if signal > 0 else float("-inf")


def psnr(ref: np.ndarray, got: np.ndarray, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of ``got`` against ``ref`` (values in [0, peak])."""
    mse = float(np.mean((ref.astype(np.float64) - got.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(peak**2 / mse))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, got_logits: np.ndarray) -> float:
    """Mean KL(ref || got) of next-token distributions over the leading axes."""
    p, q = log_softmax(ref_logits), log_softmax(got_logits)
    return float(np.mean(np.sum(np.exp(p) * (p - q), axis=-1)))


def top1_agreement(ref_logits: np.ndarray, got_logits: np.ndarray) -> float:
    return float(np.mean(ref_logits.argmax(-1) == got_logits.argmax(-1)))


def meets_budgets(metrics: dict[str, float], budgets: dict[str, float]) -> bool:
    """True when every metric of ``budgets`` was measured and reaches its minimum; a budgeted metric
    missing from ``metrics`` fails the check."""
    return all(k in metrics and metrics[k] >= v for k, v in budgets.items())
