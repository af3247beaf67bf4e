"""``optimize`` over a whole build folder: passes per stage, ORT lowering, report, atomic replace."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import onnx
import onnxruntime as ort

from omniforge.errors import ConfigError
from omniforge.passes.base import PassReport, scaled_error
from omniforge.passes.lower_ort import lower_for_onnxruntime
from omniforge.passes.manager import StageOptimization, default_passes, optimize_stage
from omniforge.pipeline.atomic import atomic_folder
from omniforge.pipeline.contracts import Role
from omniforge.pipeline.manifest import (
    Manifest,
    Variant,
    atomic_write_text,
    collect_artifacts,
    load_manifest,
    stage_files,
    write_manifest,
)

REPORT = "optimize.json"


def _nodes(path: Path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def _stage_key(manifest: Manifest, name: str, lower: bool) -> str | None:
    """A stage's optimization key: its graph's digest, its description and the tools' versions
    (None for a graph with external data, which is not cached)."""
    from omniforge import __version__

    sb = manifest.stages[name]
    if sb.data_files:
        return None
    spec = json.dumps(manifest.pipeline.stage(name).to_dict(), sort_keys=True)
    text = "\n".join(
        [manifest.artifacts[sb.file].sha256, spec, str(lower), __version__, ort.__version__, onnx.__version__]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _from_summary(d: dict) -> StageOptimization:
    passes = [PassReport(p["name"], p["fired"], list(p["notes"])) for p in d["passes"]]
    return StageOptimization(
        d["stage"], d["nodes_before"], d["nodes_after"], passes, d["max_abs_err"], d["passed"]
    )


def optimize_build(
    build: str | Path,
    out: str | Path | None = None,
    lower: bool = True,
    log: Callable[[str], None] = print,
    stage_cache: Path | None = None,
) -> tuple[Manifest, list[StageOptimization]]:
    """Optimise every stage of ``build`` into ``out`` (default: replace ``build`` atomically).
    ``stage_cache``: a folder keeping each stage's result by its graph's digest, so that a stage
    optimized before (in any build) is copied instead of optimized again."""
    build = Path(build)
    manifest = load_manifest(build, verify=True)
    if (build / REPORT).is_file():
        raise ConfigError(f"'{build}' is already optimized (it has {REPORT}); optimize the original export")
    target = Path(out) if out else build
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(target) as tmp:
        shutil.copytree(build, tmp, dirs_exist_ok=True)
        results: list[StageOptimization] = []
        stages = dict(manifest.stages)
        n = len(stages)
        for i, (name, sb) in enumerate(stages.items(), 1):
            t0 = time.perf_counter()
            spec = manifest.pipeline.stage(name)
            path = tmp / sb.file
            key = _stage_key(manifest, name, lower) if stage_cache is not None else None
            entry = stage_cache / f"optimize-{key}" if stage_cache is not None and key else None
            if entry is not None and (entry / "result.json").is_file():
                shutil.copyfile(entry / "graph.onnx", path)
                res = _from_summary(json.loads((entry / "result.json").read_text()))
                if (entry / "graph.ort.onnx").is_file():
                    rel = f"stages/{name}.ort.onnx"
                    shutil.copyfile(entry / "graph.ort.onnx", tmp / rel)
                    sb = sb.with_variant(Variant(Role.ORT, rel, sb.precision))
                stages[name] = replace(sb, nodes=_nodes(path))
                results.append(res)
                log(f"[{i}/{n}] {name}: {res.nodes_before} -> {res.nodes_after} nodes (cached)")
                continue
            proto = onnx.load(str(path))
            new, res = optimize_stage(proto, spec, default_passes("onnx"))
            if res.passed:
                onnx.save_model(new, str(path))
            if lower and sb.variant(Role.ORT_INPLACE_LLM) is None:  # the LLM has its own in-place ORT graph
                rel = f"stages/{name}.ort.onnx"
                lower_for_onnxruntime(path, tmp / rel)
                err = max(
                    scaled_error(
                        onnx.load(str(path)), onnx.load(str(tmp / rel)), spec.sample_inputs(p, seed=7)
                    )
                    for p in spec.parity_points()
                )
                if err <= 1e-5:
                    sb = sb.with_variant(Variant(Role.ORT, rel, sb.precision))
                else:
                    (tmp / rel).unlink()
                    res.passes[-1].notes.append(f"ORT lowering dropped: error {err:.1e}")
            stages[name] = replace(sb, nodes=_nodes(path))
            results.append(res)
            if entry is not None:
                _keep(entry, path, sb, tmp, res)
            status = "ok" if res.passed else "kept original (parity failed)"
            log(
                f"[{i}/{n}] {name}: {res.nodes_before} -> {res.nodes_after} nodes, error {res.max_abs_err:.1e}, "
                f"{time.perf_counter() - t0:.1f}s {status}"
            )
        atomic_write_text(tmp / REPORT, json.dumps([r.summary() for r in results], indent=2) + "\n")
        atomic_write_text(tmp / "optimize.md", optimize_table(results) + "\n")
        paths = list(manifest.artifacts) + stage_files(stages) + [REPORT, "optimize.md"]
        files = {**manifest.files, "optimize_report": REPORT}
        new_manifest = Manifest(
            pipeline=manifest.pipeline,
            stages=stages,
            artifacts=collect_artifacts(tmp, paths),
            files=files,
            source={**manifest.source, "optimized": True, "onnxruntime": ort.__version__},
            tools=manifest.tools,
        )
        write_manifest(tmp, new_manifest)
    return new_manifest, results


def _keep(entry: Path, path: Path, sb, build: Path, res: StageOptimization) -> None:
    """One stage's optimized graphs and result into the stage cache, whole or not at all."""
    with atomic_folder(entry) as part:
        shutil.copyfile(path, part / "graph.onnx")
        ort_variant = sb.variant(Role.ORT)
        if ort_variant is not None:
            shutil.copyfile(build / ort_variant.file, part / "graph.ort.onnx")
        (part / "result.json").write_text(json.dumps(res.summary()) + "\n")


def optimize_table(results: list[StageOptimization]) -> str:
    rows = [
        "| stage | nodes before | nodes after | fired | norms left (why) | max error | result |",
        "|---|---:|---:|---|---|---:|---|",
    ]
    for r in results:
        fired = ", ".join(f"{p.name} x{p.fired}" for p in r.passes if p.fired) or "-"
        notes = "; ".join(n for p in r.passes for n in p.notes) or "-"
        rows.append(
            f"| {r.stage} | {r.nodes_before} | {r.nodes_after} | {fired} | {notes} | {r.max_abs_err:.1e} | "
            f"{'ok' if r.passed else 'kept original'} |"
        )
    return "\n".join(rows)
