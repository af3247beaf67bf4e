"""Activation-aware weight scaling (AWQ) before round-to-nearest, on the in-place LLM graph.

For each group of linear layers fed by the same activation, a per-input-channel scale
``s = mean|x| ** alpha`` is searched (alpha on a grid) to minimise the output error of the
layers quantized at the requested bit width, block size and symmetry, on activations captured
through the graph's contract taps; the weights are multiplied by ``s`` and the producer of the
activation is divided by it, so the FP32 function is unchanged: QKV and gate/up scale into the
RMSNorm gammas, down_proj into up_proj's output columns (and its bias, where there is one). The o_proj and the LM head (whose
inputs have no foldable producer here) stay plain RTN.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from omniforge.calibration.codes import fake_quantize
from omniforge.calibration.tensors import capture_inplace, num_layers
from omniforge.pipeline.contracts import Contract, layer_tap

GRID = np.linspace(0.0, 1.0, 11)
# (activation tap, weights it feeds, norm gamma that produces it or None, weight whose output columns produce it)
GROUPS = (
    ("attn_in", ("qkv_weight",), "attn_norm_weight", None),
    ("mlp_in", ("gate_weight", "up_weight"), "mlp_norm_weight", None),
    ("down_in", ("down_weight",), None, "up_weight"),
)


def output_error(
    x: np.ndarray, weights: list[np.ndarray], bits: int, block: int, symmetric: bool = True
) -> float:
    """Mean squared error of ``x @ W`` against ``x @ Q(W)`` summed over ``weights``."""
    return sum(float(np.mean((x @ fake_quantize(w, bits, block, symmetric) - x @ w) ** 2)) for w in weights)


def search_scale(
    x: np.ndarray, weights: list[np.ndarray], bits: int, block: int, symmetric: bool = True
) -> np.ndarray:
    """The per-channel scale (K,) that minimises the quantized layers' output error on ``x``."""
    mean_abs = np.abs(x).mean(axis=0) + 1e-8
    best, best_s = np.inf, np.ones_like(mean_abs)
    for alpha in GRID:
        s = mean_abs**alpha
        s = s / np.sqrt(s.max() * s.min())
        err = output_error(x / s, [w * s[:, None] for w in weights], bits, block, symmetric)
        if err < best:
            best, best_s = err, s
    return best_s.astype(np.float32)


def apply_awq(
    model: onnx.ModelProto,
    contract: Contract,
    rows: list[np.ndarray],
    bits: int = 4,
    block: int = 32,
    symmetric: bool = True,
    sample: int = 512,
) -> onnx.ModelProto:
    """A copy of the in-place LLM graph with AWQ scales for ``bits``-bit codes folded in (same FP32 function)."""
    model_c = onnx.ModelProto()
    model_c.CopyFrom(model)
    inits = {t.name: t for t in model_c.graph.initializer}
    layers = num_layers(contract)
    taps = [layer_tap(contract, i, g[0]) for i in range(layers) for g in GROUPS]
    acts = capture_inplace(model_c, contract, taps, rows)
    rng = np.random.default_rng(0)

    def arr(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name]).astype(np.float32)

    def put(name: str, value: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))

    for i in range(layers):
        for act, weight_taps, gamma_tap, up_tap in GROUPS:
            x = acts[layer_tap(contract, i, act)]
            if len(x) > sample:
                x = x[rng.choice(len(x), sample, replace=False)]
            names = [layer_tap(contract, i, t) for t in weight_taps]
            ws = [arr(n) for n in names]
            s = search_scale(x, ws, bits, block, symmetric)
            for n, w in zip(names, ws, strict=True):
                put(n, w * s[:, None])
            if gamma_tap is not None:
                gamma = layer_tap(contract, i, gamma_tap)
                put(gamma, arr(gamma) / s)
            else:  # the activation is silu(gate) * up: dividing up's output columns (and bias) divides it
                up = layer_tap(contract, i, up_tap)
                put(up, arr(up) / s[None, :])
                bias = bias_after(model_c.graph, up, inits)
                if bias is not None:
                    put(bias, arr(bias) / s)
    return model_c


def bias_after(graph: onnx.GraphProto, weight: str, inits: dict[str, onnx.TensorProto]) -> str | None:
    """The initializer added to the output of the MatMul reading ``weight`` (LLaMA's ``mlp_bias``), if any."""
    outs = {n.output[0] for n in graph.node if n.op_type == "MatMul" and weight in n.input}
    for n in graph.node:
        if n.op_type == "Add" and outs.intersection(n.input):
            other = [x for x in n.input if x not in outs]
            if len(other) == 1 and other[0] in inits:
                return other[0]
    return None
