"""Which graph of each stage TensorRT would build from, and its violations per version."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from omniforge.engines.profiles import InputProfile
from omniforge.engines.trt_check.graph import Violation
from omniforge.engines.trt_check.rules import Target, check_model
from omniforge.engines.trt_check.versions import version
from omniforge.pipeline.contracts import Contract, Role
from omniforge.pipeline.manifest import Manifest, StageBuild, Variant, load_manifest, read_verified


@dataclass(frozen=True)
class StageFinding:
    stage: str
    trt_version: str
    variant: Variant
    violations: tuple[Violation, ...]


def trt_graph(sb: StageBuild) -> Variant:
    """The variant a TensorRT engine of this stage is built from (docs/manifest.md): ``qdq`` or
    ``weight_only_dq`` for INT8/INT4 stages, the FP16 ``ort`` graph of an FP16 stage, else
    ``canonical``."""
    if sb.precision in ("int8", "int4"):
        found = sb.variant(Role.QDQ) or sb.variant(Role.WEIGHT_ONLY_DQ)
        if found is not None:
            return found
    ort = sb.variant(Role.ORT)
    if ort is not None and ort.precision == "fp16":
        return ort
    return sb.canonical


def input_profiles(contract: Contract) -> tuple[InputProfile, ...]:
    """min/opt/max shapes of every input from the contract's named dims."""
    sizes = {p: {d.name: getattr(d, p) for d in contract.dims} for p in ("min", "opt", "max")}
    return tuple(
        InputProfile(t.name, *(t.concrete_shape(sizes[p]) for p in ("min", "opt", "max")))
        for t in contract.inputs
    )


def check_build(
    build: str | Path, versions: list[str], stages: list[str] | None = None
) -> list[StageFinding]:
    """Every stage's TensorRT graph (or those of ``stages``) checked for every version in ``versions``."""
    build = Path(build)
    targets = [version(v) for v in versions]
    m = load_manifest(build, verify=False)
    for s in stages or ():
        m.stage_build(s)  # StageError for a stage the build does not have
    out = []
    for name in stages or list(m.stages):
        variant = trt_graph(m.stage_build(name))
        model = _load(build, m, variant)
        profiles = input_profiles(m.contract(name, variant))
        for v in targets:
            found = check_model(model, Target(v, profiles))
            out.append(StageFinding(name, v.name, variant, tuple(found)))
    return out


def _load(build: Path, m: Manifest, variant: Variant) -> onnx.ModelProto:
    """The variant's graph, hashed as it is read; external weights are not loaded (the rules read
    only types, shapes and small constants)."""
    return onnx.load_from_string(read_verified(build, m, variant.file))
