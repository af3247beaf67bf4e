"""Reading a graph's intermediate tensors: the calibration methods' one way in.

The in-place LLM graph is read through its contract: the embedding rows, sequence lengths and
KV-cache buffers are bound by the contract's slots and in-place pairs, and the tensors read are
named by its taps. The canonical LLM graph is fed through its stage description (the embedding
rows are its first input, the others take their described fill).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from omniforge.pipeline.contracts import Contract, Slot
from omniforge.pipeline.spec import StageSpec


def session_with_outputs(model: onnx.ModelProto, names: list[str]) -> ort.InferenceSession:
    """A CPU session of ``model`` whose outputs are its own followed by the tensors ``names``."""
    if not names:
        raise ValueError("no intermediate tensors named")  # run(names=[]) would mean "all outputs"
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in names:
        m.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    from omniforge.runtime.engine import open_session

    return open_session(m.SerializeToString(), "measurement")


def num_layers(contract: Contract) -> int:
    """Decoder layers of the in-place LLM graph: one key and one value pair each."""
    return len(contract.inplace) // 2


def inplace_prefill(contract: Contract, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds of one sequence's prefill (B=1, no past) of the in-place LLM graph: ``rows`` (S, H)
    bound to the embeddings slot and an empty cache of length S for every in-place pair."""
    s = rows.shape[0]
    feeds = {
        contract.slot(Slot.EMBEDS): rows[None].astype(np.float32),
        contract.slot(Slot.SEQLENS): np.array([s - 1], np.int32),
        contract.slot(Slot.TOTAL): np.array(s, np.int32),
    }
    specs = {t.name: t for t in contract.inputs}
    sizes = {d.name: s for d in contract.dims} | {"batch": 1}
    for pair in contract.inplace:
        feeds[pair.input] = np.zeros(specs[pair.input].concrete_shape(sizes), np.float32)
    return feeds


def canonical_prefill(spec: StageSpec, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds of one sequence's prefill (B=1, empty past) of the canonical LLM graph."""
    s = rows.shape[0]
    feeds = spec.sample_inputs({"batch": 1, "seq": s, "past": 0, "total": s})
    feeds[spec.inputs[0].name] = rows[None].astype(np.float32)
    return feeds


def capture(
    model: onnx.ModelProto, names: list[str], feeds: list[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Values of the tensors ``names`` over ``feeds``, as (tokens, last axis) rows."""
    sess = session_with_outputs(model, names)
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for f in feeds:
        for n, v in zip(names, sess.run(names, f), strict=True):
            out[n].append(v.reshape(-1, v.shape[-1]))
    return {n: np.concatenate(v) for n, v in out.items()}


def capture_inplace(
    model: onnx.ModelProto, contract: Contract, names: list[str], rows: list[np.ndarray]
) -> dict[str, np.ndarray]:
    """Values of ``names`` of the in-place LLM graph over prefills of the embedding ``rows``."""
    return capture(model, names, [inplace_prefill(contract, r) for r in rows])


def hessians(
    model: onnx.ModelProto, inputs: dict[str, str], feeds: list[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """``X^T X / tokens`` (float64) per weight of ``inputs`` (weight -> the tensor its MatMul reads)."""
    names = sorted(set(inputs.values()))
    sess = session_with_outputs(model, names)
    acc: dict[str, np.ndarray] = {}
    count = 0
    for f in feeds:
        for n, v in zip(names, sess.run(names, f), strict=True):
            x = v.reshape(-1, v.shape[-1]).astype(np.float64)
            acc[n] = acc[n] + x.T @ x if n in acc else x.T @ x
        count += x.shape[0]
    return {w: acc[x] / count for w, x in inputs.items()}


def matmul_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """Constant 2-D weight -> the activation its MatMul reads, for every such MatMul of ``model``."""
    weights = {t.name for t in model.graph.initializer if len(t.dims) == 2}
    return {
        n.input[1]: n.input[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights
    }
