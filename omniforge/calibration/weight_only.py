"""Weight-only quantization of the LLM's linear layers (block-wise INT4 or INT8).

Built on ONNX Runtime's ``MatMulNBitsQuantizer``: the ONNX Runtime form is ``MatMulNBits``
(``accuracy_level=4`` lets the kernel use int8 dot products on CPUs without VNNI too); the
standard-ONNX form, for TensorRT, is a block-wise ``DequantizeLinear`` (opset 21) feeding a
``MatMul``. Every MatMul with a constant weight is quantized, the LM head included; the
embedding table stays FP32 in the ``token_embedding`` stage (a lookup reads one row per token,
so it costs no bandwidth per step, only file size).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx
from onnxruntime.quantization import QuantFormat
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from omniforge.errors import ConfigError


@dataclass(frozen=True)
class WeightOnlyConfig:
    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4  # ORT MatMulNBits compute type: 4 = int8 activations
    standard_onnx: bool = False  # DequantizeLinear + MatMul instead of MatMulNBits

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError(f"weight-only quantization takes 4 or 8 bits, got {self.bits}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ConfigError(f"block size must be one of 16, 32, 64, 128, 256, got {self.block_size}")


def quantize_weights(model: onnx.ModelProto, cfg: WeightOnlyConfig) -> onnx.ModelProto:
    """A copy of ``model`` with every constant-weight MatMul quantized block-wise."""
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    q = MatMulNBitsQuantizer(
        model,
        bits=cfg.bits,
        block_size=cfg.block_size,
        is_symmetric=cfg.symmetric,
        accuracy_level=None if cfg.standard_onnx else cfg.accuracy_level,
        quant_format=QuantFormat.QDQ if cfg.standard_onnx else QuantFormat.QOperator,
    )
    q.process()
    return q.model.model
