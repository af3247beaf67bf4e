"""``omniforge build``: export -> optimize -> quantize -> engines, cached by content and atomic.

Each step's output is cached under a key made of the SHA-256 of its inputs (the model folder's
files, then the previous step's key) and its options, so re-running with the same inputs reuses
every step, and changing the precision redoes only quantization and assembly. The build is
assembled in a temporary folder and moved over ``out`` only when complete: an interrupted build
leaves the previous one intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from omniforge import __version__
from omniforge.calibration.quantize import QuantizeOptions, StageQuantization
from omniforge.errors import ConfigError
from omniforge.pipeline.atomic import atomic_folder
from omniforge.pipeline.contracts import Role
from omniforge.pipeline.manifest import (
    Manifest,
    collect_artifacts,
    load_manifest,
    Variant,
    sha256_file,
    stage_files,
    write_manifest,
)

BACKENDS = ("onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8", "int4", "auto")
# per-stage accuracy budgets of the auto plan (overridable): the minimum a quantized stage must keep
AUTO_BUDGETS = {"cosine_min": 0.999, "logits_cosine": 0.99}


@dataclass(frozen=True)
class BuildOptions:
    backend: str = "onnxruntime"
    precision: str = "fp32"
    emit_trtexec: bool = False
    cache: Path | None = None
    stage_precision: dict[str, str] = field(default_factory=dict)  # per-stage overrides of precision
    quantize: QuantizeOptions | None = None  # default: QuantizeOptions(), static INT8 everywhere for TensorRT

    def quantize_options(self) -> QuantizeOptions:
        opts = self.quantize or QuantizeOptions()
        if self.backend == "tensorrt" and opts.int8_mode == "auto":
            opts = replace(opts, int8_mode="static")  # TensorRT builds explicit INT8 from Q/DQ graphs only
        return opts

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend '{self.backend}' is not one of {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision '{self.precision}' is not one of {', '.join(PRECISIONS)}")
        if self.precision == "auto" and self.stage_precision:
            raise ConfigError(
                "the auto plan chooses every stage's precision; give per-stage precisions with fp32, fp16, int8 or int4"
            )


def cache_root(opts: BuildOptions) -> Path:
    if opts.cache:
        return Path(opts.cache)
    home = Path(os.environ.get("OMNIFORGE_HOME", Path.home() / ".cache" / "omniforge"))
    return home / "build-cache"


def folder_digest(root: Path, memo_path: Path) -> str:
    """SHA-256 over every file of a model folder (paths and contents); file hashes are memoised by
    (size, mtime) so big checkpoints are read once."""
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        st = f.stat()
        key = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in memo:
            memo[key] = sha256_file(f)
        h.update(f"{f.relative_to(root).as_posix()}:{memo[key]}\n".encode())
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    memo_path.write_text(json.dumps(memo))
    return h.hexdigest()


def _key(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def _cached(root: Path, name: str, make: Callable[[Path], None], log: Callable[[str], None]) -> Path:
    """The cache entry ``name``, made by ``make(path)`` into a temporary folder when missing."""
    path = root / name
    if (path / "manifest.json").is_file():
        log(f"{name.split('-')[0]}: up to date (cached)")
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        make(tmp / "build")
        (tmp / "build").rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def build(
    model: Path, out: Path, opts: BuildOptions, log: Callable[[str], None] = print
) -> tuple[Manifest, list[dict]]:
    """Build ``model`` into ``out``; returns the manifest and the summary rows."""
    if opts.backend == "tensorrt":
        from omniforge.engines.tensorrt import require_tensorrt

        require_tensorrt()
    from omniforge.export.exporter import ExportOptions, export_pipeline
    from omniforge.passes.build import optimize_build

    root = cache_root(opts)
    model_key = folder_digest(model, root / "file-hashes.json")
    export_key = _key(
        "export", __version__, model_key, json.dumps(ExportOptions().__dict__, sort_keys=True, default=str)
    )
    exported = _cached(root, f"export-{export_key}", lambda p: export_pipeline(model, p, log=log), log)
    opt_key = _key("optimize", export_key)
    optimized = _cached(root, f"optimize-{opt_key}", lambda p: optimize_build(exported, p, log=log), log)
    final = optimized
    qopts = opts.quantize_options()
    if opts.precision == "auto":
        variants = {
            p: _quantized(root, optimized, opt_key, p, qopts, {}, log) for p in ("fp16", "int8", "int4")
        }
        auto_key = _key("auto", opt_key, json.dumps(AUTO_BUDGETS), *(v.name for v in variants.values()))
        final = _cached(root, f"auto-{auto_key}", lambda p: assemble_auto(optimized, variants, p, log), log)
    elif opts.precision in ("fp16", "int8", "int4") or opts.stage_precision:
        final = _quantized(root, optimized, opt_key, opts.precision, qopts, opts.stage_precision, log)
    return _assemble(final, out, opts, log)


def _quantized(
    root: Path,
    optimized: Path,
    opt_key: str,
    precision: str,
    qopts: QuantizeOptions,
    overrides: dict[str, str],
    log: Callable[[str], None],
) -> Path:
    """The quantized build, cached whole; inside it each stage is cached on its own, so a change of
    one stage's precision (or of an option only some stages use) redoes only those stages."""
    from omniforge.calibration.quantize import quantize_build

    key = _key(precision, opt_key, qopts.key(precision), json.dumps(overrides, sort_keys=True))
    return _cached(
        root,
        f"{precision}-{key}",
        lambda p: quantize_build(
            optimized, p, precision, log=log, options=qopts, overrides=overrides, stage_cache=root / "stages"
        ),
        log,
    )


def assemble_auto(fp32: Path, quantized: dict[str, Path], out: Path, log: Callable[[str], None]) -> None:
    """Per stage, the fastest precision whose measured accuracy meets the stage's budget."""
    from omniforge.runtime.build import Build

    base = load_manifest(fp32)
    shutil.copytree(fp32, out)
    # each candidate build opened (and its artifacts verified) once, its report read once
    fp32_build = Build(fp32)
    candidates = [
        (q, Build(q), {r["stage"]: r for r in json.loads((q / "quantize.json").read_text())})
        for q in quantized.values()
    ]
    stages = dict(base.stages)
    plan: dict[str, str] = {}
    rows: list[dict] = []  # the chosen precision's quantization report row per stage
    for name in base.stages:
        choice, best, chosen = "fp32", _latency(fp32_build, name), None
        row = asdict(StageQuantization(name, "fp32", "kept FP32", 0, 0))
        for qpath, qbuild, reports in candidates:
            qsb = qbuild.manifest.stages[name]
            if qsb.precision == "fp32":
                continue
            report = reports[name]
            ok = all(report["metrics"].get(k, 1.0) >= v for k, v in AUTO_BUDGETS.items())
            t = _latency(qbuild, name)
            if ok and t < best:
                choice, best, chosen, row = qsb.precision, t, (qpath, qsb), report
            qbuild.release(name)
        fp32_build.release(name)
        if chosen is not None:
            qpath, qsb = chosen
            for rel in qsb.files():
                if not (out / rel).exists():
                    shutil.copyfile(qpath / rel, out / rel)
            stages[name] = replace(qsb, precision=choice)
        plan[name] = choice
        rows.append(row)
        log(f"auto: {name} -> {choice}")
    (out / "quantize.json").write_text(json.dumps(rows, indent=2) + "\n")
    paths = list(base.artifacts) + stage_files(stages) + ["quantize.json"]
    files = {**base.files, "quantize_report": "quantize.json"}
    source = {**base.source, "precision": "auto", "precision_plan": plan, "auto_budgets": AUTO_BUDGETS}
    write_manifest(
        out, Manifest(base.pipeline, stages, collect_artifacts(out, paths), files, source, base.tools)
    )
    if any(p != "fp32" for p in plan.values()):
        from omniforge.calibration.end_to_end import end_to_end_accuracy

        e2e = end_to_end_accuracy(fp32, out)
        log("auto: end to end vs FP32: " + ", ".join(f"{k} {v:.3g}" for k, v in e2e["worst"].items()))
        (out / "accuracy_e2e.json").write_text(json.dumps(e2e, indent=2) + "\n")
        paths.append("accuracy_e2e.json")
        files["accuracy_e2e"] = "accuracy_e2e.json"
        write_manifest(
            out, Manifest(base.pipeline, stages, collect_artifacts(out, paths), files, source, base.tools)
        )


def _latency(b, name: str, runs: int = 20) -> float:
    """Median seconds of one stage call as the runtime makes it."""
    from omniforge.bench.measure import stage_call
    from omniforge.bench.stats import measure

    return measure(stage_call(b, name), runs=runs).p50 / 1000


def _assemble(
    src: Path, out: Path, opts: BuildOptions, log: Callable[[str], None]
) -> tuple[Manifest, list[dict]]:
    """Copy the final step into ``out`` atomically, adding trtexec lines and the summary."""
    from omniforge.engines.profiles import trtexec_command

    m = load_manifest(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not (out / "manifest.json").is_file() and any(out.iterdir()):
        raise ConfigError(f"'{out}' exists and is not a build folder; refusing to replace it")
    with atomic_folder(out) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        extra: list[str] = []
        if opts.emit_trtexec:
            (tmp / "trtexec").mkdir()
            lines = [
                "#!/usr/bin/env bash",
                "# Build TensorRT engines on the target device (Jetson or datacenter GPU).",
                "set -euo pipefail",
                'cd "$(dirname "$0")/.."',
                "mkdir -p engines",
            ]
            for name, sb in m.stages.items():
                graph, precision = tensorrt_source(sb)
                lines.append(
                    trtexec_command(
                        m.pipeline.stage(name),
                        graph,
                        f"engines/{name}.plan",
                        precision,
                        "engines/timing.cache",
                    )
                )
            (tmp / "trtexec" / "build_engines.sh").write_text("\n".join(lines) + "\n")
            extra.append("trtexec/build_engines.sh")
        if opts.backend == "tensorrt":
            m = _tensorrt_engines(tmp, m, log)
        rows = summary_rows(tmp, m)
        (tmp / "build.json").write_text(
            json.dumps({"backend": opts.backend, "precision": opts.precision, "summary": rows}, indent=2)
            + "\n"
        )
        extra.append("build.json")
        new = Manifest(
            m.pipeline,
            m.stages,
            collect_artifacts(tmp, list(m.artifacts) + extra),
            {**m.files, "build_summary": "build.json"},
            {**m.source, "backend": opts.backend},
            m.tools,
        )
        write_manifest(tmp, new)
    log(f"build written to {out}")
    return new, rows


def tensorrt_source(sb) -> tuple[str, str]:
    """(graph, precision) TensorRT builds a stage from: the standard Q/DQ graph of an INT8/INT4 stage
    (explicit quantization), else the canonical graph in FP16 (norms kept FP32 by the builder)."""
    explicit = sb.variant(Role.QDQ) or sb.variant(Role.WEIGHT_ONLY_DQ)
    if sb.precision in ("int8", "int4") and explicit is not None:
        return explicit.file, sb.precision
    return sb.file, "fp16"


def _tensorrt_engines(build: Path, m: Manifest, log: Callable[[str], None]) -> Manifest:
    """One TensorRT engine per stage (see ``tensorrt_source``), metadata in the manifest."""
    from omniforge.engines.tensorrt import build_engine

    (build / "engines").mkdir(exist_ok=True)
    stages, meta = dict(m.stages), {}
    for name, sb in m.stages.items():
        rel = f"engines/{name}.plan"
        graph, precision = tensorrt_source(sb)
        info = build_engine(
            m.pipeline.stage(name), build / graph, build / rel, precision, build / "engines" / "timing.cache"
        )
        stages[name] = sb.with_variant(Variant(Role.TENSORRT, rel, precision))
        meta[name] = asdict(info)
        log(f"tensorrt: {name} -> {rel}")
    (build / "engines" / "engines.json").write_text(json.dumps(meta, indent=2) + "\n")
    paths = list(m.artifacts) + stage_files(stages) + ["engines/engines.json"]
    return Manifest(
        m.pipeline,
        stages,
        collect_artifacts(build, paths),
        {**m.files, "tensorrt_engines": "engines/engines.json"},
        m.source,
        m.tools,
    )


def summary_rows(build: Path, m: Manifest) -> list[dict]:
    parity = {r["stage"]: r for r in json.loads((build / "parity.json").read_text())}
    quant = {}
    if (build / "quantize.json").is_file():
        quant = {r["stage"]: r for r in json.loads((build / "quantize.json").read_text())}
    rows = []
    for name, sb in m.stages.items():
        engine = (sb.variant(Role.TENSORRT) or sb.runtime_variant()).file
        acc = quant.get(name, {}).get("metrics") or {}
        accuracy = (
            ", ".join(f"{k} {v:.4g}" for k, v in acc.items())
            if sb.precision != "fp32"
            else f"parity {max(p['max_abs'] for p in parity[name]['parity']):.1e}"
        )
        rows.append(
            {
                "stage": name,
                "precision": sb.precision,
                "size_kib": round((build / engine).stat().st_size / 1024),
                "accuracy": accuracy,
                "engine": engine,
            }
        )
    return rows


def summary_table(rows: list[dict]) -> str:
    lines = ["| stage | precision | size (KiB) | parity / accuracy | engine |", "|---|---|---:|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['precision']} | {r['size_kib']} | {r['accuracy']} | {r['engine']} |"
        )
    return "\n".join(lines)
