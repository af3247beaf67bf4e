"""Fold a norm's affine (gamma, beta) into the Linear layers it feeds.

``LN(x) @ W + b == norm(x) @ (diag(gamma) W) + (beta @ W + b)``: when every consumer of a norm's
output is a MatMul/Gemm with constant weights, the scale and shift move into those weights
(computed in float64) and the norm is left with gamma = 1, beta = 0 (the SpinQuant/QuaRot
``fuse_ln_linear`` identity, and the base of SmoothQuant). Handles ``LayerNormalization``,
``RMSNormalization``, ORT's ``SimplifiedLayerNormalization`` and the decomposed RMSNorm tail
(``Mul(x * rsqrt(mean(x^2) + eps), gamma)``) that traced LLaMA graphs contain. A norm with any
other consumer, or whose output is a graph output, is left alone and reported.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from omniforge.passes.base import PassReport, const_array, new_const

NORM_OPS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"}


def _linear_weight(node: ir.Node, y: ir.Value) -> tuple[np.ndarray, bool] | None:
    """(W as (K, N), whether stored transposed) if ``node`` is a linear layer applied to ``y``."""
    if node.op_type == "MatMul" and node.inputs[0] is y and node.inputs[1] is not None:
        w = const_array(node.inputs[1])
        return (w, False) if w is not None and w.ndim == 2 else None
    if node.op_type == "Gemm" and node.inputs[0] is y:
        attrs = node.attributes
        if attrs.get("transA") and attrs["transA"].as_int():
            return None
        if attrs.get("alpha") and attrs["alpha"].as_float() != 1.0:
            return None
        w = const_array(node.inputs[1])
        if w is None or w.ndim != 2:
            return None
        trans = bool(attrs.get("transB") and attrs["transB"].as_int())
        return (w.T, True) if trans else (w, False)
    return None


def _bias_add(node: ir.Node) -> ir.Node | None:
    """The Add(MatMul, const bias) right after a MatMul, if that is its only use."""
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add":
        return None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    b = const_array(other)
    return add if b is not None and b.ndim == 1 else None


def _affine(node: ir.Node) -> tuple[ir.Value, np.ndarray, np.ndarray | None, list[int]] | None:
    """(normed output, gamma, beta, input slots to reset) of a foldable norm node, else None."""
    if node.op_type in NORM_OPS:
        axis = node.attributes.get("axis")
        if axis is not None and axis.as_int() != -1:
            rank = node.inputs[0].shape.rank() if node.inputs[0].shape is not None else None
            if rank is None or axis.as_int() != rank - 1:
                return None
        gamma = const_array(node.inputs[1])
        beta = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if (
            gamma is None
            or gamma.ndim != 1
            or (len(node.inputs) > 2 and node.inputs[2] is not None and beta is None)
        ):
            return None
        return node.outputs[0], gamma, beta, [1, 2] if beta is not None else [1]
    if node.op_type == "Mul":  # decomposed RMSNorm tail: Mul(normalized, gamma)
        for gi in (0, 1):
            gamma = const_array(node.inputs[gi])
            x = node.inputs[1 - gi]
            if gamma is not None and gamma.ndim == 1 and x is not None and _is_normalized(x):
                return node.outputs[0], gamma, None, [gi]
    return None


def _op(v: ir.Value | None) -> str:
    p = v.producer() if v is not None else None
    return p.op_type if p is not None else ""


def _is_normalized(v: ir.Value) -> bool:
    """True if ``v`` is ``x * Reciprocal(Sqrt(..))``, ``x * (1 / Sqrt(..))`` or ``x / Sqrt(..)``."""
    p = v.producer()
    if p is None:
        return False
    if p.op_type == "Div":
        return _op(p.inputs[1]) == "Sqrt"
    if p.op_type != "Mul":
        return False
    for inp in p.inputs:
        q = inp.producer() if inp is not None else None
        if q is None:
            continue
        if q.op_type == "Reciprocal" and _op(q.inputs[0]) == "Sqrt":
            return True
        if q.op_type == "Div" and _op(q.inputs[1]) == "Sqrt":
            one = const_array(q.inputs[0])
            if one is not None and one.size == 1 and float(one.reshape(())) == 1.0:
                return True
    return False


def fold_norm_into_linear(model: ir.Model) -> PassReport:
    """Fold every foldable norm affine into its consumers, in place."""
    report = PassReport("fold_norm_linear")
    graph = model.graph
    for node in list(graph):
        found = _affine(node)
        if found is None:
            continue
        y, gamma, beta, reset = found
        label = node.name or node.op_type
        if np.allclose(gamma, 1.0) and (beta is None or np.allclose(beta, 0.0)):
            continue  # already trivial
        if y.is_graph_output():
            report.notes.append(f"kept {label}: its output is a graph output")
            continue
        uses = [u for u in y.uses() if u.node.op_type != "Shape"]  # Shape reads no values
        weights = [_linear_weight(u.node, y) for u in uses]
        if not uses or any(w is None for w in weights):
            kinds = sorted({u.node.op_type for u, w in zip(uses, weights, strict=True) if w is None})
            report.notes.append(
                f"kept {label}: consumers {kinds} are not linear layers with constant weights"
            )
            continue
        if any(w.shape[0] != gamma.shape[0] for w, _ in weights):  # type: ignore[union-attr]
            report.notes.append(f"kept {label}: weight shapes do not match the norm width")
            continue
        g64 = gamma.astype(np.float64)
        for use, (w, transposed) in zip(uses, weights, strict=True):  # type: ignore[misc]
            lin = use.node
            w64 = w.astype(np.float64)
            new_w = (g64[:, None] * w64).astype(w.dtype)
            lin.replace_input_with(
                1,
                new_const(
                    graph, f"{lin.name or 'linear'}.folded_weight", new_w.T.copy() if transposed else new_w
                ),
            )
            if beta is None or np.allclose(beta, 0.0):
                continue
            shift = beta.astype(np.float64) @ w64  # (N,)
            if lin.op_type == "Gemm":
                c = const_array(lin.inputs[2]) if len(lin.inputs) > 2 and lin.inputs[2] is not None else 0.0
                new_c = (np.asarray(c, np.float64) + shift).astype(w.dtype)
                if len(lin.inputs) < 3:
                    lin.resize_inputs(3)
                lin.replace_input_with(2, new_const(graph, f"{lin.name or 'gemm'}.folded_bias", new_c))
                continue
            add = _bias_add(lin)
            if add is not None:
                bi = 1 if add.inputs[0] is lin.outputs[0] else 0
                b = const_array(add.inputs[bi]).astype(np.float64)
                add.replace_input_with(
                    bi, new_const(graph, f"{add.name or 'add'}.folded_bias", (b + shift).astype(w.dtype))
                )
            else:  # create the bias
                out = lin.outputs[0]
                later = list(out.uses())  # before the new Add becomes a use itself
                bias = new_const(graph, f"{lin.name or 'matmul'}.folded_bias", shift.astype(w.dtype))
                new_add = ir.Node("", "Add", [out, bias], name=f"{lin.name or 'matmul'}.folded_add")
                graph.insert_after(lin, new_add)
                for u in later:
                    u.node.replace_input_with(u.idx, new_add.outputs[0])
                if out.is_graph_output():  # the graph output moves to the Add, keeping its name
                    name = out.name
                    graph.outputs[graph.outputs.index(out)] = new_add.outputs[0]
                    out.name = f"{name}.unbiased"
                    new_add.outputs[0].name = name
        if node.op_type == "Mul":  # the tail Mul disappears: consumers read the normalized value
            x = node.inputs[1 - reset[0]]
            y.replace_all_uses_with(x)
            graph.remove(node, safe=True)
        else:
            node.replace_input_with(1, new_const(graph, f"{label}.unit_scale", np.ones_like(gamma)))
            if beta is not None:
                node.replace_input_with(2, new_const(graph, f"{label}.zero_bias", np.zeros_like(beta)))
        report.fired += 1
    return report
