"""GPTQ: block-wise weight-only quantization that corrects each rounding error with the layers'
captured activations (Frantar et al., 2022), written straight into ONNX Runtime's ``MatMulNBits``.

For every MatMul with a constant weight ``W`` (K, N) the Hessian ``H = X^T X`` of its input over
the calibration tokens is accumulated; input channels are quantized one at a time (symmetric,
block-wise along K, the block's scale taken from the error-updated weights when the block starts)
and the rounding error of channel ``k`` is spread over the channels not yet quantized through the
inverse Hessian's Cholesky factor. ONNX Runtime's quantizer lays the graph out (node attributes,
names); GPTQ then overwrites the packed weights and scales. Written by hand because no maintained
ONNX-level GPTQ exists (ONNX Runtime's own GPTQ path needs the neural-compressor package).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from omniforge.calibration.awq import capture


def gptq_quantize(
    w: np.ndarray, h: np.ndarray, bits: int = 4, block: int = 32, damp: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """(signed integer codes (K, N), scales (ceil(K / block), N)) of ``w`` (K, N) given ``h`` (K, K).

    The dequantized weight is ``codes * scale`` of the code's block; codes lie in
    [-2^(bits-1), 2^(bits-1) - 1] and a block's largest-magnitude weight maps to the negative end,
    the convention of ONNX Runtime's symmetric ``MatMulNBits``.
    """
    k, n = w.shape
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    wt = w.astype(np.float64).T.copy()  # (N, K): one row per output channel, as in the paper
    h = h.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    wt[:, dead] = 0.0
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky factor of H^-1
    codes = np.zeros((n, k), np.int32)
    scales = np.zeros(((k + block - 1) // block, n), np.float64)
    scale = np.ones(n)
    lazy = max(128, block)  # columns updated locally, then pushed to the rest in one matmul
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1, err1, hinv1 = wt[:, i1:i2].copy(), np.zeros((n, i2 - i1)), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if (i1 + i) % block == 0:
                grp = w1[:, i : i + block]
                extreme = np.take_along_axis(grp, np.abs(grp).argmax(axis=1)[:, None], axis=1)[:, 0]
                scale = extreme / lo
                scale[scale == 0] = 1.0
                scales[(i1 + i) // block] = scale
            col = w1[:, i]
            q = np.clip(np.round(col / scale), lo, hi)
            codes[:, i1 + i] = q
            err = (col - q * scale) / hinv1[i, i]
            w1[:, i:] -= np.outer(err, hinv1[i, i:])
            err1[:, i] = err
        wt[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes.T, scales.astype(np.float32)


def pack_matmul_nbits(codes: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Signed codes (K, N) -> ``MatMulNBits`` B (N, k_blocks, block * bits / 8) uint8, zero point 2^(bits-1)."""
    k, n = codes.shape
    pad = (-k) % block
    u = (codes.T + 2 ** (bits - 1)).astype(np.uint8)  # (N, K), unsigned
    u = np.pad(u, ((0, 0), (0, pad)), constant_values=2 ** (bits - 1)).reshape(n, -1, block)
    if bits == 8:
        return u
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def hessians(model: onnx.ModelProto, rows: list[np.ndarray]) -> dict[str, np.ndarray]:
    """``X^T X / tokens`` of the input of every constant-weight MatMul of the in-place LLM graph."""
    inits = {t.name for t in model.graph.initializer}
    names = sorted({n.input[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits})
    acts = capture(model, names, rows)
    return {k: (x.astype(np.float64).T @ x.astype(np.float64)) / len(x) for k, x in acts.items()}


def apply_gptq(
    fp32: onnx.ModelProto, quantized: onnx.ModelProto, rows: list[np.ndarray], bits: int, block: int
) -> onnx.ModelProto:
    """``quantized`` (the RTN ``MatMulNBits`` form of ``fp32``) with GPTQ weights and scales instead."""
    weights = {t.name: t for t in fp32.graph.initializer}
    producer = {
        n.input[1]: n.input[0] for n in fp32.graph.node if n.op_type == "MatMul" and n.input[1] in weights
    }
    hs = hessians(fp32, rows)
    inits = {t.name: t for t in quantized.graph.initializer}
    for node in quantized.graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) > 3:
            continue
        orig = node.input[1].rsplit("_Q", 1)[0]
        if orig not in producer or producer[orig] not in hs:
            continue
        w = numpy_helper.to_array(weights[orig]).astype(np.float32)
        codes, scales = gptq_quantize(w, hs[producer[orig]], bits, block)
        packed = pack_matmul_nbits(codes, bits, block)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(packed, node.input[1]))
        shape = tuple(inits[node.input[2]].dims)
        inits[node.input[2]].CopyFrom(
            numpy_helper.from_array(np.ascontiguousarray(scales.T).reshape(shape), node.input[2])
        )
    return quantized
