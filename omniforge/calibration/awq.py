"""Activation-aware weight scaling (AWQ) before INT4 round-to-nearest, on the in-place LLM graph.

For each group of linear layers fed by the same activation, a per-input-channel scale
``s = mean|x| ** alpha`` is searched (alpha on a grid) to minimise the output error of the
block-quantized layer on captured activations; the weights are multiplied by ``s`` and the
producer of the activation is divided by it, so the FP32 function is unchanged:
QKV and gate/up scale into the RMSNorm gammas, down_proj into up_proj's output columns.
The o_proj and the LM head (whose inputs have no foldable producer here) stay plain RTN.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from omniforge.calibration.tensors import session_with_outputs

GRID = np.linspace(0.0, 1.0, 11)


def _fake_quant(w: np.ndarray, block: int) -> np.ndarray:
    """Symmetric 4-bit block-wise round-to-nearest of a (K, N) weight, dequantized, exactly as
    ONNX Runtime's quantizer rounds it (the block's largest-magnitude value maps to -8)."""
    from omniforge.calibration.standard_form import rtn_codes

    codes, scales = rtn_codes(w, 4, block)
    return codes * np.repeat(scales, block, axis=0)[: w.shape[0]]


def capture(model: onnx.ModelProto, names: list[str], rows: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Values of ``names`` (B=1 prefill, no past) of the in-place LLM graph over calibration
    sequences of embedding rows."""
    sess = session_with_outputs(model, names)
    past = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for r in rows:
        s = r.shape[0]
        feeds = {
            "inputs_embeds": r[None].astype(np.float32),
            "seqlens_k": np.array([s - 1], np.int32),
            "total_sequence_length": np.array(s, np.int32),
        }
        for p in past:  # (batch, kv heads, cache length, head dim): an empty cache of length s
            feeds[p.name] = np.zeros((1, p.shape[1], s, p.shape[3]), np.float32)
        values = sess.run(names, feeds)
        for n, v in zip(names, values, strict=True):
            out[n].append(v.reshape(-1, v.shape[-1]))
    return {n: np.concatenate(v) for n, v in out.items()}


def _search(x: np.ndarray, weights: list[np.ndarray], block: int) -> np.ndarray:
    """The per-channel scale (K,) that minimises the quantized layers' output error on ``x``."""
    mean_abs = np.abs(x).mean(axis=0) + 1e-8
    ref = [x @ w for w in weights]
    best, best_s = np.inf, np.ones_like(mean_abs)
    for alpha in GRID:
        s = mean_abs**alpha
        s = s / np.sqrt(s.max() * s.min())
        err = sum(
            float(np.mean(((x / s) @ _fake_quant(w * s[:, None], block) - r) ** 2))
            for w, r in zip(weights, ref, strict=True)
        )
        if err < best:
            best, best_s = err, s
    return best_s.astype(np.float32)


def apply_awq(
    model: onnx.ModelProto, rows: list[np.ndarray], block: int = 32, sample: int = 512
) -> onnx.ModelProto:
    """A copy of the in-place LLM graph with AWQ scales folded in (same FP32 function)."""
    model_c = onnx.ModelProto()
    model_c.CopyFrom(model)
    inits = {t.name: t for t in model_c.graph.initializer}
    layers = sum(1 for n in model_c.graph.node if n.op_type == "GroupQueryAttention")
    names = [f"layers.{i}.{k}" for i in range(layers) for k in ("norm1", "norm2", "act")]
    acts = capture(model_c, names, rows)
    rng = np.random.default_rng(0)

    def arr(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name]).astype(np.float32)

    def put(name: str, value: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))

    for i in range(layers):
        p = f"layers.{i}"
        groups = [
            ("norm1", [f"{p}.qkv.weight"], f"{p}.input_layernorm.weight", None),
            ("norm2", [f"{p}.gate.weight", f"{p}.up.weight"], f"{p}.post_attention_layernorm.weight", None),
            ("act", [f"{p}.down.weight"], None, f"{p}.up.weight"),
        ]
        for key, weight_names, gamma_name, up_name in groups:
            x = acts[f"{p}.{key}"]
            if len(x) > sample:
                x = x[rng.choice(len(x), sample, replace=False)]
            ws = [arr(n) for n in weight_names]
            s = _search(x, ws, block)
            for n, w in zip(weight_names, ws, strict=True):
                put(n, w * s[:, None])
            if gamma_name is not None:
                put(gamma_name, arr(gamma_name) / s)
            else:  # the activation is silu(gate) * up: dividing up's output columns divides it
                put(up_name, arr(up_name) / s[None, :])
    return model_c
