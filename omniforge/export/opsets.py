"""The ONNX opsets a build can be made at (torch-free, so options are checked before any work).

Found by running export -> optimize -> quantize on the default model: at opset 13 the TorchScript
exporter fails (scaled-dot-product attention needs 14); 14 exports; at 21 export and the graph
passes succeed but INT8/INT4 quantization stops, because the quantized forms are made from opset-17
graphs only (the block-wise ``DequantizeLinear`` form raises the LLM from exactly 17 to 21). So 17
is the one opset every step supports.
"""

from __future__ import annotations

from omniforge.errors import ConfigError

DEFAULT_OPSET = 17
SUPPORTED_OPSETS = (17,)


def check_opset(opset: int) -> int:
    """``opset`` when export, the graph passes and quantization all support it; else ConfigError."""
    if opset not in SUPPORTED_OPSETS:
        raise ConfigError(
            f"ONNX opset {opset} is not supported: export, the graph passes and quantization all work "
            f"at opset {', '.join(map(str, SUPPORTED_OPSETS))} only"
        )
    return opset
