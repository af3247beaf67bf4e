"""Integer codes of block-wise weight-only quantization (numpy only).

A weight ``W`` (K, N) is cut into blocks of ``block`` rows along K; each block of each output
column has one scale (and, asymmetric, one zero point). Symmetric codes are signed, in
[-2^(bits-1), 2^(bits-1) - 1], and the block's largest-magnitude weight maps to the negative end:
ONNX Runtime's ``MatMulNBits`` convention, under which a scale is negative where that weight is
positive. ``positive=True`` keeps every scale positive, as TensorRT requires: the largest-magnitude
weight maps to the end of the code range on its own side (-2^(bits-1) when it is negative, the same
codes and scale as ``MatMulNBits``; 2^(bits-1) - 1 when it is positive). Negating the codes of a
negative-scale block cannot do it: its extreme code -2^(bits-1) has no positive twin. Asymmetric
codes are unsigned, in [0, 2^bits - 1], over the block's range widened to include 0, with
``W ~ (code - zero_point) * scale``.

Round-to-nearest, GPTQ's error-correcting rounding and the ``MatMulNBits`` packing live here, so
AWQ, GPTQ and the standard ``DequantizeLinear`` form round weights the same way.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class BlockCodes(NamedTuple):
    """Codes (K, N), scales (ceil(K / block), N) and, asymmetric, zero points shaped like the scales."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None = None


def code_range(bits: int, symmetric: bool = True) -> tuple[int, int]:
    """The smallest and largest code of ``bits``-bit quantization."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def block_scales(
    blocks: np.ndarray, bits: int, symmetric: bool = True, axis: int = 1, positive: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """(scales, zero points or None) of ``blocks``, reduced over ``axis`` (a block's rows);
    ``positive``: symmetric scales > 0 (see the module's docstring)."""
    lo, hi = code_range(bits, symmetric)
    if symmetric:
        idx = np.expand_dims(np.abs(blocks).argmax(axis=axis), axis)
        extreme = np.take_along_axis(blocks, idx, axis=axis).squeeze(axis)
        scale = np.where(extreme < 0, extreme / lo, extreme / hi) if positive else extreme / lo
        scale[scale == 0] = 1.0
        return scale, None
    vmin = np.minimum(blocks.min(axis=axis), 0.0)
    vmax = np.maximum(blocks.max(axis=axis), 0.0)
    scale = (vmax - vmin) / hi
    scale[scale == 0] = 1.0
    zero = np.clip(np.round(-vmin / scale), lo, hi)
    return scale, zero


def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    """``w`` (K, N) zero-padded to whole blocks, as (K / block, block, N)."""
    k, n = w.shape
    return np.pad(w.astype(np.float32), ((0, (-k) % block), (0, 0))).reshape(-1, block, n)


def rtn_codes(
    w: np.ndarray, bits: int, block: int, symmetric: bool = True, positive: bool = False
) -> BlockCodes:
    """Round-to-nearest codes of ``w`` (K, N); ``positive``: symmetric scales > 0."""
    k, n = w.shape
    lo, hi = code_range(bits, symmetric)
    wb = _blocks(w, block)
    scale, zero = block_scales(wb, bits, symmetric, positive=positive)
    shift = 0.0 if zero is None else zero[:, None, :]
    codes = np.clip(np.round(wb / scale[:, None, :]) + shift, lo, hi).astype(np.int32)
    zp = None if zero is None else zero.astype(np.int32)
    return BlockCodes(codes.reshape(-1, n)[:k], scale.astype(np.float32), zp)


def dequantize(q: BlockCodes, block: int) -> np.ndarray:
    """The (K, N) weight ``q`` stands for."""
    k, n = q.codes.shape
    scale = np.repeat(q.scales, block, axis=0)[:k]
    zero = 0 if q.zero_points is None else np.repeat(q.zero_points, block, axis=0)[:k]
    return ((q.codes - zero) * scale).astype(np.float32)


def fake_quantize(w: np.ndarray, bits: int, block: int, symmetric: bool = True) -> np.ndarray:
    """``w`` rounded to ``bits``-bit block codes and back."""
    return dequantize(rtn_codes(w, bits, block, symmetric), block)


def gptq_codes(
    w: np.ndarray, h: np.ndarray, bits: int = 4, block: int = 32, damp: float = 0.01, positive: bool = False
) -> BlockCodes:
    """Symmetric codes of ``w`` (K, N) by GPTQ (Frantar et al., 2022) given the Hessian ``h`` (K, K);
    ``positive``: scales > 0.

    Input channels are quantized one at a time, a block's scale taken from the error-updated
    weights when the block starts, and each channel's rounding error is spread over the channels
    not yet quantized through the upper Cholesky factor of ``h``'s inverse.
    """
    k, n = w.shape
    lo, hi = code_range(bits)
    wt = w.astype(np.float64).T.copy()  # (N, K): one row per output channel, as in the paper
    h = h.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    wt[:, dead] = 0.0
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    codes = np.zeros((n, k), np.int32)
    scales = np.zeros(((k + block - 1) // block, n), np.float64)
    scale = np.ones(n)
    lazy = max(128, block)  # columns updated locally, then pushed to the rest in one matmul
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1, err1, hinv1 = wt[:, i1:i2].copy(), np.zeros((n, i2 - i1)), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if (i1 + i) % block == 0:
                scale, _ = block_scales(w1[:, i : i + block], bits, positive=positive)
                scales[(i1 + i) // block] = scale
            col = w1[:, i]
            q = np.clip(np.round(col / scale), lo, hi)
            codes[:, i1 + i] = q
            err = (col - q * scale) / hinv1[i, i]
            w1[:, i:] -= np.outer(err, hinv1[i, i:])
            err1[:, i] = err
        wt[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return BlockCodes(codes.T, scales.astype(np.float32))


def pack_matmul_nbits(codes: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Signed codes (K, N) -> ``MatMulNBits`` B (N, k_blocks, block * bits / 8) uint8, zero point 2^(bits-1)."""
    k, n = codes.shape
    pad = (-k) % block
    u = (codes.T + 2 ** (bits - 1)).astype(np.uint8)  # (N, K), unsigned
    u = np.pad(u, ((0, 0), (0, pad)), constant_values=2 ** (bits - 1)).reshape(n, -1, block)
    if bits == 8:
        return u
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """4-bit codes (any shape, signed or unsigned) as ONNX's INT4/UINT4 raw bytes: two per byte,
    the first in the low nibble, padded with 0 to an even count."""
    flat = codes.astype(np.int16).ravel() & 0x0F
    if flat.size % 2:
        flat = np.append(flat, 0)
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
