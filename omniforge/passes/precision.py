"""Precision guard: convert a graph to FP16 while norms and their reductions stay in FP32.

LayerNorm/RMSNorm in FP16 overflow in the variance (a known TensorRT issue), so those ops and
the reductions of decomposed norms are blocked from conversion; Casts at their borders are
inserted by ONNX Runtime's float16 converter.
"""

from __future__ import annotations

import onnx

FP32_OPS = [
    "LayerNormalization",
    "RMSNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "ReduceMean",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Softmax",
]


def to_fp16_keep_norms(model: onnx.ModelProto) -> onnx.ModelProto:
    """An FP16 copy of ``model`` whose norms compute in FP32; inputs and outputs stay FP32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    inferred = onnx.shape_inference.infer_shapes(model)  # the converter places Casts by value types
    return convert_float_to_float16(inferred, keep_io_types=True, op_block_list=FP32_OPS)
