"""``quantize`` over a build, one stage at a time, each stage by the quantizer of its kind and precision.

- LLM (int4/int8): weight-only (RTN, AWQ or GPTQ) as ONNX Runtime's ``MatMulNBits`` in-place
  graph, plus the standard-ONNX form TensorRT consumes (``standard_form``: W4A16 with INT4 blocks
  of 64 or 128 at opset 21, or W8A16 per-channel INT8 at opset 19; symmetric, positive scales);
- token embedding (int8): INT8 table, one scale per row;
- encoders, projectors, UNets, VAE decoders, vocoder (int8): INT8 with the accuracy-driven
  fallback. Static QDQ (calibrated on inputs captured from the FP32 pipeline, the TensorRT-ready
  form) for stages with convolutions, and for every stage when ``int8_mode`` is ``static``; ONNX
  Runtime's dynamic INT8 for the transformer-only stages otherwise (faster on CPUs, measured);
- any stage but the LLM and the embedding (fp16): FP16 with norms kept FP32.

What each report measures, on what:

- INT8 and FP16 stages: cosine, SNR and max error of every output against the FP32 graph on the
  held-out captured calls (every fourth recorded call, never calibrated on); a stage the capture
  did not reach (or a build quantized without a capture) is measured on seeded inputs at each of
  its profile points, and the token embedding always on seeded token ids;
- the LLM: top-1 agreement, KL divergence and cosine of next-token logits of the in-place graph
  against FP32 over a seeded 12-row prompt and 24 seeded decode rows (both graphs fed the same
  rows), and the standard form's output cosine on seeded inputs at the stage's profile points.

AWQ and GPTQ calibrate on the captured LLM prompt rows plus the shipped text. The report lands in
the build (``quantize.json`` / ``quantize.md``). With ``stage_cache`` each stage's result is cached
under a key of its FP32 graph's SHA-256 and the options, so changing one stage's precision redoes
only it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import onnx
import onnxruntime as ort

from omniforge.calibration import capture as calib
from omniforge.calibration.capture import CalibrationInputs
from omniforge.calibration.fallback import (
    DEFAULT_BUDGET,
    DEFAULT_MAX_FP32_LAYERS,
    Int8Config,
    quantize_int8_with_fallback,
)
from omniforge.calibration.metrics import cosine, kl_divergence, snr_db, top1_agreement
from omniforge.calibration.weight_only import WeightOnlyConfig, quantize_embedding, quantize_weights
from omniforge.errors import ConfigError
from omniforge.pipeline.atomic import atomic_folder
from omniforge.pipeline.contracts import Contract, Role, Slot
from omniforge.pipeline.manifest import (
    Manifest,
    StageBuild,
    Variant,
    atomic_write_text,
    collect_artifacts,
    load_manifest,
    runtime_file,
    stage_files,
    write_manifest,
)
from omniforge.pipeline.precision import QUANTIZED_PRECISIONS, STAGE_PRECISIONS, Precision, weight_bits
from omniforge.pipeline.spec import StageKind, StageSpec

if TYPE_CHECKING:
    from omniforge.calibration.awq import LayerScale

INT8_MODES = ("auto", "static", "dynamic")
# the version of the quantized graphs' forms, part of every quantization cache key: raise it when a
# form changes, so cached stages made in the old form are not reused (2: float biases in static
# QDQ graphs; TensorRT's weight-only LLM form with positive scales, per-channel INT8, INT4 blocks
# of 64/128, FP16 activations; 3: FP16 graphs with decomposed norms FP32 up to their normalised
# output; the AWQ scales in TensorRT's weight-only form)
FORM_VERSION = 3
CONV_KINDS = {StageKind.DECODER, StageKind.VAE, StageKind.VOCODER}  # UNets, VAE decoders, vocoder
STAGE_METRICS = ("cosine_min", "snr_db_min", "max_abs_err")  # what _stage_metrics measures
LLM_METRICS = ("top1_agreement", "kl_divergence", "logits_cosine")  # what _llm_metrics measures


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything that shapes a quantized stage besides its precision (part of the cache key)."""

    weight_only: WeightOnlyConfig = field(default_factory=WeightOnlyConfig)  # bits follow the precision
    int8_mode: str = "auto"  # auto: static QDQ for convolution stages, dynamic for the others
    calibration_method: str = "minmax"  # static INT8 ranges: minmax | percentile | entropy
    smoothquant_alpha: float | None = None  # SmoothQuant before static INT8 of MatMul stages
    budget: float = DEFAULT_BUDGET  # mean cosine to FP32 on calibration inputs the INT8 fallback restores
    max_fp32_layers: int = DEFAULT_MAX_FP32_LAYERS  # layers the INT8 fallback may keep FP32
    standard_form: bool = True  # LLM: also the DequantizeLinear graph for TensorRT (W4A16 / W8A16)
    end_to_end: bool = True  # measure image PSNR / audio SNR / token agreement against the FP32 pipeline
    calibration: CalibrationInputs | None = None  # default: CalibrationInputs.default()

    def __post_init__(self) -> None:
        if self.int8_mode not in INT8_MODES:
            raise ConfigError(f"INT8 mode must be one of {', '.join(INT8_MODES)}, got '{self.int8_mode}'")
        Int8Config(method=self.calibration_method)  # validates the method
        if self.smoothquant_alpha is not None and not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ConfigError(f"SmoothQuant alpha must be in [0, 1], got {self.smoothquant_alpha}")
        if not 0.0 <= self.budget <= 1.0:
            raise ConfigError(f"the INT8 budget is a mean cosine in [0, 1], got {self.budget}")
        if self.max_fp32_layers < 0:
            raise ConfigError(
                f"the INT8 fallback's FP32 layer count must be >= 0, got {self.max_fp32_layers}"
            )

    def inputs(self) -> CalibrationInputs:
        return self.calibration or CalibrationInputs.default()

    def weights(self, precision: str) -> WeightOnlyConfig:
        """The LLM's weight-only settings at ``precision``."""
        return replace(self.weight_only, bits=weight_bits(precision))

    def key(self, precision: str) -> str:
        wo = self.weights(precision)
        data = {
            **asdict(self),
            "weight_only": asdict(wo),
            "calibration": self.inputs().digest(),
            "forms": FORM_VERSION,
        }
        return json.dumps(data, sort_keys=True, default=str)


@dataclass
class StageQuantization:
    stage: str
    precision: str
    method: str
    size_before: int
    size_after: int
    metrics: dict[str, float] = field(default_factory=dict)
    note: str = ""


def budgets_for(kind: StageKind, budgets: dict[str, float]) -> dict[str, float]:
    """The entries of ``budgets`` that judge a stage of ``kind`` (the metrics its report measures)."""
    measured = LLM_METRICS if kind is StageKind.LLM else STAGE_METRICS
    chosen = {k: v for k, v in budgets.items() if k in measured}
    if not chosen:
        raise ConfigError(f"no accuracy budget applies to {kind} stages (they measure {', '.join(measured)})")
    return chosen


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    from omniforge.runtime.engine import open_session

    return open_session(model if isinstance(model, Path) else model.SerializeToString(), "measurement")


def _stage_metrics(
    fp32: Path, quant: Path, spec: StageSpec, feeds: list[dict[str, np.ndarray]] | None = None
) -> dict[str, float]:
    """Accuracy on ``feeds`` (held-out captured inputs) or, without them, on seeded inputs."""
    a, b = _session(fp32), _session(quant)
    cos, snr, err = [], [], []
    if not feeds:
        feeds = [spec.sample_inputs(point, seed=200 + i) for i, point in enumerate(spec.parity_points())]
    for f in feeds:
        for x, y in zip(a.run(None, f), b.run(None, f), strict=True):
            cos.append(cosine(x, y))
            snr.append(snr_db(x, y))
            err.append(float(np.max(np.abs(x - y))) if x.size else 0.0)
    return dict(zip(STAGE_METRICS, (min(cos), min(snr), max(err)), strict=True))


def _llm_metrics(
    fp32: Path, quant: Path, spec: StageSpec, contract: Contract | None, steps: int = 24
) -> dict[str, float]:
    """Next-token agreement of the quantized in-place LLM graph with the FP32 one on seeded rows:
    both are fed the same prompt and continuation, so they see the same inputs."""
    from omniforge.runtime.llm import LlmEngine, probe

    g = spec.llm
    assert g is not None
    rng = np.random.default_rng(0)
    prompt = (rng.standard_normal((12, g.hidden_size)) * 0.05).astype(np.float32)
    follow = (rng.standard_normal((steps, g.hidden_size)) * 0.05).astype(np.float32)
    logits = {
        name: probe(LlmEngine(path, g, contract=contract, preset="measurement"), [prompt], [follow]).logits[0]
        for name, path in (("fp32", fp32), ("quant", quant))
    }
    values = (
        top1_agreement(logits["fp32"], logits["quant"]),
        kl_divergence(logits["fp32"], logits["quant"]),
        cosine(logits["fp32"], logits["quant"]),
    )
    return dict(zip(LLM_METRICS, values, strict=True))


def _size(build: Path, rels: list[str]) -> int:
    return sum((build / r).stat().st_size for r in rels if (build / r).exists())


def calibration_rows(build: Path, count: int = 16, length: int = 64) -> list[np.ndarray]:
    """Default LLM calibration: the text shipped in ``omniforge/data`` through the build's tokenizer."""
    from importlib import resources

    from omniforge.runtime.llm import LlmRuntime

    rt = LlmRuntime(build, num_slots=1, prefix_cache_entries=0)
    text = resources.files("omniforge").joinpath("data/corpus.txt").read_text()
    if rt.tokenizer is not None:
        ids = np.asarray(rt.tokenizer.encode(text), np.int64)
    else:
        ids = np.random.default_rng(0).integers(0, rt.geometry.vocab_size, size=count * length)
    ids = np.resize(ids, count * length) % rt.geometry.vocab_size
    return [rt.embed_ids(ids[i * length : (i + 1) * length]) for i in range(count)]


def stage_plan(manifest: Manifest, precision: str, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """Per stage, the precision to build, then ``overrides`` (stage -> fp32|fp16|int8|int4).

    int8/int4: the LLM's weights at that precision, every other stage INT8. fp16: every stage but
    the LLM and the embedding lookup, whose in-place KV cache stays FP32 on ONNX Runtime's CPU
    provider (TensorRT builds its own FP16 engine from the canonical graph).
    """
    if precision not in STAGE_PRECISIONS:
        raise ConfigError(f"precision '{precision}' is not one of {', '.join(STAGE_PRECISIONS)}")
    plan = {}
    for name in manifest.stages:
        kind = manifest.pipeline.stage(name).kind
        if precision == Precision.FP16:
            plan[name] = Precision.FP32 if kind in (StageKind.LLM, StageKind.EMBEDDING) else Precision.FP16
        else:
            keep = kind is StageKind.LLM or precision == Precision.FP32
            plan[name] = Precision(precision) if keep else Precision.INT8
    for name, p in (overrides or {}).items():
        if name not in plan:
            raise ConfigError(f"no stage '{name}' in this build (it has: {', '.join(plan)})")
        if p not in STAGE_PRECISIONS:
            raise ConfigError(
                f"stage precision '{p}' for '{name}' is not one of {', '.join(STAGE_PRECISIONS)}"
            )
        kind = manifest.pipeline.stage(name).kind
        if p == Precision.INT4 and kind is not StageKind.LLM:
            raise ConfigError(f"int4 is for the LLM's weights; '{name}' can be fp32, fp16 or int8")
        if p == Precision.FP16 and kind in (StageKind.LLM, StageKind.EMBEDDING):
            raise ConfigError(f"'{name}' has no fp16 form for ONNX Runtime here; use fp32, int8 or int4")
        plan[name] = Precision(p)
    return {k: str(v) for k, v in plan.items()}


@dataclass
class QuantizeContext:
    """What every stage quantizer reads: the FP32 build, the options and the calibration data."""

    build: Path
    manifest: Manifest
    opts: QuantizeOptions
    calibration_dir: Path | None
    llm_rows: list[np.ndarray] | None
    log: Callable[[str], None]

    def captured(self, name: str) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
        """(calibration feeds, held-out feeds) captured for stage ``name``; empty without a capture."""
        return calib.load(self.calibration_dir, name) if self.calibration_dir else ([], [])


Result = tuple[StageBuild, StageQuantization]


class StageQuantizer(Protocol):
    """Makes one stage's quantized variants under ``out/stages``: its manifest entry and report."""

    def quantize(self, ctx: QuantizeContext, name: str, precision: Precision, out: Path) -> Result: ...


def _int8_mode(spec: StageSpec, opts: QuantizeOptions) -> str:
    if opts.int8_mode != "auto":
        return opts.int8_mode
    return "static" if spec.kind in CONV_KINDS else "dynamic"


class WeightOnlyLlm:
    """The LLM's weights block-quantized: ``MatMulNBits`` in-place graph plus TensorRT's ``DequantizeLinear`` form."""

    def quantize(self, ctx: QuantizeContext, name: str, precision: Precision, out: Path) -> Result:
        sb = ctx.manifest.stages[name]
        spec = ctx.manifest.pipeline.stage(name)
        inplace = sb.variant(Role.ORT_INPLACE_LLM)
        if inplace is None or inplace.contract is None:
            raise ConfigError(f"stage '{name}' has no in-place LLM graph to quantize; export the build again")
        wcfg = ctx.opts.weights(precision)
        if wcfg.method != "rtn" and not ctx.llm_rows:
            raise ConfigError(f"{wcfg.method.upper()} needs LLM calibration rows")
        src = ctx.build / inplace.file
        rel = f"stages/{name}.{precision}.ort.onnx"
        fp32 = onnx.load(str(src))
        awq = None  # AWQ's scales, searched once for both forms
        if wcfg.method == "awq":
            from omniforge.calibration.awq import search_scales

            awq = search_scales(
                fp32, inplace.contract, ctx.llm_rows, wcfg.bits, wcfg.block_size, wcfg.symmetric
            )
        onnx.save_model(self._graph(fp32, inplace.contract, wcfg, ctx.llm_rows, awq), str(out / rel))
        metrics = _llm_metrics(src, out / rel, spec, inplace.contract)
        qsb = sb.with_variant(replace(inplace, file=rel, precision=precision, data_files=()))
        note = "the embedding table is INT8 in token_embedding"
        if ctx.opts.standard_form:
            scale_canonical = None
            if awq is not None:
                from omniforge.calibration.awq import fold_into_canonical

                scale_canonical = partial(
                    fold_into_canonical, inplace=fp32, contract=inplace.contract, scales=awq
                )
            std_rel, form = self._standard_form(ctx, name, precision, out, wcfg, scale_canonical)
            qsb = qsb.with_variant(Variant(Role.WEIGHT_ONLY_DQ, std_rel, precision))
            metrics["qdq_cosine_min"] = _stage_metrics(ctx.build / sb.file, out / std_rel, spec)["cosine_min"]
            note += f"; {std_rel}: {form} for TensorRT"
        sym = "symmetric" if wcfg.symmetric else "asymmetric"
        method = (
            f"weight-only MatMulNBits ({wcfg.method.upper()}), {wcfg.bits}-bit {sym}, block {wcfg.block_size}"
        )
        size = (src.stat().st_size, (out / rel).stat().st_size)
        return replace(qsb, precision=precision), StageQuantization(
            name, precision, method, *size, metrics, note=note
        )

    @staticmethod
    def _graph(
        fp32: onnx.ModelProto,
        contract: Contract,
        wcfg: WeightOnlyConfig,
        rows: list[np.ndarray] | None,
        awq: list[LayerScale] | None = None,
    ) -> onnx.ModelProto:
        """The ``MatMulNBits`` form of the in-place graph by ``wcfg.method`` (``awq``: the scales)."""
        if awq is not None:
            from omniforge.calibration.awq import fold_scales

            return quantize_weights(fold_scales(fp32, contract, awq), wcfg)
        q = quantize_weights(fp32, wcfg)
        if wcfg.method == "gptq":
            from omniforge.calibration.gptq import apply_gptq

            q = apply_gptq(fp32, q, contract, rows, wcfg.bits, wcfg.block_size)
        return q

    @staticmethod
    def _standard_form(
        ctx: QuantizeContext,
        name: str,
        precision: Precision,
        out: Path,
        wcfg: WeightOnlyConfig,
        scale_canonical: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None,
    ) -> tuple[str, str]:
        """Write TensorRT's weight-only form of the canonical graph: (its path, what it is).

        Always symmetric (TensorRT quantization has no zero points), whatever ``MatMulNBits`` got;
        INT4 blocks of ``tensorrt_block_size(wcfg.block_size)`` rows, INT8 per output channel;
        ``scale_canonical`` (AWQ) folds the scales ``MatMulNBits``' weights got into the canonical
        graph first, so both forms quantize the same scaled weights."""
        from omniforge.calibration.standard_form import (
            WEIGHT_ONLY_OPSET,
            dequantize_linear_form,
            tensorrt_block_size,
            unquantized_weights,
        )

        std_rel = f"stages/{name}.{precision}.qdq.onnx"
        canonical = onnx.load(str(ctx.build / ctx.manifest.stages[name].file))
        if scale_canonical is not None:
            canonical = scale_canonical(canonical)
        codes = "gptq" if wcfg.method == "gptq" else "rtn"
        block = tensorrt_block_size(wcfg.block_size)
        std = dequantize_linear_form(
            canonical, wcfg.bits, block, codes, ctx.llm_rows, ctx.manifest.pipeline.stage(name)
        )
        onnx.save_model(std, str(out / std_rel))
        layout = f"INT4 blocks of {block}" if wcfg.bits == 4 else "per-channel INT8"
        scaled = "AWQ-scaled weights, " if scale_canonical is not None else ""
        form = (
            f"W{wcfg.bits}A16 DequantizeLinear (opset {WEIGHT_ONLY_OPSET[wcfg.bits]}, {layout}, "
            f"{scaled}{codes.upper()} symmetric codes, positive FP16 scales)"
        )
        kept = unquantized_weights(std)
        if kept:
            sizes = " or ".join(str(b) for b in sorted({block, 64}, reverse=True))
            form += f"; {len(kept)} weight(s) whose K is no multiple of {sizes} kept FP16"
        return std_rel, form


def _rewritten(
    ctx: QuantizeContext,
    name: str,
    out: Path,
    precision: str,
    transform: Callable[[onnx.ModelProto], onnx.ModelProto],
    method: str,
    feeds: list[dict[str, np.ndarray]] | None = None,
) -> Result:
    """The stage's canonical graph through ``transform``, served by ONNX Runtime, with its report."""
    sb = ctx.manifest.stages[name]
    src = ctx.build / sb.file
    rel = f"stages/{name}.{precision}.onnx"
    onnx.save_model(transform(onnx.load(str(src))), str(out / rel))
    metrics = _stage_metrics(src, out / rel, ctx.manifest.pipeline.stage(name), feeds)
    size = (src.stat().st_size, (out / rel).stat().st_size)
    return replace(
        sb.with_variant(Variant(Role.ORT, rel, precision)), precision=precision
    ), StageQuantization(name, precision, method, *size, metrics)


class Fp16Stage:
    """FP16 weights and compute, norms and their reductions FP32, FP32 inputs/outputs."""

    def quantize(self, ctx: QuantizeContext, name: str, precision: Precision, out: Path) -> Result:
        from omniforge.passes.precision import to_fp16_keep_norms

        return _rewritten(
            ctx, name, out, "fp16", to_fp16_keep_norms, self.__doc__ or "", ctx.captured(name)[1]
        )


class EmbeddingInt8:
    """INT8 table, one scale per row."""

    def quantize(self, ctx: QuantizeContext, name: str, precision: Precision, out: Path) -> Result:
        return _rewritten(ctx, name, out, "int8", quantize_embedding, self.__doc__ or "")


class Int8WithFallback:
    """Static QDQ or dynamic INT8 with the accuracy-driven fallback (optionally after SmoothQuant)."""

    def quantize(self, ctx: QuantizeContext, name: str, precision: Precision, out: Path) -> Result:
        sb = ctx.manifest.stages[name]
        spec = ctx.manifest.pipeline.stage(name)
        mode = _int8_mode(spec, ctx.opts)
        calibration, heldout = ctx.captured(name)
        if not calibration:  # a stage the capture did not reach: seeded inputs at every profile point
            calibration = [spec.sample_inputs(p, seed=300 + i) for i, p in enumerate(spec.parity_points())]
        ops = ("Conv", "MatMul", "Gemm") if spec.kind in CONV_KINDS else ("MatMul", "Gemm")
        cfg = Int8Config(mode, ctx.opts.calibration_method, ops)
        fp32 = ctx.build / (sb.file if mode == "static" else runtime_file(ctx.manifest, name))
        if mode == "static":
            method = f"static QDQ INT8 ({ctx.opts.calibration_method}), per-channel weights"
        else:
            method = "dynamic INT8, per-channel weights, reduce_range"
        source = fp32
        if mode == "static" and ctx.opts.smoothquant_alpha is not None and "MatMul" in ops:
            from omniforge.calibration.smoothquant import smooth_quant

            smoothed, report = smooth_quant(onnx.load(str(fp32)), calibration, ctx.opts.smoothquant_alpha)
            source = out / f"{name}.smoothed.onnx"
            onnx.save_model(smoothed, str(source))
            method += f", SmoothQuant alpha {ctx.opts.smoothquant_alpha} ({report.fired} groups)"
        rel = f"stages/{name}.int8.{'qdq' if mode == 'static' else 'ort'}.onnx"
        fb = quantize_int8_with_fallback(
            source, out / rel, calibration, ctx.opts.budget, ctx.opts.max_fp32_layers, config=cfg
        )
        if source != fp32:
            source.unlink()
        qsb = sb.with_variant(Variant(Role.ORT, rel, "int8"))
        if mode == "static":  # zero-point-free Q/DQ: what TensorRT builds explicit INT8 from
            qsb = qsb.with_variant(Variant(Role.QDQ, rel, "int8"))
        note = f"{len(fb.excluded)} layer(s) kept FP32 by the accuracy fallback" if fb.excluded else ""
        metrics = _stage_metrics(ctx.build / runtime_file(ctx.manifest, name), out / rel, spec, heldout)
        size = (fp32.stat().st_size, (out / rel).stat().st_size)
        return replace(qsb, precision="int8"), StageQuantization(
            name, "int8", method, *size, metrics, note=note
        )


# (stage kind or None for any kind, precision) -> the quantizer; the kind's own entry wins
QUANTIZERS: dict[tuple[StageKind | None, Precision], StageQuantizer] = {
    (StageKind.LLM, Precision.INT4): WeightOnlyLlm(),
    (StageKind.LLM, Precision.INT8): WeightOnlyLlm(),
    (StageKind.EMBEDDING, Precision.INT8): EmbeddingInt8(),
    (None, Precision.INT8): Int8WithFallback(),
    (None, Precision.FP16): Fp16Stage(),
}


def select_quantizer(kind: StageKind, precision: str) -> StageQuantizer:
    """The quantizer that makes a ``kind`` stage at ``precision``."""
    if precision not in QUANTIZED_PRECISIONS:
        raise ConfigError(f"precision '{precision}' is not one of {', '.join(QUANTIZED_PRECISIONS)}")
    p = Precision(precision)
    found = QUANTIZERS.get((kind, p)) or QUANTIZERS.get((None, p))
    if found is None or (p is Precision.INT4 and kind is not StageKind.LLM):
        raise ConfigError(f"{kind} stages have no {p} form")
    return found


def _quantize_stage(ctx: QuantizeContext, name: str, precision: str, out: Path) -> Result:
    """Write the quantized files of one stage under ``out/stages`` and return its manifest entry and report."""
    (out / "stages").mkdir(parents=True, exist_ok=True)
    quantizer = select_quantizer(ctx.manifest.pipeline.stage(name).kind, precision)
    return quantizer.quantize(ctx, name, Precision(precision), out)


def _stage_key(ctx: QuantizeContext, name: str, precision: str) -> str:
    """The stage's FP32 graphs, the options and the calibration capture (which depends on every
    stage before this one, not only on this stage's file)."""
    sb = ctx.manifest.stages[name]
    hashes = [ctx.manifest.artifacts[p].sha256 for p in sb.files() if p in ctx.manifest.artifacts]
    captured = ""
    if ctx.calibration_dir is not None:
        captured = json.loads((ctx.calibration_dir / "calibration.json").read_text())["digest"]
    text = "|".join([name, precision, ctx.opts.key(precision), captured, *hashes])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _cached_stage(
    ctx: QuantizeContext, name: str, precision: str, tmp: Path, cache: Path | None
) -> tuple[StageBuild, StageQuantization]:
    """One stage's result, from ``cache`` when present there, copied into ``tmp``."""
    if cache is None:
        return _quantize_stage(ctx, name, precision, tmp)
    entry = cache / f"stage-{name}-{precision}-{_stage_key(ctx, name, precision)}"
    if not (entry / "result.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with atomic_folder(entry) as work:
            sb, res = _quantize_stage(ctx, name, precision, work)
            (work / "result.json").write_text(json.dumps({"stage": sb.to_dict(), "report": asdict(res)}))
    else:
        ctx.log(f"{name}: {precision} up to date (cached)")
    data = json.loads((entry / "result.json").read_text())
    for f in (entry / "stages").iterdir():
        shutil.copyfile(f, tmp / "stages" / f.name)
    sb = StageBuild.from_dict(data["stage"])
    return sb, StageQuantization(**data["report"])


def _needs_calibration(manifest: Manifest, plan: dict[str, str], opts: QuantizeOptions) -> bool:
    for name, p in plan.items():
        kind = manifest.pipeline.stage(name).kind
        if p in ("fp32", "fp16") or kind is StageKind.EMBEDDING:
            continue
        if kind is StageKind.LLM:
            if opts.weight_only.method != "rtn":
                return True
        elif _int8_mode(manifest.pipeline.stage(name), opts) == "static":
            return True
    return False


def calibration_fingerprint(manifest: Manifest) -> str:
    """What a build's calibration capture is keyed and salted with: its artifacts' digests."""
    return hashlib.sha256(
        "".join(sorted(a.sha256 for a in manifest.artifacts.values())).encode()
    ).hexdigest()[:16]


def quantize_build(
    build: str | Path,
    out: str | Path,
    precision: str,
    weight_only: WeightOnlyConfig | None = None,
    log: Callable[[str], None] = print,
    calibration: list[np.ndarray] | None = None,
    options: QuantizeOptions | None = None,
    overrides: dict[str, str] | None = None,
    stage_cache: Path | None = None,
) -> tuple[Manifest, list[StageQuantization]]:
    """Write a quantized copy of the FP32 ``build`` to ``out`` (replaced atomically).

    ``calibration``: LLM rows for AWQ/GPTQ (default: the captured prompts plus the shipped text);
    ``overrides``: per-stage precisions on top of ``precision``; ``stage_cache``: a folder caching
    each stage's result (and the calibration capture) across runs.
    """
    if precision not in STAGE_PRECISIONS:
        raise ConfigError(f"precision '{precision}' is not one of {', '.join(STAGE_PRECISIONS)}")
    opts = options or QuantizeOptions()
    if weight_only is not None:
        opts = replace(opts, weight_only=weight_only)
    build, out = Path(build), Path(out)
    manifest = load_manifest(build, verify=True)
    if any(sb.precision != "fp32" for sb in manifest.stages.values()):
        raise ConfigError(f"'{build}' is already quantized; quantize an FP32 build")
    plan = stage_plan(manifest, precision, overrides)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not (out / "manifest.json").is_file():
        raise ConfigError(f"'{out}' exists and is not a build folder; refusing to replace it")
    with atomic_folder(out) as tmp:
        shutil.copytree(build, tmp, dirs_exist_ok=True)
        calib_dir = None
        if _needs_calibration(manifest, plan, opts):
            fingerprint = calibration_fingerprint(manifest)
            where = (stage_cache / f"calibration-{fingerprint}") if stage_cache else tmp / "calibration"
            for earlier in (build / "calibration", out / "calibration"):  # a capture made before
                if not (where / "calibration.json").is_file() and (earlier / "calibration.json").is_file():
                    shutil.copytree(earlier, where, dirs_exist_ok=True)
            calib_dir = calib.capture(build, where, opts.inputs(), fingerprint, log=log)
            if calib_dir != tmp / "calibration":
                shutil.copytree(calib_dir, tmp / "calibration", dirs_exist_ok=True)
        rows = calibration
        if rows is None and plan.get("llm", "fp32") != "fp32" and opts.weight_only.method != "rtn":
            captured = calib.load(calib_dir, "llm")[0] if calib_dir else []
            embeds = manifest.variant("llm", Role.ORT_INPLACE_LLM).contract.slot(Slot.EMBEDS)
            rows = [f[embeds] for f in captured] + calibration_rows(build)
        ctx = QuantizeContext(build, manifest, opts, calib_dir, rows, log)
        stages = dict(manifest.stages)
        results: list[StageQuantization] = []
        for name, p in plan.items():
            t0 = time.perf_counter()
            if p == "fp32":
                res = StageQuantization(name, "fp32", "kept FP32", 0, 0)
            else:
                stages[name], res = _cached_stage(ctx, name, p, tmp, stage_cache)
            results.append(res)
            log(
                f"{name}: {res.precision} ({res.method}) {time.perf_counter() - t0:.1f}s "
                + " ".join(f"{k}={v:.4g}" for k, v in res.metrics.items())
            )
        data = [r.__dict__ for r in results]
        atomic_write_text(tmp / "quantize.json", json.dumps(data, indent=2) + "\n")
        atomic_write_text(tmp / "quantize.md", quantize_table(results) + "\n")
        paths = [p for p in manifest.artifacts if (tmp / p).exists()] + stage_files(stages)
        paths += ["quantize.json", "quantize.md"]
        files = {**manifest.files, "quantize_report": "quantize.json"}
        if (tmp / "calibration" / "calibration.json").is_file():
            paths += [f"calibration/{f.name}" for f in sorted((tmp / "calibration").iterdir())]
            files["calibration"] = "calibration/calibration.json"
        for sb in manifest.stages.values():  # FP32 runtime graphs replaced by a quantized one
            for rel in sb.files():
                if rel not in stage_files(stages) and (tmp / rel).exists():
                    (tmp / rel).unlink()
                    paths.remove(rel)
        source = {**manifest.source, "precision": precision, "precision_plan": plan}
        new = Manifest(
            manifest.pipeline, stages, collect_artifacts(tmp, paths), files, source, manifest.tools
        )
        write_manifest(tmp, new)
        if opts.end_to_end and any(p != "fp32" for p in plan.values()):
            from omniforge.calibration.end_to_end import end_to_end_accuracy, end_to_end_table

            e2e = end_to_end_accuracy(build, tmp, steps=opts.inputs().steps)
            log("end to end vs FP32: " + ", ".join(f"{k} {v:.3g}" for k, v in e2e["worst"].items()))
            atomic_write_text(tmp / "accuracy_e2e.json", json.dumps(e2e, indent=2) + "\n")
            md = quantize_table(results) + "\n\n## End to end vs FP32 (same prompts and seeds, held out)\n\n"
            atomic_write_text(tmp / "quantize.md", md + end_to_end_table(e2e) + "\n")
            paths.append("accuracy_e2e.json")
            files["accuracy_e2e"] = "accuracy_e2e.json"
            new = Manifest(
                manifest.pipeline, stages, collect_artifacts(tmp, paths), files, source, manifest.tools
            )
            write_manifest(tmp, new)
    return new, results


def quantize_table(results: list[StageQuantization]) -> str:
    rows = [
        "| stage | precision | method | size (KiB) before -> after | accuracy vs FP32 |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        acc = ", ".join(f"{k} {v:.4g}" for k, v in r.metrics.items()) or "-"
        size = f"{r.size_before / 1024:.0f} -> {r.size_after / 1024:.0f}" if r.size_before else "-"
        rows.append(
            f"| {r.stage} | {r.precision} | {r.method} | {size} | {acc}{'; ' + r.note if r.note else ''} |"
        )
    return "\n".join(rows)
