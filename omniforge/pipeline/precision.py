"""The precisions a stage is built at, named once (torch-free).

``Precision`` members are strings (``"fp32"``, ``"fp16"``, ``"int8"``, ``"int4"``), so manifests,
option values and reports keep plain strings; every tool takes its choices from here.
"""

from __future__ import annotations

from enum import StrEnum


class Precision(StrEnum):
    """What a stage's served graph computes in (int4/int8 of the LLM: its weights)."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"


AUTO = "auto"  # a build's plan: per stage, the fastest precision meeting its accuracy budget
STAGE_PRECISIONS: tuple[Precision, ...] = tuple(Precision)  # what one stage can be built at
QUANTIZED_PRECISIONS = (Precision.FP16, Precision.INT8, Precision.INT4)  # what `quantize` makes
BUILD_PRECISIONS: tuple[str, ...] = (*STAGE_PRECISIONS, AUTO)  # what `build --precision` takes


def weight_bits(precision: str) -> int:
    """Bits of the LLM's weight-only codes at ``precision`` (int4: 4, int8: 8)."""
    return 4 if precision == Precision.INT4 else 8
