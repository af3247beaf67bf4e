"""``quantize`` over a build: weight-only INT4/INT8 LLM, dynamic INT8 for Linear-heavy stages.

Each quantized stage is measured against its FP32 graph on the stage's seeded inputs (cosine,
SNR, max error; for the LLM top-1 agreement and KL divergence of next-token distributions over
decode steps) and the report lands in the build (``quantize.json`` / ``quantize.md``).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from omniforge.calibration.metrics import cosine, kl_divergence, snr_db, top1_agreement
from omniforge.calibration.weight_only import WeightOnlyConfig, quantize_embedding, quantize_weights
from omniforge.errors import ConfigError
from omniforge.pipeline.atomic import atomic_folder
from omniforge.pipeline.manifest import (
    Manifest,
    atomic_write_text,
    collect_artifacts,
    load_manifest,
    runtime_file,
    stage_files,
    write_manifest,
)
from omniforge.pipeline.spec import StageKind, StageSpec

PRECISIONS = ("int8", "int4")
DYNAMIC_INT8_KINDS = {StageKind.ENCODER, StageKind.INPUT_PROJECTOR, StageKind.OUTPUT_PROJECTOR}


@dataclass
class StageQuantization:
    stage: str
    precision: str
    method: str
    size_before: int
    size_after: int
    metrics: dict[str, float] = field(default_factory=dict)
    note: str = ""


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def _stage_metrics(fp32: Path, quant: Path, spec: StageSpec) -> dict[str, float]:
    a, b = _session(fp32), _session(quant)
    cos, snr, err = [], [], []
    for i, point in enumerate(spec.parity_points()):
        feeds = spec.sample_inputs(point, seed=200 + i)
        for x, y in zip(a.run(None, feeds), b.run(None, feeds), strict=True):
            cos.append(cosine(x, y))
            snr.append(snr_db(x, y))
            err.append(float(np.max(np.abs(x - y))) if x.size else 0.0)
    return {"cosine_min": min(cos), "snr_db_min": min(snr), "max_abs_err": max(err)}


def _llm_metrics(fp32: Path, quant: Path, spec: StageSpec, steps: int = 24) -> dict[str, float]:
    """Next-token agreement of the quantized in-place LLM graph over greedy decoding on seeded inputs."""
    from omniforge.runtime.engine import SessionConfig
    from omniforge.runtime.kv_cache import KVCachePool, SlotRange
    from omniforge.runtime.llm import LlmEngine

    g = spec.llm
    assert g is not None
    rng = np.random.default_rng(0)
    prompt = (rng.standard_normal((1, 12, g.hidden_size)) * 0.05).astype(np.float32)
    logits = {}
    follow = None
    for name, path in (("fp32", fp32), ("quant", quant)):
        engine = LlmEngine(path, g, SessionConfig())
        pool = KVCachePool(g, 1, max_context=min(g.max_context, 12 + steps + 1))
        binding = engine.bind(pool, SlotRange(0, 1))
        out, _ = binding.step(prompt)
        rows = [out[0]]
        # both graphs are fed the FP32 model's continuation, so they see the same inputs
        feed = (
            follow
            if follow is not None
            else (rng.standard_normal((steps, g.hidden_size)) * 0.05).astype(np.float32)
        )
        follow = feed
        for t in range(steps):
            out, _ = binding.step(feed[None, t : t + 1])
            rows.append(out[0])
        logits[name] = np.stack(rows)
    return {
        "top1_agreement": top1_agreement(logits["fp32"], logits["quant"]),
        "kl_divergence": kl_divergence(logits["fp32"], logits["quant"]),
        "logits_cosine": cosine(logits["fp32"], logits["quant"]),
    }


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


def quantize_build(
    build: str | Path,
    out: str | Path,
    precision: str,
    weight_only: WeightOnlyConfig | None = None,
    log: Callable[[str], None] = print,
    calibration: list[np.ndarray] | None = None,
) -> tuple[Manifest, list[StageQuantization]]:
    """Write a quantized copy of ``build`` to ``out`` (replaced atomically)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    build, out = Path(build), Path(out)
    manifest = load_manifest(build, verify=True)
    if any(sb.precision != "fp32" for sb in manifest.stages.values()):
        raise ConfigError(f"'{build}' is already quantized; quantize an FP32 build")
    wcfg = weight_only or WeightOnlyConfig(bits=4 if precision == "int4" else 8)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not (out / "manifest.json").is_file():
        raise ConfigError(f"'{out}' exists and is not a build folder; refusing to replace it")
    with atomic_folder(out) as tmp:
        shutil.copytree(build, tmp, dirs_exist_ok=True)
        stages = dict(manifest.stages)
        results: list[StageQuantization] = []
        for name, sb in manifest.stages.items():
            spec = manifest.pipeline.stage(name)
            t0 = time.perf_counter()
            if spec.kind is StageKind.LLM and "onnxruntime" in sb.variants:
                src = tmp / sb.variants["onnxruntime"]
                rel = f"stages/{name}.{precision}.ort.onnx"
                fp32_graph = onnx.load(str(src))
                if wcfg.method == "awq":
                    from omniforge.calibration.awq import apply_awq

                    fp32_graph = apply_awq(
                        fp32_graph, calibration or calibration_rows(build), wcfg.block_size
                    )
                q = quantize_weights(fp32_graph, wcfg)
                if wcfg.method == "gptq":
                    from omniforge.calibration.gptq import apply_gptq

                    q = apply_gptq(
                        fp32_graph, q, calibration or calibration_rows(build), wcfg.bits, wcfg.block_size
                    )
                onnx.save_model(q, str(tmp / rel))
                res = StageQuantization(
                    name,
                    precision,
                    f"weight-only MatMulNBits ({wcfg.method.upper()}), {wcfg.bits}-bit, block {wcfg.block_size}",
                    src.stat().st_size,
                    (tmp / rel).stat().st_size,
                    _llm_metrics(src, tmp / rel, spec),
                    note="the embedding table is INT8 in token_embedding",
                )
                src.unlink()
                stages[name] = replace(sb, precision=precision, variants={**sb.variants, "onnxruntime": rel})
            elif spec.kind is StageKind.EMBEDDING:
                src = tmp / sb.file
                rel = f"stages/{name}.int8.onnx"
                onnx.save_model(quantize_embedding(onnx.load(str(src))), str(tmp / rel))
                res = StageQuantization(
                    name,
                    "int8",
                    "INT8 table, one scale per row",
                    src.stat().st_size,
                    (tmp / rel).stat().st_size,
                    _stage_metrics(src, tmp / rel, spec),
                )
                stages[name] = replace(sb, precision="int8", variants={**sb.variants, "onnxruntime": rel})
            elif spec.kind in DYNAMIC_INT8_KINDS:
                from onnxruntime.quantization import QuantType, quantize_dynamic

                src = tmp / runtime_file(manifest, name)
                rel = f"stages/{name}.int8.ort.onnx"
                quantize_dynamic(
                    str(src),
                    str(tmp / rel),
                    per_channel=True,
                    reduce_range=True,
                    weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm"],
                    extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                )
                res = StageQuantization(
                    name,
                    "int8",
                    "dynamic INT8, per-channel weights, reduce_range",
                    src.stat().st_size,
                    (tmp / rel).stat().st_size,
                    _stage_metrics(src, tmp / rel, spec),
                )
                if src != tmp / sb.file:
                    src.unlink()
                stages[name] = replace(sb, precision="int8", variants={**sb.variants, "onnxruntime": rel})
            else:
                res = StageQuantization(
                    name, "fp32", "kept FP32", 0, 0, note="no quantizer for this stage kind yet"
                )
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
        new = Manifest(
            manifest.pipeline,
            stages,
            collect_artifacts(tmp, paths),
            {**manifest.files, "quantize_report": "quantize.json"},
            {**manifest.source, "precision": precision},
            manifest.tools,
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
