"""TensorRT optimization profiles and trtexec command lines, derived from the stage description.

Pure Python: the min/opt/max of every dynamic axis comes from the ``StageSpec`` dims (derived
dims such as the LLM's ``total = past + seq`` are summed), so the engine builder, ``trtexec`` and
the benchmarks agree on shapes.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from omniforge.errors import ConfigError
from omniforge.pipeline.spec import StageSpec

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")


@dataclass(frozen=True)
class InputProfile:
    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def profile_for(stage: StageSpec) -> list[InputProfile]:
    """One TensorRT optimization profile: min/opt/max shapes for every input of ``stage``."""
    sizes = {p: stage.resolve(p) for p in ("min", "opt", "max")}
    return [
        InputProfile(
            t.name,
            t.concrete_shape(sizes["min"]),
            t.concrete_shape(sizes["opt"]),
            t.concrete_shape(sizes["max"]),
        )
        for t in stage.inputs
    ]


def precision_flags(precision: str) -> list[str]:
    """trtexec flags for a build precision (INT8/INT4 come from the graph's explicit Q/DQ nodes)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    return {
        "fp32": [],
        "fp16": ["--fp16"],
        "bf16": ["--bf16"],
        "int8": ["--fp16", "--int8"],  # explicit quantization: Q/DQ in the graph, FP16 for the rest
        "int4": ["--fp16", "--int4"],
    }[precision]


def _shapes(p: list[InputProfile], which: str) -> str:
    return ",".join(f"{i.name}:{'x'.join(str(d) for d in getattr(i, which))}" for i in p)


def trtexec_command(
    stage: StageSpec,
    onnx_path: str,
    engine_path: str,
    precision: str = "fp16",
    timing_cache: str = "timing.cache",
    fp32_layers: list[str] | None = None,
) -> str:
    """The exact ``trtexec`` command that builds ``stage`` on the target device."""
    prof = profile_for(stage)
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if any(i.min != i.max for i in prof):
        args += [
            f"--minShapes={_shapes(prof, 'min')}",
            f"--optShapes={_shapes(prof, 'opt')}",
            f"--maxShapes={_shapes(prof, 'max')}",
        ]
    args += precision_flags(precision)
    args += [f"--timingCacheFile={timing_cache}"]
    if fp32_layers and precision != "fp32":  # norms stay FP32 (LayerNorm overflows in FP16)
        args += [
            "--precisionConstraints=obey",
            "--layerPrecisions=" + ",".join(f"{n}:fp32" for n in fp32_layers),
        ]
    return " ".join(shlex.quote(a) for a in args)
