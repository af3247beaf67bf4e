"""Run the optimisation passes on one stage's graph and prove the result by parity."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from omniforge.passes.base import PassReport, scaled_error
from omniforge.passes.cleanup import clean_shapes, fold_constants, fuse_linear
from omniforge.passes.fold_norm_linear import fold_norm_into_linear
from omniforge.passes.norms import recognize_norms
from omniforge.pipeline.spec import StageSpec

Pass = Callable[[ir.Model], PassReport]


def default_passes(target: str = "onnx") -> list[Pass]:
    """The standard pipeline; ``target`` "onnxruntime" also uses ORT's RMS-norm op."""
    return [
        fold_constants,
        clean_shapes,
        lambda m: recognize_norms(m, target),
        fold_norm_into_linear,
        fuse_linear,
        fold_constants,
    ]


@dataclass
class StageOptimization:
    stage: str
    nodes_before: int
    nodes_after: int
    passes: list[PassReport] = field(default_factory=list)
    max_abs_err: float = 0.0
    passed: bool = True

    def summary(self) -> dict:
        return {
            "stage": self.stage,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "max_abs_err": self.max_abs_err,
            "passed": self.passed,
            "passes": [{"name": p.name, "fired": p.fired, "notes": p.notes} for p in self.passes],
        }


def optimize_stage(
    proto: onnx.ModelProto, stage: StageSpec, passes: list[Pass] | None = None, atol: float = 1e-5
) -> tuple[onnx.ModelProto, StageOptimization]:
    """Apply ``passes``; keep the result only if it matches the input graph within ``atol`` (scaled)."""
    model = ir.from_proto(proto)
    result = StageOptimization(stage.name, len(proto.graph.node), 0)
    for p in passes or default_passes():
        result.passes.append(p(model))
    out = ir.to_proto(model)
    result.nodes_after = len(out.graph.node)
    result.max_abs_err = max(
        scaled_error(proto, out, stage.sample_inputs(point, seed=100 + i))
        for i, point in enumerate(stage.parity_points())
    )
    result.passed = bool(np.isfinite(result.max_abs_err) and result.max_abs_err <= atol)
    return out, result
