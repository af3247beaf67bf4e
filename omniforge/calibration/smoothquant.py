"""SmoothQuant: move activation outliers into the weights before INT8 (Xiao et al., 2022).

For every activation read by linear layers with constant weights, each input channel ``j`` gets
``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` from the captured activations ``X`` and the readers'
weights ``W``; the weights' rows are multiplied by ``s`` and the activation divided by it, so the
FP32 function is unchanged while the per-tensor activation range shrinks. When the activation is
a norm's output read only by those layers (the pattern the norm-folding pass folds), ``1/s`` goes
into the norm's gamma and beta; otherwise (a post-LN residual, a GELU output) a ``Mul`` by ``1/s``
is inserted before the linear layers. Written by hand: ONNX Runtime's SmoothQuant option
needs the neural-compressor package, and this is a few lines on top of the folding pass.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from omniforge.calibration.tensors import session_with_outputs
from omniforge.passes.base import PassReport, new_const
from omniforge.passes.fold_norm_linear import NORM_OPS, _affine, _linear_weight

Feeds = dict[str, np.ndarray]


def _candidates(model: ir.Model) -> list[tuple[ir.Value, ir.Node | None, list]]:
    """(activation, foldable norm producing it or None, [(linear node, W (K, N), transposed)]) for
    every activation read by linear layers with constant weights."""
    found = []
    seen: set[int] = set()
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or not node.inputs or node.inputs[0] is None:
            continue
        x = node.inputs[0]
        if id(x) in seen or _linear_weight(node, x) is None:
            continue
        seen.add(id(x))
        uses = [u for u in x.uses() if u.node.op_type != "Shape"]
        linears = [(u.node, _linear_weight(u.node, x)) for u in uses]
        linears = [(n, *w) for n, w in linears if w is not None]
        producer = x.producer()
        norm = None
        if (
            producer is not None
            and producer.op_type in NORM_OPS
            and _affine(producer) is not None
            and len(linears) == len(uses)
            and not x.is_graph_output()
        ):
            norm = producer
        found.append((x, norm, linears))
    return found


def channel_max(model: onnx.ModelProto, names: list[str], feeds: list[Feeds]) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |value| of the named tensors over ``feeds``."""
    sess = session_with_outputs(model, names)
    out: dict[str, np.ndarray] = {}
    for f in feeds:
        for n, v in zip(names, sess.run(names, f), strict=True):
            cur = np.abs(v.reshape(-1, v.shape[-1])).max(axis=0)
            out[n] = np.maximum(out[n], cur) if n in out else cur
    return out


def smooth_quant(
    model: onnx.ModelProto, feeds: list[Feeds], alpha: float = 0.5
) -> tuple[onnx.ModelProto, PassReport]:
    """A copy of ``model`` with SmoothQuant scales migrated into every smoothable norm's consumers."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    report = PassReport("smooth_quant")
    irm = ir.from_proto(model)
    cands = _candidates(irm)
    if not cands:
        return model, report
    act = channel_max(model, [x.name for x, _, _ in cands], feeds)
    graph = irm.graph
    for x, norm, linears in cands:
        a = act[x.name].astype(np.float64)
        w_max = np.max([np.abs(w).max(axis=1) for _, w, _ in linears], axis=0).astype(np.float64)
        s = np.power(np.maximum(a, 1e-5), alpha) / np.power(np.maximum(w_max, 1e-5), 1 - alpha)
        s = np.clip(s, 1e-4, 1e4)
        if norm is not None:  # fold 1/s into the norm's affine
            _, gamma, beta, _ = _affine(norm)
            label = norm.name or norm.op_type
            norm.replace_input_with(
                1, new_const(graph, f"{label}.smooth_gamma", (gamma / s).astype(gamma.dtype))
            )
            if beta is not None:
                norm.replace_input_with(
                    2, new_const(graph, f"{label}.smooth_beta", (beta / s).astype(beta.dtype))
                )
            smoothed = x
        else:  # the activation has other readers: the linear layers read x * (1/s) instead
            inv = new_const(graph, f"{x.name}.smooth_inv_scale", (1.0 / s).astype(np.float32))
            mul = ir.Node("", "Mul", [x, inv], name=f"{x.name}.smooth")
            first = min((n for n, _, _ in linears), key=lambda n: list(graph).index(n))
            graph.insert_before(first, mul)
            smoothed = mul.outputs[0]
            smoothed.name = f"{x.name}.smoothed"
            report.notes.append(f"inserted a Mul before the readers of {x.name}")
        for lin, w, transposed in linears:
            new_w = (w.astype(np.float64) * s[:, None]).astype(w.dtype)
            if smoothed is not x:
                lin.replace_input_with(0, smoothed)
            lin.replace_input_with(
                1,
                new_const(
                    graph, f"{lin.name or 'linear'}.smooth_weight", new_w.T.copy() if transposed else new_w
                ),
            )
        report.fired += 1
    return ir.to_proto(irm), report
