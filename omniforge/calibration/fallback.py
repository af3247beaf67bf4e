"""INT8 with an accuracy-driven fallback: the most harmful layers stay FP32.

Two quantizers from ONNX Runtime, both with per-channel symmetric INT8 weights:

- ``dynamic``: activations quantized at run time (``reduce_range`` for CPUs without VNNI);
- ``static``: QDQ graph with per-tensor symmetric INT8 activations whose ranges come from
  calibration feeds (MinMax, Percentile or Entropy). Ranges are computed once and cached for all
  the trial quantizations below. The same QDQ file is what ONNX Runtime serves and what TensorRT
  builds explicit-INT8 engines from, so it is written in the form TensorRT parses: zero points 0,
  Q/DQ on both inputs of every quantized Conv/MatMul/Gemm (weights per output channel), and biases
  kept float (``QuantizeBias: False``): ORT's default INT32 bias ``DequantizeLinear`` is a type
  TensorRT does not dequantize. ONNX Runtime's CPU provider fuses the same ``QLinearConv`` /
  ``QLinearMatMul`` nodes from either form (measured with onnxruntime 1.32 on the default build's
  image UNet, VAE decoder and vocoder: the same fused node counts, the same cosine to FP32 to six
  digits, latency within run-to-run noise), so one file serves both.

The quantized outputs are compared with FP32 (cosine) on the calibration feeds; if the mean misses
the budget, each layer's sensitivity (the accuracy lost when only that layer is quantized) is
measured and the worst layers are kept FP32, one at a time, until the budget is met.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from omniforge.calibration.metrics import cosine
from omniforge.errors import ConfigError

Feeds = dict[str, np.ndarray]
CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}
MODES = ("dynamic", "static")
DEFAULT_BUDGET = 0.999  # mean cosine to FP32 on the calibration feeds that the fallback restores
DEFAULT_MAX_FP32_LAYERS = 8  # layers the fallback may keep FP32


@dataclass
class FallbackResult:
    mean_cosine: float
    min_cosine: float
    excluded: list[str] = field(default_factory=list)
    sensitivity: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Int8Config:
    """How layers are quantized; how many the fallback may keep FP32 is ``quantize_int8_with_fallback``'s."""

    mode: str = "dynamic"  # dynamic | static
    method: str = "minmax"  # static calibration: minmax | percentile | entropy
    op_types: tuple[str, ...] = ("MatMul", "Gemm")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"INT8 mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if self.method not in CALIBRATION_METHODS:
            raise ConfigError(
                f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got '{self.method}'"
            )


@contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice through the root logger; hush it for the call only."""
    root, quant = logging.getLogger(), logging.getLogger("onnxruntime.quantization")
    levels = root.level, quant.level
    root.setLevel(max(root.level, logging.ERROR))
    quant.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(levels[0])
        quant.setLevel(levels[1])


class _Reader(CalibrationDataReader):
    def __init__(self, feeds: list[Feeds]) -> None:
        self.feeds = feeds
        self.it = iter(feeds)

    def get_next(self) -> Feeds | None:
        return next(self.it, None)

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.it = iter(self.feeds[start_index:end_index])


def outputs(path: Path, feeds: list[Feeds], threads: int = 2, quick: bool = False) -> list[list[np.ndarray]]:
    """Every output of ``path`` on each feed; ``quick``: basic graph optimizations only (a trial
    session is created, run a few times and dropped, so creating it fast matters more)."""
    from omniforge.runtime.engine import SessionConfig, open_session

    sess = open_session(path, "trial" if quick else "measurement", SessionConfig(threads=threads))
    return [sess.run(None, f) for f in feeds]


class _Quantizer:
    """One configured ONNX Runtime quantizer; static ranges are calibrated on first use, then reused."""

    def __init__(self, src: Path, cfg: Int8Config, calibration: list[Feeds], work: Path) -> None:
        self.src, self.cfg, self.calibration = src, cfg, calibration
        self.cache = work / "ranges.json"
        model = onnx.load(str(src), load_external_data=False)
        self.layers = weight_layers(model, cfg.op_types)
        self.external_data = any(uses_external_data(t) for t in model.graph.initializer)

    def __call__(self, dst: Path, include: list[str] | None = None, exclude: list[str] | None = None) -> None:
        if not (include or self.layers):  # nothing with a constant weight: an empty list would mean "all"
            shutil.copyfile(self.src, dst)
            return
        with _quiet():
            self._quantize(dst, include, exclude)

    def _quantize(self, dst: Path, include: list[str] | None, exclude: list[str] | None) -> None:
        common = dict(
            per_channel=True,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(self.cfg.op_types),
            nodes_to_quantize=include or self.layers,
            nodes_to_exclude=exclude or [],
        )
        if self.cfg.mode == "dynamic":
            quantize_dynamic(
                str(self.src),
                str(dst),
                reduce_range=True,
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                **common,
            )
            return
        if not self.cache.is_file():
            self._calibrate()
        quantize_static(
            str(self.src),
            str(dst),
            _Reader(self.calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            calibrate_method=CALIBRATION_METHODS[self.cfg.method],
            calibration_cache_path=self.cache,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "QuantizeBias": False,  # float biases: TensorRT has no INT32 dequantization
                "DefaultTensorType": onnx.TensorProto.FLOAT,
            },
            **common,
        )

    def _calibrate(self) -> None:
        """Activation ranges, once. Done here rather than inside ``quantize_static`` because that
        call cannot set the histogram size, which leaves Entropy with one candidate threshold
        (the MinMax range), nor which tensors are calibrated (``_layers_only``)."""
        from onnxruntime.quantization.calibrate import save_tensors_data

        options: dict = {"symmetric": True}
        if self.cfg.method == "entropy":
            options.update(num_bins=2048, num_quantized_bins=255)
        calibrator = _layers_only(self.cfg.method, self.layers)(
            self.src,
            list(self.cfg.op_types),
            str(self.cache.with_name("augmented.onnx")),
            use_external_data_format=self.external_data,
            **options,
        )
        calibrator.augment_graph()
        calibrator.create_inference_session()
        calibrator.collect_data(_Reader(self.calibration))
        save_tensors_data(calibrator.compute_data(), self.cache)


def _layers_only(method: str, layers: list[str]) -> type:
    """ONNX Runtime's calibrator for ``method``, calibrating only the tensors of ``layers``.

    Its own choice is every node of the op types, so also attention's score and value MatMuls,
    which INT8 leaves FP32; at Stable Diffusion's 64 x 64 latents each score tensor is 1 GiB at
    batch 2, and a MinMax calibration reduces each one twice (a histogram method keeps it)."""
    from onnxruntime.quantization import calibrate

    base = {
        "minmax": calibrate.MinMaxCalibrater,
        "percentile": calibrate.PercentileCalibrater,
        "entropy": calibrate.EntropyCalibrater,
    }[method]
    names = set(layers)

    class LayersOnly(base):  # type: ignore[misc, valid-type]
        def select_tensors_to_calibrate(self, model: onnx.ModelProto):
            tensors, value_infos = super().select_tensors_to_calibrate(model)
            used = {t for n in model.graph.node if n.name in names for t in (*n.input, *n.output)}
            return tensors & used, value_infos

    return LayersOnly


def weight_layers(model: onnx.ModelProto, op_types: tuple[str, ...]) -> list[str]:
    """Names of the nodes of ``op_types`` whose weight is a constant: the layers INT8 applies to
    (an attention score MatMul of two activations stays FP32). ``model`` may be loaded without its
    external data."""
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [
        n.name
        for n in model.graph.node
        if n.op_type in op_types and n.name and len(n.input) > 1 and n.input[1] in consts
    ]


def _block(name: str) -> str:
    """The block a node belongs to, from its exported path name (``/unet/down_blocks.0/resnets.1/...``)."""
    parts = name.split("/")
    return "/".join(parts[:4]) if len(parts) > 4 else name


def sensitivity(layers: list[str], loss: Callable[[list[str]], float], limit: int) -> dict[str, float]:
    """Per-layer loss; for many layers, blocks are measured first and only the layers of the most
    harmful blocks one by one (a UNet has ~175 quantizable layers and each trial builds a session)."""
    if len(layers) <= 48:
        return {n: loss([n]) for n in layers}
    blocks: dict[str, list[str]] = {}
    for n in layers:
        blocks.setdefault(_block(n), []).append(n)
    by_block = {b: loss(ns) for b, ns in blocks.items()}
    out: dict[str, float] = {}
    for b in sorted(by_block, key=by_block.get, reverse=True):
        out.update({n: loss([n]) for n in blocks[b]})
        if len(out) >= max(24, 4 * limit):
            break
    return out


def _score(
    ref: list[list[np.ndarray]], got: list[list[np.ndarray]], reduce: Callable[[np.ndarray], np.ndarray]
) -> list[float]:
    return [cosine(reduce(a[0]), reduce(b[0])) for a, b in zip(ref, got, strict=True)]


def quantize_int8_with_fallback(
    src: Path,
    dst: Path,
    calibration: list[Feeds],
    budget: float = DEFAULT_BUDGET,
    max_fp32_layers: int = DEFAULT_MAX_FP32_LAYERS,
    reduce: Callable[[np.ndarray], np.ndarray] = lambda x: x,
    config: Int8Config | None = None,
) -> FallbackResult:
    """Write ``dst``: ``src`` in INT8, keeping up to ``max_fp32_layers`` layers FP32 until the mean
    cosine on ``calibration`` >= ``budget``."""
    cfg = config or Int8Config()
    limit = max_fp32_layers
    ref = outputs(src, calibration)
    with tempfile.TemporaryDirectory() as td:
        quant = _Quantizer(src, cfg, calibration, Path(td))
        trial = Path(td) / "trial.onnx"
        quant(trial)
        scores = _score(ref, outputs(trial, calibration), reduce)
        result = FallbackResult(float(np.mean(scores)), float(np.min(scores)))
        if result.mean_cosine < budget and limit > 0:
            # accuracy lost when only these layers are INT8, on up to 4 evenly spaced feeds
            pick = sorted(set(np.linspace(0, len(calibration) - 1, min(4, len(calibration))).astype(int)))
            probe, probe_ref = [calibration[i] for i in pick], [ref[i] for i in pick]

            def loss(names: list[str]) -> float:
                quant(trial, include=names)
                return 1.0 - float(np.mean(_score(probe_ref, outputs(trial, probe, quick=True), reduce)))

            result.sensitivity = sensitivity(quant.layers, loss, limit)
            order = sorted(result.sensitivity, key=result.sensitivity.get, reverse=True)
            for name in order[:limit]:
                result.excluded.append(name)
                quant(trial, exclude=result.excluded)
                scores = _score(ref, outputs(trial, calibration), reduce)
                result.mean_cosine, result.min_cosine = float(np.mean(scores)), float(np.min(scores))
                if result.mean_cosine >= budget:
                    break
        quant(dst, exclude=result.excluded)
    return result
