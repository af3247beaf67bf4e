"""``optimize`` over a whole build folder: passes per stage, ORT lowering, report, atomic replace."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import onnx
import onnxruntime as ort

from omniforge.errors import ConfigError
from omniforge.passes.base import scaled_error
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


def optimize_build(
    build: str | Path,
    out: str | Path | None = None,
    lower: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[Manifest, list[StageOptimization]]:
    """Optimise every stage of ``build`` into ``out`` (default: replace ``build`` atomically)."""
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
