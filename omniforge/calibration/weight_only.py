"""Weight-only quantization of the LLM's linear layers (block-wise INT4 or INT8), ONNX Runtime's form.

``quantize_weights`` runs ONNX Runtime's ``MatMulNBitsQuantizer`` over every MatMul with a constant
weight, the LM head included, and returns ONNX Runtime's ``MatMulNBits`` graph
(``accuracy_level=4``: int8 compute inside the kernel), symmetric or asymmetric (a zero point per
block). AWQ (``awq``) rescales the weights before this call and GPTQ (``gptq``) overwrites its codes
after it; TensorRT's form (``DequantizeLinear`` W4A16 / W8A16, symmetric with positive scales) is
made from the canonical graph by ``standard_form`` with the same rounding (``codes``). The embedding table
(the ``token_embedding`` stage) is stored INT8 with a scale per row by ``quantize_embedding``: a
lookup reads one row per token, so it costs file size, not bandwidth.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx
from onnxruntime.quantization import QuantFormat
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from omniforge.errors import ConfigError

METHODS = ("rtn", "awq", "gptq")


@dataclass(frozen=True)
class WeightOnlyConfig:
    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4  # ORT MatMulNBits compute type: 4 = int8 activations
    method: str = "rtn"  # rtn | awq (activation-aware scales, then RTN) | gptq (error-correcting rounding)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError(f"weight-only quantization takes 4 or 8 bits, got {self.bits}")
        if self.method not in METHODS:
            raise ConfigError(f"weight-only method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if self.method == "gptq" and not self.symmetric:
            raise ConfigError("GPTQ is implemented for symmetric quantization only")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ConfigError(f"block size must be one of 16, 32, 64, 128, 256, got {self.block_size}")


def quantize_weights(model: onnx.ModelProto, cfg: WeightOnlyConfig) -> onnx.ModelProto:
    """A copy of ``model`` with every constant-weight MatMul quantized block-wise (the low-rank
    branches of switchable LoRA adapters stay FP32: their weights are inputs, bound per request)."""
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # the quantizer rewrites the graph it is given
    q = MatMulNBitsQuantizer(
        copy,
        bits=cfg.bits,
        block_size=cfg.block_size,
        is_symmetric=cfg.symmetric,
        accuracy_level=cfg.accuracy_level,
        quant_format=QuantFormat.QOperator,
        nodes_to_exclude=[n.name for n in copy.graph.node if n.name.startswith("lora.")],
    )
    q.process()
    return q.model.model


def quantize_embedding(model: onnx.ModelProto) -> onnx.ModelProto:
    """The embedding lookup with an INT8 table and one FP32 scale per row (standard ops).

    ``Gather(int8 table) -> Cast -> Mul(Gather(scales))``: a quarter of the FP32 table's size,
    exact to 1/254 of each row's largest entry.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    gather = next(n for n in model.graph.node if n.op_type == "Gather")
    tables = {t.name: t for t in model.graph.initializer}
    table = numpy_helper.to_array(tables[gather.input[0]]).astype(np.float32)  # (V, H)
    scale = np.abs(table).max(axis=1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.round(table / scale), -127, 127).astype(np.int8)
    ids, out = gather.input[1], gather.output[0]
    nodes = [
        helper.make_node("Gather", ["table_int8", ids], ["rows_int8"], axis=0),
        helper.make_node("Cast", ["rows_int8"], ["rows"], to=TensorProto.FLOAT),
        helper.make_node("Gather", ["row_scale", ids], ["scales"], axis=0),
        helper.make_node("Mul", ["rows", "scales"], [out]),
    ]
    graph = helper.make_graph(
        nodes,
        model.graph.name,
        list(model.graph.input),
        list(model.graph.output),
        [
            numpy_helper.from_array(q, "table_int8"),
            numpy_helper.from_array(scale.astype(np.float32), "row_scale"),
        ],
    )
    new = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="omniforge")
    new.ir_version = model.ir_version
    return new
