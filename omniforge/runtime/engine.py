"""``Engine``: one stage's inference session, checked against its description.

ONNX Runtime only: the runtime has no TensorRT path yet (TensorRT engines are built and compared
by ``omniforge.engines``, not served here). Inputs are validated
(names, dtypes, ranks, static sizes, dynamic sizes within the stage's min/max) before the session
sees them, so a caller gets one clear ``InputError`` instead of a backend traceback.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from omniforge.errors import ConfigError, EngineError, InputError
from omniforge.pipeline.contracts import Contract
from omniforge.pipeline.spec import StageSpec

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class SessionConfig:
    """ONNX Runtime session settings shared by a build's engines."""

    threads: int = 0  # intra-op threads; 0: one per CPU core
    graph_optimization: str = "all"  # disable | basic | extended | all
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    extra: dict[str, str] = field(default_factory=dict)  # session config entries

    def __post_init__(self) -> None:
        if self.graph_optimization not in _OPT_LEVELS:
            raise ConfigError(
                f"graph optimization '{self.graph_optimization}' is not one of {sorted(_OPT_LEVELS)}"
            )
        most = 4 * (os.cpu_count() or 1)  # more threads than this only contend for the cores
        t = self.threads
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= most:
            raise ConfigError(
                f"threads must be an integer in [0, {most}] (4 per core here; 0: one per core), got {t!r}"
            )
        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            raise ConfigError(
                f"execution provider(s) {missing} are not available in this onnxruntime "
                f"(available: {ort.get_available_providers()})"
            )

    def one_shot(self) -> SessionConfig:
        """These settings for a stage called once per step (encoders, projectors, decoders): its
        worker threads stop spinning after each run instead of competing with the next stage's
        session for the cores (measured: a UNet step right after another session ran 4x slower).
        The LLM's decode loop keeps spinning, which is what makes back-to-back tokens fast."""
        if "session.force_spinning_stop" in self.extra:
            return self
        return replace(self, extra={**self.extra, "session.force_spinning_stop": "1"})

    def session_options(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads or (os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = _OPT_LEVELS[self.graph_optimization]
        opts.log_severity_level = 3
        for k, v in self.extra.items():
            opts.add_session_config_entry(k, v)
        return opts


@dataclass(frozen=True)
class GraphSource:
    """A graph to open from verified bytes; ``data_dir``: where its external data lies."""

    data: bytes
    data_dir: Path | None = None
    name: str = "in-memory graph"


PRESETS = ("serving", "one_shot", "measurement", "trial", "exact", "lowering")


def session_options(preset: str, config: SessionConfig | None = None) -> ort.SessionOptions:
    """ONNX Runtime options for one of the named uses of a graph:

    - ``serving``: the build's settings as served (the LLM's decode loop: worker threads spin);
    - ``one_shot``: served settings for a stage called once per step (threads stop spinning);
    - ``measurement``: parity and accuracy, under the served optimisation level;
    - ``trial``: a session made, run a few times and dropped (basic optimisations: fast to create);
    - ``exact``: no graph optimisation, to judge a graph as written (graph-pass parity);
    - ``lowering``: ONNX Runtime's extended optimisations, saved as the lowered graph.
    """
    if preset not in PRESETS:
        raise ConfigError(f"session preset '{preset}' is not one of {', '.join(PRESETS)}")
    cfg = config or SessionConfig()
    if preset in ("one_shot", "measurement"):
        cfg = cfg.one_shot()
    elif preset == "trial":
        cfg = replace(cfg.one_shot(), graph_optimization="basic")
    elif preset == "exact":
        cfg = replace(cfg.one_shot(), graph_optimization="disable")
    elif preset == "lowering":
        cfg = replace(cfg, graph_optimization="extended")
    return cfg.session_options()


def open_session(
    model: str | Path | bytes | GraphSource,
    preset: str = "one_shot",
    config: SessionConfig | None = None,
    save_to: Path | None = None,
) -> ort.InferenceSession:
    """The one place omniforge creates an ONNX Runtime session (``model``: a path, serialized
    bytes or a verified ``GraphSource``); a load failure is an ``EngineError`` naming the graph.
    ``save_to``: write the graph as ONNX Runtime optimised it (the ``lowering`` preset)."""
    cfg = config or SessionConfig()
    opts = session_options(preset, cfg)
    if save_to is not None:
        opts.optimized_model_filepath = str(save_to)
    if isinstance(model, GraphSource):
        src, label = model.data, Path(model.name).name
        if model.data_dir is not None:
            opts.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(model.data_dir)
            )
    else:
        src = model if isinstance(model, bytes) else str(model)
        label = "in-memory graph" if isinstance(model, bytes) else Path(model).name
    try:
        session = ort.InferenceSession(src, opts, providers=list(cfg.providers))
    except Exception as exc:  # ORT raises several exception types for unreadable models
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineError(f"cannot load engine '{label}': {first}") from None
    # ORT's Python session keeps the serialized model for a provider fallback omniforge never asks
    # for: a second copy of an embedded graph's weights for the session's lifetime
    if isinstance(src, bytes) and getattr(session, "_model_bytes", None) is not None:
        session._model_bytes = None
    return_freed_memory()  # the load's transient copies (parsed proto, unpacked weights)
    return session


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing),
    so that freed memory leaves the process's RSS instead of waiting for reuse."""
    global _TRIM
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # not glibc
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


def available_memory() -> int:
    """Bytes the kernel reports available (``MemAvailable``), or the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class Engine:
    """A loaded stage: validate inputs against the ``StageSpec``, run, return named outputs."""

    def __init__(
        self,
        source: Path | GraphSource,
        spec: StageSpec,
        config: SessionConfig | None = None,
        contract: Contract | None = None,
        preset: str = "one_shot",
    ) -> None:
        self.path = Path(source.name if isinstance(source, GraphSource) else source)
        self.spec = spec
        self.contract = contract or Contract.of_stage(spec)
        self.config = config or SessionConfig()
        self.session = open_session(source, preset, self.config)
        check_graph_io(self.session, self.contract, f"stage '{spec.name}'", self.path.name)

    @property
    def name(self) -> str:
        return self.spec.name

    def validate(self, feeds: dict[str, np.ndarray]) -> None:
        validate_feeds(self.contract, feeds, self.spec.name)

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        self.validate(feeds)
        names = outputs or self.contract.output_names
        try:
            values = self.session.run(names, feeds)
        except Exception as exc:  # shapes that pass validation but fail inside the graph
            raise EngineError(f"stage '{self.name}' failed: {str(exc).strip().splitlines()[0]}") from None
        return dict(zip(names, values, strict=True))


_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def check_graph_io(session: ort.InferenceSession, contract: Contract, what: str, file: str) -> None:
    """``EngineError`` unless the graph's inputs and outputs are the contract's: names in order,
    dtypes and ranks (a graph swapped for another one is refused at load, not after a run)."""
    for kind, got, want in (
        ("inputs", session.get_inputs(), contract.inputs),
        ("outputs", session.get_outputs(), contract.outputs),
    ):
        names = [g.name for g in got]
        if names != [t.name for t in want]:
            raise EngineError(
                f"engine '{file}' has {kind} {names}, but {what} declares {[t.name for t in want]}"
            )
        for g, t in zip(got, want, strict=True):
            dtype = _ORT_TYPES.get(g.type, g.type)
            shape = list(g.shape) if g.shape is not None else list(t.shape)
            static_ok = all(
                not (isinstance(a, int) and isinstance(b, int)) or a == b
                for a, b in zip(shape, t.shape, strict=False)
            )
            if dtype != t.dtype or len(shape) != len(t.shape) or not static_ok:
                raise EngineError(
                    f"engine '{file}' {kind[:-1]} '{g.name}' is {dtype} {shape}, but {what} "
                    f"declares {t.dtype} {list(t.shape)}"
                )


def validate_feeds(spec: StageSpec | Contract, feeds: dict[str, np.ndarray], name: str = "") -> None:
    """Raise ``InputError`` unless ``feeds`` match the inputs of a stage (or a graph's contract) exactly."""
    name = name or getattr(spec, "name", "graph")
    expected = spec.input_names
    missing = [n for n in expected if n not in feeds]
    extra = [n for n in feeds if n not in expected]
    if missing or extra:
        raise InputError(f"stage '{name}' expects inputs {expected}; missing {missing}, unexpected {extra}")
    sizes: dict[str, int] = {}
    for t in spec.inputs:
        a = feeds[t.name]
        if not isinstance(a, np.ndarray):
            raise InputError(f"stage '{name}' input '{t.name}' must be a numpy array, got {type(a).__name__}")
        if a.dtype != np.dtype(t.dtype):
            raise InputError(f"stage '{name}' input '{t.name}' must be {t.dtype}, got {a.dtype}")
        if a.ndim != len(t.shape):
            raise InputError(
                f"stage '{name}' input '{t.name}' must have rank {len(t.shape)} {t.shape}, got shape {a.shape}"
            )
        for axis, (want, got) in enumerate(zip(t.shape, a.shape, strict=True)):
            if isinstance(want, int):
                if want != got:
                    raise InputError(
                        f"stage '{name}' input '{t.name}' axis {axis} must be {want}, got shape {a.shape}"
                    )
                continue
            if sizes.setdefault(want, got) != got:
                raise InputError(
                    f"stage '{name}': dim '{want}' is {sizes[want]} in one input and {got} in '{t.name}'"
                )
        if a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
            raise InputError(f"stage '{name}' input '{t.name}' contains NaN or Inf")
        if t.fill == "randint" and a.size and (a.min() < t.low or a.max() >= t.high):
            raise InputError(
                f"stage '{name}' input '{t.name}' values must lie in [{int(t.low)}, {int(t.high)}), got [{a.min()}, {a.max()}]"
            )
    for d in spec.dims:
        if d.sum_of and d.name in sizes and all(s in sizes for s in d.sum_of):
            if sizes[d.name] != sum(sizes[s] for s in d.sum_of):
                raise InputError(f"stage '{name}': dim '{d.name}' must equal {' + '.join(d.sum_of)}")
        if d.name in sizes and not d.min <= sizes[d.name] <= d.max:
            raise InputError(
                f"stage '{name}': dim '{d.name}'={sizes[d.name]} is outside the supported range [{d.min}, {d.max}]"
            )
