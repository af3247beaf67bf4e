"""What TensorRT's ONNX parser documents as supported, per TensorRT version omniforge targets.

Sources (read from the public onnx/onnx-tensorrt and NVIDIA TensorRT documentation):

- ``docs/operators.md`` of onnx-tensorrt: the 10.1 GA table (its header: opset 9 to 20; 10.2 and
  10.3 added no operator), the 10.15 GA table (opset 9 to 24) and ``docs/Changelog.md`` for what
  each release between added;
- TensorRT 11.0 release notes (``Swish``; strongly typed networks only), the TensorRT 11.x ONNX
  opset guide (opset 9 and above) and 11.5 notes (opset 25 added in 11.5, so 24 before it);
- the Quantize / Dequantize operator pages (10.x: block quantization for INT4 only, 2-D; 11.x:
  INT4, FP4, FP8 and INT8) and the 11.x "Quantization Schemes" page (INT4 block sizes 64, 128).
"""

from __future__ import annotations

from dataclasses import dataclass

from onnx import TensorProto as T

# onnx-tensorrt docs/operators.md, TensorRT 10.1 GA: every operator marked "Y"
_OPS_10_1 = frozenset(
    """Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast
    CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv
    DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU
    Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
    GreaterOrEqual GridSample GroupNormalization HardSigmoid HardSwish Hardmax Identity If ImageScaler
    InstanceNormalization IsInf IsNaN LRN LSTM LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
    Loop LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg
    NonMaxSuppression NonZero Not OneHot Or PRelu Pad ParametricSoftplus Pow QuantizeLinear RNN RandomNormal
    RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
    ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
    ReverseSequence RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink
    Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan
    Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor""".split()
)
# Changelog: 10.4 window functions, 10.5 real-valued STFT
_OPS_10_12 = _OPS_10_1 | {"BlackmanWindow", "HammingWindow", "HannWindow", "STFT"}
# Changelog: 10.14 Attention; 10.15 RotaryEmbedding, RMSNormalization, TensorScatter; 11.0 Swish
_OPS_11 = _OPS_10_12 | {"Attention", "RotaryEmbedding", "RMSNormalization", "TensorScatter", "Swish"}

FP8 = {T.FLOAT8E4M3FN}
FP4 = {getattr(T, "FLOAT4E2M1", -1)} - {-1}  # onnx >= 1.18 names it
FLOATS = frozenset({T.FLOAT, T.FLOAT16, T.BFLOAT16})


@dataclass(frozen=True)
class TrtVersion:
    """One TensorRT release as its ONNX parser documents it."""

    name: str
    opsets: tuple[int, int]  # inclusive range of the default (ai.onnx) domain
    ops: frozenset[str]
    dequantize_types: frozenset[int]  # DequantizeLinear input / QuantizeLinear output types
    block_types: frozenset[int]  # types that may be block-quantized
    block_rank: int | None  # the rank a block-quantized tensor must have (None: no rule)
    int4_block_sizes: frozenset[int] | None  # None: the version documents no restriction
    strongly_typed: bool  # rules of strongly typed networks apply (11: the only mode)
    constant_inputs: dict[str, tuple[int, str]]  # op -> (input index, what) that must be constant
    opset_source: str


_REDUCE = {
    op: (1, "axes")
    for op in (
        "ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd "
        "ReduceSum ReduceSumSquare"
    ).split()
}
# "must be an initializer / a build-time constant" in the Restrictions column
_CONSTANT_10 = {
    "CumSum": (1, "axis"),
    "Dropout": (2, "training_mode"),
    "OneHot": (1, "depth"),
    "Squeeze": (1, "axes"),
    "Unsqueeze": (1, "axes"),
    **_REDUCE,
}

VERSIONS: dict[str, TrtVersion] = {
    "10.3": TrtVersion(
        "10.3",
        (9, 20),
        _OPS_10_1,
        frozenset({T.INT8, T.INT4, *FP8}),
        frozenset({T.INT4}),
        2,
        None,
        False,
        {**_CONSTANT_10, "Pad": (3, "axes")},  # Pad tensor axes: 10.4
        "operators.md 10.1 GA header (10.2, 10.3 change no operator)",
    ),
    "10.12": TrtVersion(
        "10.12",
        (9, 22),
        _OPS_10_12,
        frozenset({T.INT8, T.INT4, *FP8, *FP4}),  # FP4: 10.8
        frozenset({T.INT4, *FP4}),
        2,
        None,
        True,
        dict(_CONSTANT_10),
        "operators.md header after the ONNX 1.17 update (10.6); the 10.12 page itself was not read",
    ),
    "11": TrtVersion(
        "11",
        (9, 24),
        _OPS_11,
        frozenset({T.INT8, T.INT4, *FP8, *FP4}),
        frozenset({T.INT4, T.INT8, *FP8, *FP4}),
        None,
        frozenset({64, 128}),
        True,
        dict(_CONSTANT_10),
        "11.x ONNX opset guide (opset 9 and above); opset 25 arrived in 11.5",
    ),
}


def version(name: str) -> TrtVersion:
    from omniforge.errors import ConfigError

    if name not in VERSIONS:
        raise ConfigError(f"TensorRT version '{name}' is not one check-trt knows (use {', '.join(VERSIONS)})")
    return VERSIONS[name]
