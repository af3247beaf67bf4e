"""The one description of a pipeline: stages, their tensors, dynamic axes and sample inputs.

Pure stdlib + numpy. The exporter, the graph passes, the calibrator, the engine builder, the
runtime and the benchmarks all read these dataclasses; a stage is described here once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from omniforge.errors import StageError


class StageKind(StrEnum):
    EMBEDDING = "embedding"
    ENCODER = "encoder"
    INPUT_PROJECTOR = "input_projector"
    LLM = "llm"
    OUTPUT_PROJECTOR = "output_projector"
    DECODER = "decoder"
    VAE = "vae"
    VOCODER = "vocoder"


@dataclass(frozen=True)
class Dim:
    """A named dynamic axis with the sizes a TensorRT optimization profile needs.

    A derived dim (``sum_of``) is the sum of other dims of the same stage, e.g. the LLM's
    ``total = past + seq``; its min/opt/max are the sums of theirs.
    """

    name: str
    min: int
    opt: int
    max: int
    sum_of: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.opt <= self.max:
            raise StageError(
                f"dim '{self.name}' needs 0 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}"
            )


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: dtype and shape (ints are static, strings name a ``Dim``).

    ``fill`` says how sample values are drawn: ``normal`` (mean 0, std ``high`` or 1), ``uniform``
    and ``randint`` in [low, high), ``ones``, or ``positions`` (``past + arange(seq)``, for
    position ids).
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    fill: str = "normal"
    low: float = 0.0
    high: float = 1.0

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def concrete_shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.shape)


@dataclass(frozen=True)
class Tolerance:
    """Parity tolerance of an exported stage against PyTorch (max abs error after scaling)."""

    atol: float = 1e-4
    rtol: float = 1e-3


@dataclass(frozen=True)
class LlmGeometry:
    """What the runtime's KV-cache manager needs to know about the LLM stage."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_context: int


class NamedTensors:
    """Names of the ``inputs`` and ``outputs`` of a stage or a graph contract, in order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass(frozen=True)
class StageSpec(NamedTensors):
    """One stage of the pipeline, described once."""

    name: str
    kind: StageKind
    component: str  # which part of the model folder the weights come from
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: tuple[Dim, ...]
    tolerance: Tolerance = Tolerance()
    # Shapes the parity check runs at, as partial {dim: size} (missing dims take ``opt``);
    # empty: ``opt`` and a second point where every dim differs from ``opt``.
    check_points: tuple[dict[str, int], ...] = ()
    modality: str | None = None
    llm: LlmGeometry | None = None

    def parity_points(self) -> list[dict[str, int]]:
        if self.check_points:
            return [dict(p) for p in self.check_points]
        free = [d for d in self.dims if not d.sum_of]
        alt = {d.name: d.opt + 1 if d.opt < d.max else max(d.min, d.opt - 1) for d in free}
        return [{}, alt]

    def dim(self, name: str) -> Dim:
        for d in self.dims:
            if d.name == name:
                return d
        raise StageError(f"stage '{self.name}' has no dim '{name}'")

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes for t in (*self.inputs, *self.outputs) if t.dynamic_axes}

    def resolve(self, point: str | dict[str, int] = "opt") -> dict[str, int]:
        """Concrete size of every dim: a profile name (min/opt/max) or a partial {dim: size}."""
        if isinstance(point, str):  # a profile corner: every dim, derived ones too, at its own min/opt/max
            if point not in ("min", "opt", "max"):
                raise StageError(f"unknown profile point '{point}' (use min, opt or max)")
            return {d.name: getattr(d, point) for d in self.dims}
        else:
            unknown = set(point) - {d.name for d in self.dims}
            if unknown:
                raise StageError(f"stage '{self.name}' has no dim(s) {sorted(unknown)}")
            sizes = {d.name: point.get(d.name, d.opt) for d in self.dims if not d.sum_of}
        for d in self.dims:
            if d.sum_of:
                sizes[d.name] = sum(sizes[s] for s in d.sum_of)
        for d in self.dims:
            if not d.min <= sizes[d.name] <= d.max:
                raise StageError(
                    f"stage '{self.name}': dim '{d.name}'={sizes[d.name]} is outside [{d.min}, {d.max}]"
                )
        return sizes

    def sample_inputs(self, point: str | dict[str, int] = "opt", seed: int = 0) -> dict[str, np.ndarray]:
        """Seeded inputs of this stage at a profile point; the same seed gives the same arrays."""
        sizes = self.resolve(point)
        rng = np.random.default_rng(seed)
        return {t.name: _sample(t, sizes, rng) for t in self.inputs}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = str(self.kind)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageSpec:
        return cls(
            name=d["name"],
            kind=StageKind(d["kind"]),
            component=d["component"],
            inputs=tuple(_tensor(t) for t in d["inputs"]),
            outputs=tuple(_tensor(t) for t in d["outputs"]),
            dims=tuple(Dim(**{**x, "sum_of": tuple(x.get("sum_of", ()))}) for x in d["dims"]),
            tolerance=Tolerance(**d["tolerance"]),
            check_points=tuple(dict(p) for p in d["check_points"]),
            modality=d.get("modality"),
            llm=LlmGeometry(**d["llm"]) if d.get("llm") else None,
        )


def _tensor(d: dict[str, Any]) -> TensorSpec:
    return TensorSpec(**{**d, "shape": tuple(d["shape"])})


def _sample(t: TensorSpec, sizes: dict[str, int], rng: np.random.Generator) -> np.ndarray:
    shape = t.concrete_shape(sizes)
    dtype = np.dtype(t.dtype)
    if t.fill == "normal":
        return (rng.standard_normal(shape) * t.high).astype(dtype)
    if t.fill == "uniform":
        return rng.uniform(t.low, t.high, size=shape).astype(dtype)
    if t.fill == "randint":
        return rng.integers(int(t.low), int(t.high), size=shape).astype(dtype)
    if t.fill == "ones":
        return np.ones(shape, dtype=dtype)
    if t.fill == "positions":
        past = sizes.get("past", 0)
        return np.broadcast_to(past + np.arange(shape[-1]), shape).astype(dtype).copy()
    raise StageError(f"tensor '{t.name}' has unknown fill '{t.fill}'")


@dataclass(frozen=True)
class Edge:
    """Data flowing from one stage's output to another's input (``via`` names the glue step)."""

    src: str  # "stage.output"
    dst: str  # "stage.input"
    via: str = ""


@dataclass(frozen=True)
class PipelineSpec:
    """All stages of a model plus how they connect and the tokens that route between them."""

    name: str
    stages: tuple[StageSpec, ...]
    edges: tuple[Edge, ...] = ()
    signal_tokens: dict[str, list[str]] = field(default_factory=dict)
    placeholders: dict[str, str] = field(default_factory=dict)

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        known = ", ".join(s.name for s in self.stages)
        raise StageError(f"unknown stage '{name}'; this pipeline has: {known}")

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def select(self, names: list[str] | None) -> PipelineSpec:
        """The same pipeline restricted to ``names`` (all stages when None)."""
        if not names:
            return self
        chosen = [self.stage(n) for n in names]
        keep = {s.name for s in chosen}
        edges = tuple(e for e in self.edges if e.src.split(".")[0] in keep and e.dst.split(".")[0] in keep)
        return PipelineSpec(self.name, tuple(chosen), edges, self.signal_tokens, self.placeholders)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stages": [s.to_dict() for s in self.stages],
            "edges": [asdict(e) for e in self.edges],
            "signal_tokens": self.signal_tokens,
            "placeholders": self.placeholders,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PipelineSpec:
        return cls(
            name=d["name"],
            stages=tuple(StageSpec.from_dict(s) for s in d["stages"]),
            edges=tuple(Edge(**e) for e in d["edges"]),
            signal_tokens={k: list(v) for k, v in d["signal_tokens"].items()},
            placeholders=dict(d["placeholders"]),
        )
