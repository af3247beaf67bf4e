"""GPTQ on the in-place LLM graph, written straight into ONNX Runtime's ``MatMulNBits``.

Every linear weight the graph's contract names (QKV, o, gate, up and down of each layer, and the
LM head) gets the Hessian ``H = X^T X`` of its MatMul's input over the calibration tokens, and
codes from ``codes.gptq_codes`` (symmetric, block-wise; each rounding error spread over the
input channels not yet quantized). ONNX Runtime's quantizer lays the graph out (node attributes,
names); GPTQ then overwrites the packed weights and scales. A weight the contract names that the
graph does not hold, or that the quantized graph has no ``MatMulNBits`` for, stops the run: the
result would otherwise be RTN under a GPTQ label. Written by hand because no maintained
ONNX-level GPTQ exists (ONNX Runtime's own GPTQ path needs the neural-compressor package).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from omniforge.calibration.codes import gptq_codes, pack_matmul_nbits
from omniforge.calibration.tensors import hessians, inplace_prefill, matmul_inputs, num_layers
from omniforge.errors import ExportError
from omniforge.pipeline.contracts import Contract, layer_tap

LAYER_WEIGHTS = ("qkv_weight", "o_weight", "gate_weight", "up_weight", "down_weight")


def target_weights(contract: Contract) -> list[str]:
    """The linear weights of the in-place LLM graph that GPTQ quantizes, named by its contract."""
    layers = [layer_tap(contract, i, p) for i in range(num_layers(contract)) for p in LAYER_WEIGHTS]
    return [*layers, contract.tap("lm_head_weight")]


def _nbits_nodes(quantized: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Original weight name -> the ``MatMulNBits`` node ONNX Runtime's quantizer made for it."""
    return {
        n.input[1].rsplit("_Q", 1)[0]: n
        for n in quantized.graph.node
        if n.op_type == "MatMulNBits" and len(n.input) == 3
    }


def apply_gptq(
    fp32: onnx.ModelProto,
    quantized: onnx.ModelProto,
    contract: Contract,
    rows: list[np.ndarray],
    bits: int,
    block: int,
) -> onnx.ModelProto:
    """``quantized`` (the symmetric RTN ``MatMulNBits`` form of ``fp32``) with GPTQ weights and scales."""
    targets = target_weights(contract)
    readers = matmul_inputs(fp32)
    nodes = _nbits_nodes(quantized)
    missing = [w for w in targets if w not in readers or w not in nodes]
    if missing:
        raise ExportError(
            f"GPTQ cannot find the MatMul of {len(missing)} weight(s) the graph's contract names "
            f"(first: '{missing[0]}'); the graph does not match its contract"
        )
    hs = hessians(fp32, {w: readers[w] for w in targets}, [inplace_prefill(contract, r) for r in rows])
    weights = {t.name: t for t in fp32.graph.initializer}
    inits = {t.name: t for t in quantized.graph.initializer}
    for w_name in targets:
        node = nodes[w_name]
        q = gptq_codes(numpy_helper.to_array(weights[w_name]).astype(np.float32), hs[w_name], bits, block)
        packed = pack_matmul_nbits(q.codes, bits, block)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(packed, node.input[1]))
        shape = tuple(inits[node.input[2]].dims)
        scales = np.ascontiguousarray(q.scales.T).reshape(shape)
        inits[node.input[2]].CopyFrom(numpy_helper.from_array(scales, node.input[2]))
    return quantized
