"""Per-stage comparison of two builds on the same seeded inputs, with Polygraphy's comparator.

Each stage's runtime graph from build A and build B runs in ONNX Runtime (Polygraphy's
``OnnxrtRunner``) on the stage's seeded inputs at its parity shapes; Polygraphy's
``CompareFunc.simple`` decides pass/fail per output at the given tolerances, and the largest
absolute / relative errors are reported. A stage with a TensorRT engine (where TensorRT is
installed) runs through it. The LLM is compared through its in-place graphs (logits over a decode
sequence), since that is what the runtime executes, unless either build has a TensorRT engine for
it: then the engine runs on the stage's seeded inputs against the other build's graph of the same
interface (the one TensorRT builds from: the canonical graph, or the weight-only ``DequantizeLinear``
form) in ONNX Runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omniforge._lazy import lazy_import
from omniforge.errors import StageError
from omniforge.pipeline.contracts import Role, Slot
from omniforge.pipeline.manifest import Manifest, load_manifest, runtime_file

polygraphy_onnxrt = lazy_import("polygraphy.backend.onnxrt", extra="gpu")
polygraphy_comparator = lazy_import("polygraphy.comparator", extra="gpu")


@dataclass
class StageComparison:
    stage: str
    precision_a: str
    precision_b: str
    max_abs: float
    max_rel: float
    cosine: float
    passed: bool


def onnx_graph(m: Manifest, name: str, engine_interface: bool = False) -> str:
    """The graph ONNX Runtime runs for stage ``name`` in a comparison: the one the runtime serves,
    or, with ``engine_interface``, the one a TensorRT engine of the stage is built from (same
    inputs and outputs as the engine; for the LLM, the explicit-cache graph, not the in-place one)."""
    if engine_interface:
        from omniforge.engines.trt_check.build import trt_graph

        return trt_graph(m.stage_build(name)).file
    return runtime_file(m, name)


def _runner(build: Path, m: Manifest, name: str, tag: str, engine_interface: bool = False):
    """Polygraphy runner for the stage as the build serves it: its TensorRT engine where it has one
    (and TensorRT is here), else its ONNX Runtime graph (``onnx_graph``)."""
    if m.stage_build(name).variant(Role.TENSORRT) is not None:
        from omniforge.engines.tensorrt import load_engine_checked, polygraphy_trt

        engine = load_engine_checked(build, m, name)
        return polygraphy_trt.TrtRunner(engine, name=tag)
    return polygraphy_onnxrt.OnnxrtRunner(
        polygraphy_onnxrt.SessionFromOnnx(str(build / onnx_graph(m, name, engine_interface))), name=tag
    )


def _has_engine(m: Manifest, name: str) -> bool:
    return m.stage_build(name).variant(Role.TENSORRT) is not None


def _errors(ra: list[dict], rb: list[dict]) -> tuple[float, float, float]:
    from omniforge.calibration.metrics import cosine

    max_abs = max_rel = 0.0
    cos = 1.0
    for a, b in zip(ra, rb, strict=True):
        for k in a:
            x, y = np.asarray(a[k], np.float64), np.asarray(b[k], np.float64)
            if not x.size:
                continue
            d = float(np.max(np.abs(x - y)))
            max_abs = max(max_abs, d)
            max_rel = max(max_rel, d / max(float(np.max(np.abs(x))), 1e-12))
            cos = min(cos, cosine(x, y))
    return max_abs, max_rel, cos


def compare_builds(
    a: str | Path, b: str | Path, atol: float = 1e-3, rtol: float = 1e-3, stages: list[str] | None = None
) -> list[StageComparison]:
    a, b = Path(a), Path(b)
    ma, mb = load_manifest(a), load_manifest(b)
    names = stages or [n for n in ma.stages if n in mb.stages]
    for n in names:
        if n not in ma.stages or n not in mb.stages:
            raise StageError(f"stage '{n}' is not in both builds")
    comparator = polygraphy_comparator
    out = []
    for name in names:
        spec = ma.pipeline.stage(name)
        engines = _has_engine(ma, name) or _has_engine(mb, name)
        inplace = ma.stage_build(name).variant(Role.ORT_INPLACE_LLM) is not None
        if inplace and not engines:
            ra, rb = _llm_logits(a, ma, name), _llm_logits(b, mb, name)
            max_abs, max_rel, cos = _errors(ra, rb)
            passed = all(
                np.allclose(x, y, atol=atol, rtol=rtol)
                for x, y in zip(ra[0].values(), rb[0].values(), strict=True)
            )
        else:
            feeds = [spec.sample_inputs(p, seed=300 + i) for i, p in enumerate(spec.parity_points())]
            runners = [
                _runner(build, m, name, tag, engine_interface=inplace)
                for build, m, tag in ((a, ma, "A"), (b, mb, "B"))
            ]
            results = comparator.Comparator.run(runners, data_loader=feeds)
            accuracy = comparator.Comparator.compare_accuracy(
                results, compare_func=comparator.CompareFunc.simple(atol=atol, rtol=rtol)
            )
            passed = bool(accuracy)
            by_runner = dict(results.items())  # RunResults: runner name -> iteration results
            max_abs, max_rel, cos = _errors(
                [dict(r) for r in by_runner["A"]], [dict(r) for r in by_runner["B"]]
            )
        out.append(
            StageComparison(
                name, ma.stages[name].precision, mb.stages[name].precision, max_abs, max_rel, cos, passed
            )
        )
    return out


def _llm_logits(build: Path, m: Manifest, name: str) -> list[dict]:
    """Logits of the in-place LLM graph after a 12-row prompt and over 8 decode steps."""
    from omniforge.runtime.llm import LlmEngine, probe

    g = m.pipeline.stage(name).llm
    variant = m.variant(name, Role.ORT_INPLACE_LLM)
    engine = LlmEngine(build / variant.file, g, contract=variant.contract, preset="measurement")
    rows = (np.random.default_rng(5).standard_normal((20, g.hidden_size)) * 0.05).astype(np.float32)
    return [{engine.names[Slot.LOGITS]: probe(engine, [rows[:12]], [rows[12:]]).logits[0]}]


def comparison_table(rows: list[StageComparison], atol: float, rtol: float) -> str:
    lines = [
        f"| stage | A | B | max abs err | max rel err | cosine | within atol {atol:g}, rtol {rtol:g} |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.stage} | {r.precision_a} | {r.precision_b} | {r.max_abs:.2e} | {r.max_rel:.2e} | "
            f"{r.cosine:.5f} | {'yes' if r.passed else 'NO'} |"
        )
    return "\n".join(lines)
