"""``omniforge build``: export -> optimize -> quantize -> engines, cached by content and atomic.

Each step's output is cached under a key made of the SHA-256 of its inputs (the model folder's
files, then the previous step's key) and its options, so re-running with the same inputs reuses
every step, and changing the precision redoes only quantization and assembly. A warm build reads
only the final step's files (once: verified, then copied) and imports no exporter. The build is
assembled in a temporary folder and moved over ``out`` only when complete: an interrupted build
leaves the previous one intact (and its temporary folder is removed by the next build).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from omniforge import __version__
from omniforge.build_cache import cached, clean_stale, discard_entry, entry_lock, folder_digest
from omniforge.calibration.metrics import meets_budgets
from omniforge.calibration.quantize import (
    QuantizeOptions,
    StageQuantization,
    budgets_for,
    calibration_fingerprint,
)
from omniforge.engines.profiles import (
    DEFAULT_TRT_VERSION,
    OPSET_21_SINCE,
    require_buildable,
    trt_version_tuple,
)
from omniforge.errors import ConfigError, ManifestError
from omniforge.export.opsets import DEFAULT_OPSET, check_opset
from omniforge.pipeline.atomic import atomic_folder
from omniforge.pipeline.contracts import Role
from omniforge.pipeline.manifest import (
    Artifact,
    Manifest,
    Variant,
    collect_artifacts,
    load_manifest,
    stage_files,
    write_manifest,
)
from omniforge.pipeline.model_config import omniforge_home
from omniforge.pipeline.precision import BUILD_PRECISIONS, QUANTIZED_PRECISIONS, Precision
from omniforge.pipeline.spec import StageKind

BACKENDS = ("onnxruntime", "tensorrt")
LLM_STREAM = ("auto", "always", "never")
PRECISIONS = BUILD_PRECISIONS
# per-stage accuracy budgets of the auto plan (overridable): the minimum a quantized stage must keep
AUTO_BUDGETS = {"cosine_min": 0.999, "logits_cosine": 0.99}
# whose versions shape the exported graphs, so they are part of the export step's key
EXPORT_TOOLS = ("torch", "onnx", "onnxruntime", "transformers", "diffusers", "peft", "onnxscript", "onnx-ir")


@dataclass(frozen=True)
class BuildOptions:
    backend: str = "onnxruntime"
    precision: str = "fp32"
    emit_trtexec: bool = False
    cache: Path | None = None
    stage_precision: dict[str, str] = field(default_factory=dict)  # per-stage overrides of precision
    quantize: QuantizeOptions | None = None  # default: QuantizeOptions(), static INT8 everywhere for TensorRT
    opset: int = DEFAULT_OPSET
    trt_version: str = DEFAULT_TRT_VERSION  # of the device the emitted trtexec lines are for
    # the LLM stages written from the LLM's shards layer by layer (omniforge.export.llm_stream), the
    # other stages exported as ever: "auto" when its FP32 export would not fit in memory, "always" or "never"
    llm_stream: str = "auto"
    merge_adapters: tuple[str, ...] = ()  # LoRA adapters given an LLM variant of their own, merged

    def quantize_options(self) -> QuantizeOptions:
        opts = self.quantize or QuantizeOptions()
        if self.backend == "tensorrt" and opts.int8_mode == "auto":
            opts = replace(opts, int8_mode="static")  # TensorRT builds explicit INT8 from Q/DQ graphs only
        return opts

    def export_options(self) -> dict:
        """Every ``ExportOptions`` field the export step runs with (all of them go into its key)."""
        return {"stages": None, "adapter": "default", "opset": self.opset, "parity": True, "threads": 2}

    def __post_init__(self) -> None:
        check_opset(self.opset)
        trt_version_tuple(self.trt_version)  # one sentence for a malformed version
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend '{self.backend}' is not one of {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision '{self.precision}' is not one of {', '.join(PRECISIONS)}")
        if self.llm_stream not in LLM_STREAM:
            raise ConfigError(f"llm_stream must be one of {', '.join(LLM_STREAM)}, got '{self.llm_stream}'")
        if self.precision == "auto" and self.stage_precision:
            raise ConfigError(
                "the auto plan chooses every stage's precision; give per-stage precisions with fp32, fp16, int8 or int4"
            )
        if len(set(self.merge_adapters)) != len(self.merge_adapters):
            raise ConfigError("each adapter is merged once; --merge-adapter names one twice")
        if self.emit_trtexec:  # refused here, before any export, rather than at the trtexec lines
            require_buildable(self.llm_precision, self.trt_version)

    @property
    def llm_precision(self) -> str:
        """The LLM's precision: its per-stage override, else the build's."""
        return self.stage_precision.get("llm", self.precision)


def cache_root(opts: BuildOptions) -> Path:
    if opts.cache:
        return Path(opts.cache)
    return omniforge_home() / "build-cache"


def _key(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def tool_versions(names: tuple[str, ...] = EXPORT_TOOLS) -> str:
    """Installed versions, read from package metadata (nothing is imported)."""
    out = {}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = None
    return json.dumps(out, sort_keys=True)


def build(
    model: Path, out: Path, opts: BuildOptions, log: Callable[[str], None] = print
) -> tuple[Manifest, list[dict]]:
    """Build ``model`` into ``out``; returns the manifest and the summary rows."""
    targets = [opts.trt_version] if opts.emit_trtexec else []  # the TensorRT versions built for
    if opts.backend == "tensorrt":
        from omniforge.engines.tensorrt import require_tensorrt, trt

        require_tensorrt()
        require_buildable(opts.llm_precision, trt.__version__)  # before any export, as build_engine would
        targets.append(trt.__version__)
    auto = auto_candidates(targets)
    if opts.merge_adapters:
        check_merge_adapters(model, opts.merge_adapters)
    root = cache_root(opts)
    for folder, name in ((root, None), (root / "stages", None), (out.parent, out.name)):
        clean_stale(folder, name, log)  # what killed builds left behind
    for attempt in (1, 2):
        final = _steps(model, root, opts, log, auto)
        try:
            m = load_manifest(final, verify=True)  # the one read of the cached files before they are copied
            break
        except ManifestError as exc:
            if attempt == 2:
                raise
            log(f"cache entry {final.name} is damaged ({exc}); rebuilding it")
            discard_entry(final)
    with entry_lock(root, "out-" + _key(str(out.resolve()))):  # builds into the same folder take turns
        return _assemble(final, m, out, opts, log)


def auto_candidates(trt_versions: list[str]) -> tuple[tuple[str, ...], str]:
    """The quantized builds the auto plan chooses each stage's precision from, for a build for
    TensorRT ``trt_versions`` (none: ONNX Runtime only), and one line saying what a version left
    out ("" when none did): before 10.6 TensorRT cannot build the INT4 LLM
    (``profiles.require_buildable``), so the LLM is chosen from int8 weight-only and fp32."""
    old = [v for v in trt_versions if trt_version_tuple(v) < OPSET_21_SINCE]
    if not old:
        return tuple(QUANTIZED_PRECISIONS), ""
    since = ".".join(map(str, OPSET_21_SINCE))
    return tuple(p for p in QUANTIZED_PRECISIONS if p != Precision.INT4), (
        f"auto: the LLM is chosen from int8 weight-only and fp32 (an FP16 engine in TensorRT {old[0]}), "
        f"not int4: TensorRT {old[0]} cannot build its INT4 weight-only form (ONNX opset 21; TensorRT "
        f"{since} and later)"
    )


def _steps(
    model: Path,
    root: Path,
    opts: BuildOptions,
    log: Callable[[str], None],
    auto: tuple[tuple[str, ...], str] = (tuple(QUANTIZED_PRECISIONS), ""),
) -> Path:
    """The cache entry of the last step, every step made or reused in turn (``auto``: what
    ``auto_candidates`` says for the build's TensorRT versions)."""
    model_key = folder_digest(model, root / "file-hashes.json")
    if _streams(model, opts):  # the streaming build writes the LLM stages; the others export as below
        if opts.merge_adapters:
            raise ConfigError(
                "merged adapter variants are made from the traced export; this LLM is built by "
                "streaming its shards (its adapters are switched at run time)"
            )
        streamed = _streamed(model, root, model_key, opts, log)
        others = _other_stages(model)
        return _with_other_stages(model, root, model_key, streamed, others, opts, log) if others else streamed
    optimized, opt_key = _optimized(model, root, model_key, opts.export_options(), log)
    final = optimized
    qopts = opts.quantize_options()
    if opts.precision == "auto":
        precisions, note = auto
        if note:
            log(note)
        variants = {p: _quantized(root, optimized, opt_key, p, qopts, {}, log) for p in precisions}
        auto_key = _key(
            "auto",
            opt_key,
            json.dumps(AUTO_BUDGETS),
            *(v.name for v in variants.values()),
            *([note] if note else []),
        )
        final = cached(
            root, f"auto-{auto_key}", lambda p: assemble_auto(optimized, variants, p, log, note), log
        )
    elif opts.precision in QUANTIZED_PRECISIONS or opts.stage_precision:
        final = _quantized(root, optimized, opt_key, opts.precision, qopts, opts.stage_precision, log)
    if opts.merge_adapters:
        src = final
        merge_key = _key("merge", __version__, src.name, *opts.merge_adapters)  # src's name keys its options
        final = cached(root, f"merged-{merge_key}", lambda p: merged_variants(model, src, p, opts, log), log)
    return final


def _optimized(
    model: Path, root: Path, model_key: str, export_opts: dict, log: Callable[[str], None]
) -> tuple[Path, str]:
    """The export and optimize steps' cache entries made or reused: (optimized entry, its key)."""
    export_key = _key(
        "export", __version__, model_key, json.dumps(export_opts, sort_keys=True), tool_versions()
    )
    exported = cached(root, f"export-{export_key}", lambda p: _export(model, p, export_opts, log), log)
    opt_key = _key("optimize", export_key)
    return cached(
        root, f"optimize-{opt_key}", lambda p: _optimize(exported, p, log, root / "stages"), log
    ), opt_key


# ---- LLM variants with a LoRA adapter merged in ----------------------------------------------------


def check_merge_adapters(model: Path, names: tuple[str, ...]) -> None:
    """One sentence, before any work, unless every name is an adapter switched at run time."""
    from omniforge.pipeline.model_config import load_model_config

    cfg = load_model_config(model)
    if cfg.merge_adapter is not None or not cfg.adapters:
        raise ConfigError(
            "--merge-adapter needs a model whose adapters are switched at run time (adapters in "
            "nextgpt.json and no merge_adapter)"
        )
    unknown = [n for n in names if n not in cfg.adapters]
    if unknown:
        raise ConfigError(f"unknown adapter '{unknown[0]}'; this model has {sorted(cfg.adapters)}")


def merged_variants(
    model: Path, src: Path, dst: Path, opts: BuildOptions, log: Callable[[str], None]
) -> None:
    """``src`` plus, for each of ``opts.merge_adapters``, an in-place LLM graph with that adapter
    merged (as PEFT merges it), at the precision of the build's in-place LLM (weight-only INT4/INT8
    by round-to-nearest)."""
    from omniforge.calibration.weight_only import quantize_weights
    from omniforge.export.exporter import save_model
    from omniforge.export.llm_ort import build_llama_gqa
    from omniforge.model.loader import load_llm
    from omniforge.pipeline.model_config import load_model_config

    shutil.copytree(src, dst, dirs_exist_ok=True)
    m = load_manifest(dst, verify=False)
    cfg = load_model_config(model)
    sb = m.stage_build("llm")
    inplace = sb.require(Role.ORT_INPLACE_LLM, "llm")
    geometry = m.pipeline.stage("llm").llm
    assert geometry is not None and inplace.contract is not None
    precision = inplace.precision
    paths: list[str] = []
    for name in opts.merge_adapters:
        log(f"llm: writing a variant with adapter '{name}' merged ({precision})")
        graph = build_llama_gqa(load_llm(cfg, name), geometry.max_context, inplace.contract)
        if precision in QUANTIZED_PRECISIONS:
            graph = quantize_weights(graph, opts.quantize_options().weights(precision))
        rel = f"stages/llm.merged-{name}.{precision}.ort.onnx"
        save_model(graph, dst / rel)
        data = (f"{rel}.data",) if (dst / f"{rel}.data").exists() else ()
        sb = sb.with_variant(Variant(Role.ORT_INPLACE_LLM, rel, precision, data, inplace.contract, name))
        paths += [rel, *data]
    write_manifest(
        dst,
        Manifest(
            m.pipeline,
            {**m.stages, "llm": sb},
            _add_artifacts(dst, m.artifacts, paths),
            m.files,
            m.source,
            m.tools,
        ),
    )


# ---- the streaming LLM build (omniforge.export.llm_stream) ---------------------------------------


LLM_STAGES = ("token_embedding", "llm")  # the stages the streaming LLM build writes


def _streams(model: Path, opts: BuildOptions) -> bool:
    """Whether ``model``'s LLM stages are written by the streaming LLM build: its LLM's FP32 export
    would not fit in the memory available (``llm_stream="auto"``), or ``"always"``."""
    if opts.llm_stream == "never":
        return False
    if opts.llm_stream == "always":
        return True
    from omniforge.export.llm_stream import fits_in_memory
    from omniforge.pipeline.model_config import load_model_config

    return not fits_in_memory(load_model_config(model).llm)


def _other_stages(model: Path) -> list[str]:
    """The stages of ``model``'s pipeline the streaming LLM build does not write (none: LLM-only)."""
    from omniforge.pipeline.describe import describe
    from omniforge.pipeline.model_config import load_model_config

    return [n for n in describe(load_model_config(model)).stage_names if n not in LLM_STAGES]


def _with_other_stages(
    model: Path,
    root: Path,
    model_key: str,
    streamed: Path,
    others: list[str],
    opts: BuildOptions,
    log: Callable[[str], None],
) -> Path:
    """A NExT-GPT folder's build around its ``streamed`` LLM stages: the ``others`` (encoders,
    projectors, decoders) exported, optimized and quantized as a normal build does, then both
    joined into one build. Whatever runs the whole pipeline (the calibration capture of static
    INT8, the end-to-end accuracy) runs the other stages joined with the streamed LLM at the
    build's precision, as the LLM is never held in FP32 here."""
    fp32, key = _optimized(model, root, model_key, {**opts.export_options(), "stages": others}, log)
    if opts.precision == "fp32":
        key = _key("joined", __version__, fp32.name, streamed.name)
        return cached(root, f"joined-{key}", lambda p: join_builds(model, [fp32, streamed], p), log)
    qopts = opts.quantize_options()
    src = fp32
    if opts.precision != "fp16":
        key = _key("calibrated", __version__, fp32.name, streamed.name, qopts.key(opts.precision))
        src = cached(
            root, f"calibrated-{key}", lambda p: _with_calibration(model, fp32, streamed, p, qopts, log), log
        )
    rest = _quantized(root, src, key, opts.precision, replace(qopts, end_to_end=False), {}, log)
    key = _key("joined", __version__, rest.name, streamed.name, str(qopts.end_to_end))
    return cached(
        root, f"joined-{key}", lambda p: _joined_quantized(model, rest, streamed, fp32, p, qopts, log), log
    )


def _with_calibration(
    model: Path, src: Path, streamed: Path, dst: Path, qopts: QuantizeOptions, log: Callable[[str], None]
) -> None:
    """``src`` (stages without the LLM) plus, in ``calibration/``, the capture ``quantize_build``
    would make of it, made by running ``src`` joined with the ``streamed`` LLM stages."""
    from omniforge.calibration import capture as calib

    shutil.copytree(src, dst)
    joined = dst.parent / "joined"  # beside the entry in its temporary folder, removed with it
    join_builds(model, [src, streamed], joined, link=True)
    salt = calibration_fingerprint(load_manifest(src, verify=False))
    calib.capture(joined, dst / "calibration", qopts.inputs(), salt, log=log)
    shutil.rmtree(joined)


def _joined_quantized(
    model: Path,
    rest: Path,
    streamed: Path,
    fp32: Path,
    dst: Path,
    qopts: QuantizeOptions,
    log: Callable[[str], None],
) -> None:
    """``rest`` (the other stages quantized) joined with the ``streamed`` LLM stages, with the
    end-to-end accuracy against ``fp32`` (the other stages in FP32) joined with the same LLM."""
    join_builds(model, [rest, streamed], dst)
    if not qopts.end_to_end:
        return
    from omniforge.calibration.end_to_end import end_to_end_accuracy, end_to_end_table
    from omniforge.pipeline.manifest import atomic_write_text

    reference = dst.parent / "reference"  # beside the entry in its temporary folder, removed with it
    join_builds(model, [fp32, streamed], reference, link=True)
    e2e = end_to_end_accuracy(reference, dst, steps=qopts.inputs().steps)
    shutil.rmtree(reference)
    log(
        "end to end vs FP32 (the same streamed LLM): "
        + ", ".join(f"{k} {v:.3g}" for k, v in e2e["worst"].items())
    )
    atomic_write_text(dst / "accuracy_e2e.json", json.dumps(e2e, indent=2) + "\n")
    title = "End to end vs FP32 other stages with the same streamed LLM (same prompts and seeds, held out)"
    md = (dst / "quantize.md").read_text()
    atomic_write_text(dst / "quantize.md", f"{md}\n## {title}\n\n{end_to_end_table(e2e)}\n")
    m = load_manifest(dst, verify=False)
    known = {k: a for k, a in m.artifacts.items() if k != "quantize.md"}
    artifacts = _add_artifacts(dst, known, ["quantize.md", "accuracy_e2e.json"])
    files = {**m.files, "accuracy_e2e": "accuracy_e2e.json"}
    write_manifest(dst, Manifest(m.pipeline, m.stages, artifacts, files, m.source, m.tools))


def join_builds(model: Path, parts: list[Path], out: Path, link: bool = False) -> None:
    """One build of ``parts``, builds of disjoint stages of ``model``: every file copied (``link``:
    hard-linked; every file rewritten here is replaced, never written through), the manifest
    listing the whole pipeline's stages in its order, the parity and quantization reports joined
    (a stage of a part without one "kept FP32", as in a build whose plan keeps it), ``files``,
    ``source`` and ``tools`` merged (one precision plan over every stage)."""
    import os

    from omniforge.pipeline.describe import describe
    from omniforge.pipeline.manifest import atomic_write_text
    from omniforge.pipeline.model_config import load_model_config

    spec = describe(load_model_config(model))
    order = {n: i for i, n in enumerate(spec.stage_names)}
    ms = [load_manifest(p, verify=False) for p in parts]
    names = [n for m in ms for n in m.stages]
    assert sorted(names) == sorted(order), f"the parts' stages {names} are not the pipeline's {list(order)}"

    def place(src: str, dst: str) -> None:  # the parts share only the reports rewritten below
        Path(dst).unlink(missing_ok=True)
        (os.link if link else shutil.copy2)(src, dst)

    for p in parts:
        shutil.copytree(p, out, dirs_exist_ok=True, copy_function=place)
    stages = {n: sb for m in ms for n, sb in m.stages.items()}
    stages = {n: stages[n] for n in spec.stage_names}
    files: dict[str, str] = {}
    source: dict = {}
    tools: dict[str, str] = {}
    known: dict[str, Artifact] = {}
    for m in reversed(ms):  # where parts disagree (the model's kind, the precision asked), the first wins
        files, source, tools = {**files, **m.files}, {**source, **m.source}, {**tools, **m.tools}
        known = {**known, **m.artifacts}
    rewritten = ["parity.json", "parity.md"]
    parity = sorted(
        (r for p in parts for r in json.loads((p / "parity.json").read_text())),
        key=lambda r: order[r["stage"]],
    )
    table = [(p / "parity.md").read_text().splitlines() for p in parts]
    rows = sorted((row for t in table for row in t[2:]), key=lambda row: order[row.split("|")[1].strip()])
    for rel, text in (
        ("parity.json", json.dumps(parity, indent=2)),
        ("parity.md", "\n".join(table[0][:2] + rows)),
    ):
        (out / rel).unlink()
        atomic_write_text(out / rel, text + "\n")
    if any((p / "quantize.json").is_file() for p in parts):
        from omniforge.calibration.quantize import quantize_table

        reports = {
            r["stage"]: StageQuantization(**r)
            for p in parts
            if (p / "quantize.json").is_file()
            for r in json.loads((p / "quantize.json").read_text())
        }
        quant = [reports.get(n) or StageQuantization(n, "fp32", "kept FP32", 0, 0) for n in spec.stage_names]
        for rel, text in (
            ("quantize.json", json.dumps([asdict(r) for r in quant], indent=2)),
            ("quantize.md", quantize_table(quant)),
        ):
            (out / rel).unlink(missing_ok=True)
            atomic_write_text(out / rel, text + "\n")
        rewritten += ["quantize.json", "quantize.md"]
        files["quantize_report"] = "quantize.json"
    if "precision_plan" in source:
        source["precision_plan"] = {n: sb.precision for n, sb in stages.items()}
    for rel in rewritten:
        known.pop(rel, None)
    (out / "manifest.json").unlink()
    write_manifest(out, Manifest(spec, stages, _add_artifacts(out, known, rewritten), files, source, tools))


def _streamed(
    model: Path, root: Path, model_key: str, opts: BuildOptions, log: Callable[[str], None]
) -> Path:
    """The streaming build's cache entry: token embedding and in-place LLM graph written from the
    shards (fp16 keeps both FP32, as ``stage_plan`` does), checked layer by layer, peak RSS reported;
    no traced FP32 canonical graph, which would load the whole model."""
    if opts.precision == "auto" or opts.stage_precision or opts.backend == "tensorrt":
        raise ConfigError(
            "the streaming LLM build writes fp32, int8 or int4 for ONNX Runtime (the auto plan, per-stage "
            "precisions and TensorRT forms start from the FP32 export: llm_stream='never' where it fits)"
        )
    from omniforge.export.llm_stream import stream_llm_build_into

    precision = "fp32" if opts.precision == "fp16" else opts.precision
    wcfg = opts.quantize_options().weights(precision) if precision != "fp32" else None
    settings = json.dumps(asdict(wcfg) if wcfg else None, sort_keys=True)
    key = _key("stream", __version__, model_key, precision, settings, tool_versions())
    return cached(
        root,
        f"stream-{key}",
        lambda p: stream_llm_build_into(model, p, precision, wcfg, canonical=False, log=log),
        log,
    )


def _export(model: Path, out: Path, options: dict, log: Callable[[str], None]) -> None:
    from omniforge.export.exporter import ExportOptions, export_pipeline  # torch: only on a cache miss

    export_pipeline(model, out, ExportOptions(**options), log=log)


def _optimize(exported: Path, out: Path, log: Callable[[str], None], stage_cache: Path) -> None:
    from omniforge.passes.build import optimize_build

    optimize_build(exported, out, log=log, stage_cache=stage_cache)


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
    return cached(
        root,
        f"{precision}-{key}",
        lambda p: quantize_build(
            optimized, p, precision, log=log, options=qopts, overrides=overrides, stage_cache=root / "stages"
        ),
        log,
    )


def assemble_auto(
    fp32: Path, quantized: dict[str, Path], out: Path, log: Callable[[str], None], llm_note: str = ""
) -> None:
    """Per stage, the fastest precision whose measured accuracy meets the stage's budget;
    ``llm_note`` (why a precision was left out for the LLM) ends the LLM's report note."""
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
            budgets = budgets_for(qbuild.manifest.pipeline.stage(name).kind, AUTO_BUDGETS)
            ok = meets_budgets(report["metrics"], budgets)  # a budgeted metric not measured fails
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
        if llm_note and base.pipeline.stage(name).kind is StageKind.LLM:
            row = {**row, "note": "; ".join(filter(None, [row.get("note", ""), llm_note]))}
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
    src: Path, m: Manifest, out: Path, opts: BuildOptions, log: Callable[[str], None]
) -> tuple[Manifest, list[dict]]:
    """Copy the final step (``m``, its verified manifest) into ``out`` atomically, adding trtexec
    lines and the summary; only the added files are hashed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not (out / "manifest.json").is_file() and any(out.iterdir()):
        raise ConfigError(f"'{out}' exists and is not a build folder; refusing to replace it")
    with atomic_folder(out) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        extra: list[str] = []
        if opts.emit_trtexec:
            (tmp / "trtexec").mkdir()
            (tmp / "trtexec" / "build_engines.sh").write_text(trtexec_script(tmp, m, opts.trt_version))
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
            _add_artifacts(tmp, m.artifacts, extra),
            {**m.files, "build_summary": "build.json"},
            {**m.source, "backend": opts.backend},
            m.tools,
        )
        write_manifest(tmp, new)
    log(f"build written to {out}")
    return new, rows


def _add_artifacts(build: Path, known: dict[str, Artifact], paths: list[str]) -> dict[str, Artifact]:
    """``known`` (copied byte for byte, already verified) plus the new ``paths``, hashed."""
    return {**known, **collect_artifacts(build, [p for p in paths if p not in known])}


def trtexec_script(build: Path, m: Manifest, trt_version: str = DEFAULT_TRT_VERSION) -> str:
    """``build_engines.sh``: one trtexec line per stage for TensorRT ``trt_version``, from the graph
    TensorRT builds it from (strongly typed from 10.12; before it, with the same FP32 layers the
    Polygraphy build pins)."""
    from omniforge.engines.profiles import fp32_layers, strongly_typed, trtexec_command

    typing = "strongly typed" if strongly_typed(trt_version) else "weakly typed, norms pinned to FP32"
    lines = [
        "#!/usr/bin/env bash",
        f"# Build TensorRT engines on the target device (Jetson or datacenter GPU) with TensorRT {trt_version}"
        f" ({typing}).",
        "set -euo pipefail",
        'cd "$(dirname "$0")/.."',
        "mkdir -p engines",
    ]
    for name, sb in m.stages.items():
        graph, precision = tensorrt_source(sb, trt_version)
        pinned = [] if strongly_typed(trt_version) else fp32_layers(build / graph)
        lines.append(
            trtexec_command(
                m.pipeline.stage(name),
                graph,
                f"engines/{name}.plan",
                precision,
                "engines/timing.cache",
                fp32_layers=pinned,
                trt_version=trt_version,
            )
        )
    return "\n".join(lines) + "\n"


def tensorrt_source(sb, trt_version: str = DEFAULT_TRT_VERSION) -> tuple[str, str]:
    """(graph, precision) TensorRT ``trt_version`` builds a stage from: the standard Q/DQ graph of an
    INT8/INT4 stage (explicit quantization); strongly typed (>= 10.12), the stage's FP16 graph (norms
    kept FP32 in the graph) when it has one, else the canonical graph in FP32; weakly typed, the
    canonical graph with the FP16 flag (its norms pinned to FP32: ``fp32_layers``)."""
    from omniforge.engines.profiles import strongly_typed

    explicit = sb.variant(Role.QDQ) or sb.variant(Role.WEIGHT_ONLY_DQ)
    if sb.precision in QUANTIZED_PRECISIONS and sb.precision != "fp16" and explicit is not None:
        return explicit.file, sb.precision
    if not strongly_typed(trt_version):
        return sb.file, "fp16"
    ort = sb.variant(Role.ORT)
    if ort is not None and ort.precision == "fp16":
        return ort.file, "fp16"
    return sb.file, "fp32"


def _tensorrt_engines(build: Path, m: Manifest, log: Callable[[str], None]) -> Manifest:
    """One TensorRT engine per stage (see ``tensorrt_source``), metadata in the manifest."""
    from omniforge.engines.profiles import fp32_layers
    from omniforge.engines.tensorrt import build_engine, require_tensorrt, trt

    require_tensorrt()
    (build / "engines").mkdir(exist_ok=True)
    stages, meta = dict(m.stages), {}
    for name, sb in m.stages.items():
        rel = f"engines/{name}.plan"
        graph, precision = tensorrt_source(sb, trt.__version__)
        info = build_engine(
            m.pipeline.stage(name),
            build / graph,
            build / rel,
            precision,
            build / "engines" / "timing.cache",
            fp32_layers(build / graph),
            refittable=name == "llm" and "adapters" in m.files,  # LoRA adapters are refitted in
        )
        stages[name] = sb.with_variant(Variant(Role.TENSORRT, rel, precision))
        meta[name] = asdict(info)
        log(f"tensorrt: {name} -> {rel}")
    (build / "engines" / "engines.json").write_text(json.dumps(meta, indent=2) + "\n")
    paths = list(m.artifacts) + stage_files(stages) + ["engines/engines.json"]
    return Manifest(
        m.pipeline,
        stages,
        _add_artifacts(build, m.artifacts, paths),
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
        v = sb.variant(Role.TENSORRT) or sb.runtime_variant()
        engine = v.file
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
                "size_kib": round(sum((build / f).stat().st_size for f in (v.file, *v.data_files)) / 1024),
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
