"""Activation-aware weight scaling (AWQ) before round-to-nearest, on the in-place LLM graph.

For each group of linear layers fed by the same activation, a per-input-channel scale
``s = mean|x| ** alpha`` is searched (alpha on a grid) to minimise the output error of the
layers quantized at the requested bit width, block size and symmetry, on activations captured
through the graph's contract taps (``search_scales``); the weights are multiplied by ``s`` and the
producer of the activation is divided by it, so the FP32 function is unchanged: QKV and gate/up
scale into the RMSNorm gammas, down_proj into up_proj's output columns (and its bias, where there
is one). The o_proj and the LM head (whose inputs have no foldable producer here) stay plain RTN.

``fold_scales`` folds the scales into the in-place graph (ONNX Runtime's ``MatMulNBits`` form is
quantized from it); ``fold_into_canonical`` folds the very same scales into the canonical graph
(TensorRT's ``DequantizeLinear`` form is quantized from it), whose weights it finds by value: the
in-place graph's weights as they are, column blocks of them (its fused QKV is the canonical
graph's q, k and v), or with the norm's gamma folded in (``passes.fold_norm_linear``, in an
optimized build), where the scaled gamma returns as a ``Mul`` after the norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from omniforge.calibration.codes import fake_quantize
from omniforge.calibration.tensors import capture_inplace, num_layers
from omniforge.errors import ExportError
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


@dataclass(frozen=True)
class LayerScale:
    """The scale (K,) searched for one of ``GROUPS`` in one decoder layer."""

    layer: int
    group: int  # index into GROUPS
    scale: np.ndarray


def search_scales(
    model: onnx.ModelProto,
    contract: Contract,
    rows: list[np.ndarray],
    bits: int = 4,
    block: int = 32,
    symmetric: bool = True,
    sample: int = 512,
) -> list[LayerScale]:
    """AWQ's scales for ``bits``-bit codes of the in-place LLM graph ``model``, layer by layer in
    the order of ``GROUPS`` (the order ``fold_scales`` applies them in)."""
    inits = {t.name: t for t in model.graph.initializer}
    layers = num_layers(contract)
    taps = [layer_tap(contract, i, g[0]) for i in range(layers) for g in GROUPS]
    acts = capture_inplace(model, contract, taps, rows)
    rng = np.random.default_rng(0)
    found = []
    for i in range(layers):
        for k, (act, weight_taps, _, _) in enumerate(GROUPS):
            x = acts[layer_tap(contract, i, act)]
            if len(x) > sample:
                x = x[rng.choice(len(x), sample, replace=False)]
            ws = [_array(inits[layer_tap(contract, i, t)]) for t in weight_taps]
            found.append(LayerScale(i, k, search_scale(x, ws, bits, block, symmetric)))
    return found


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
    return fold_scales(model, contract, search_scales(model, contract, rows, bits, block, symmetric, sample))


def fold_scales(model: onnx.ModelProto, contract: Contract, scales: list[LayerScale]) -> onnx.ModelProto:
    """A copy of the in-place LLM graph with ``scales`` folded in (same FP32 function)."""
    model_c = onnx.ModelProto()
    model_c.CopyFrom(model)
    inits = {t.name: t for t in model_c.graph.initializer}

    def arr(name: str) -> np.ndarray:
        return _array(inits[name])

    def put(name: str, value: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))

    for ls in scales:
        _, weight_taps, gamma_tap, up_tap = GROUPS[ls.group]
        s = ls.scale
        for n in (layer_tap(contract, ls.layer, t) for t in weight_taps):
            put(n, arr(n) * s[:, None])
        if gamma_tap is not None:
            gamma = layer_tap(contract, ls.layer, gamma_tap)
            put(gamma, arr(gamma) / s)
        else:  # the activation is silu(gate) * up: dividing up's output columns (and bias) divides it
            up = layer_tap(contract, ls.layer, up_tap)
            put(up, arr(up) / s[None, :])
            bias = bias_after(model_c.graph, up, inits)
            if bias is not None:
                put(bias, arr(bias) / s)
    return model_c


@dataclass(frozen=True)
class _Linear:
    """A canonical MatMul with a constant weight: the columns of an in-place weight it holds."""

    weight: str  # the canonical initializer
    tap: str  # the in-place weight
    columns: slice


def fold_into_canonical(
    canonical: onnx.ModelProto, inplace: onnx.ModelProto, contract: Contract, scales: list[LayerScale]
) -> onnx.ModelProto:
    """A copy of the canonical LLM graph with the AWQ ``scales`` of the in-place graph ``inplace``
    (unscaled) folded in as ``fold_scales`` folds them there, so both graphs quantize the same
    scaled weights: each scaled canonical weight is the in-place weight's scaled columns, the gamma
    (or, where ``passes.fold_norm_linear`` folded it into the weights, a ``Mul`` inserted after the
    norm) is the in-place scaled gamma, and up_proj's columns and bias are divided alike.

    Raises ``ExportError`` when a scaled layer has no canonical counterpart."""
    out = onnx.ModelProto()
    out.CopyFrom(canonical)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    ref = {t.name: t for t in inplace.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits:
            if len(inits[n.input[1]].dims) == 2:
                readers.setdefault(n.input[0], []).append(n)
    arrays = {name: _array(inits[name]) for group in readers.values() for name in (n.input[1] for n in group)}
    linears: dict[str, list[_Linear]] = {}  # in-place weight -> the canonical weights holding its columns

    def put(name: str, value: np.ndarray) -> None:
        arrays[name] = value.astype(np.float32)
        inits[name].CopyFrom(numpy_helper.from_array(arrays[name], name))

    for ls in scales:
        _, weight_taps, gamma_tap, up_tap = GROUPS[ls.group]
        s = ls.scale
        taps = [layer_tap(contract, ls.layer, t) for t in weight_taps]
        blocks = [_array(ref[t]) for t in taps]
        gamma = _array(ref[layer_tap(contract, ls.layer, gamma_tap)]) if gamma_tap else None
        found = _find(readers, arrays, taps, blocks, gamma)
        if found is None:
            raise ExportError(
                f"the canonical LLM graph has no MatMuls with layer {ls.layer}'s {', '.join(weight_taps)} "
                "weights, so the TensorRT form cannot carry AWQ's scales"
            )
        x, group = found
        for lin in group:
            linears.setdefault(lin.tap, []).append(lin)
            w = blocks[taps.index(lin.tap)][:, lin.columns]
            put(lin.weight, w * s[:, None])  # the in-place weight's scaled columns, gamma folded in or not
        if gamma is not None:
            _divide_activation(graph, inits, x, {lin.weight for lin in group}, gamma / s)
            continue
        for lin in linears.get(layer_tap(contract, ls.layer, up_tap), []):  # up's columns, and its bias
            cols = s[lin.columns]
            put(lin.weight, arrays[lin.weight] / cols[None, :])
            bias = bias_after(graph, lin.weight, inits)
            if bias is not None:
                inits[bias].CopyFrom(numpy_helper.from_array(_array(inits[bias]) / cols, bias))
        if not linears.get(layer_tap(contract, ls.layer, up_tap)):
            raise ExportError(
                f"the canonical LLM graph has no up_proj of layer {ls.layer} to carry AWQ's scale"
            )
    return out


def _find(
    readers: dict[str, list[onnx.NodeProto]],
    arrays: dict[str, np.ndarray],
    taps: list[str],
    blocks: list[np.ndarray],
    gamma: np.ndarray | None,
) -> tuple[str, list[_Linear]] | None:
    """The canonical MatMuls that read one tensor and hold, between them, every column of the
    in-place weights ``blocks`` (as they are or with ``gamma`` folded in): (that tensor, the MatMuls)."""
    whole = np.concatenate(blocks, axis=1)
    edges = np.cumsum([0] + [b.shape[1] for b in blocks])
    candidates = [whole] if gamma is None else [whole, gamma[:, None] * whole]
    for x, nodes in readers.items():
        ws = [arrays[n.input[1]] for n in nodes]
        if any(w.shape[0] != whole.shape[0] for w in ws) or sum(w.shape[1] for w in ws) != whole.shape[1]:
            continue
        for want in candidates:
            starts = [_columns_of(w, want) for w in ws]
            if None in starts or not _tile(starts, [w.shape[1] for w in ws]):
                continue
            group = []
            for n, w, start in zip(nodes, ws, starts, strict=True):
                k = int(np.searchsorted(edges, start, side="right")) - 1
                if start + w.shape[1] > edges[k + 1]:
                    return None  # a canonical weight straddles two in-place weights
                group.append(
                    _Linear(n.input[1], taps[k], slice(start - edges[k], start + w.shape[1] - edges[k]))
                )
            return x, group
    return None


def _tile(starts: list[int], widths: list[int]) -> bool:
    """Whether column ranges ``[start, start + width)`` cover ``[0, sum(widths))`` once each."""
    pos = 0
    for start, width in sorted(zip(starts, widths, strict=True)):
        if start != pos:
            return False
        pos += width
    return True


def _columns_of(w: np.ndarray, whole: np.ndarray) -> int | None:
    """The first column of ``whole`` at which ``w``'s columns stand, or None."""
    n = w.shape[1]
    for j in np.flatnonzero(np.isclose(whole[0], w[0, 0], rtol=1e-5, atol=1e-7)):
        if j + n <= whole.shape[1] and np.allclose(whole[:, j : j + n], w, rtol=1e-5, atol=1e-7):
            return int(j)
    return None


def _divide_activation(
    graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto], x: str, weights: set[str], gamma: np.ndarray
) -> None:
    """Make the norm output ``x``, as the MatMuls of ``weights`` read it, the in-place graph's scaled
    ``gamma`` times the normalised value: the norm's gamma ``Mul`` takes ``gamma`` where it is still
    there, else (``passes.fold_norm_linear`` folded it into the weights) a ``Mul`` by ``gamma`` is
    inserted before those MatMuls."""
    producer = next(n for n in graph.node if x in n.output)
    const = [i for i in producer.input if i in inits and list(inits[i].dims) == [len(gamma)]]
    if producer.op_type == "Mul" and len(const) == 1:
        others = [
            n for n in graph.node if x in n.input and not (n.op_type == "MatMul" and n.input[1] in weights)
        ]
        if others:
            raise ExportError(
                f"AWQ: the canonical LLM graph's norm output '{x}' has readers besides its MatMuls"
            )
        inits[const[0]].CopyFrom(numpy_helper.from_array(gamma.astype(np.float32), const[0]))
        return
    name = f"{x}_awq"
    graph.initializer.append(numpy_helper.from_array(gamma.astype(np.float32), f"{name}_gamma"))
    for n in graph.node:
        if n.op_type == "MatMul" and n.input[0] == x and n.input[1] in weights:
            n.input[0] = name
    at = list(graph.node).index(producer) + 1
    graph.node.insert(at, helper.make_node("Mul", [x, f"{name}_gamma"], [name], name=f"{producer.name}_awq"))


def _array(t: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(t).astype(np.float32)


def bias_after(graph: onnx.GraphProto, weight: str, inits: dict[str, onnx.TensorProto]) -> str | None:
    """The initializer added to the output of the MatMul reading ``weight`` (LLaMA's ``mlp_bias``), if any."""
    outs = {n.output[0] for n in graph.node if n.op_type == "MatMul" and weight in n.input}
    for n in graph.node:
        if n.op_type == "Add" and outs.intersection(n.input):
            other = [x for x in n.input if x not in outs]
            if len(other) == 1 and other[0] in inits:
                return other[0]
    return None
