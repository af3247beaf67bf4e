"""A memory plan: the peak resident memory of each request type, from a build's manifest alone,
and which stages to keep resident and which to open per request so that a budget holds.

The model (``docs/plan.md`` has its assumptions and the figures it was checked against):

- a stage's session holds ``WEIGHT_FACTOR`` x its served graph's bytes (graph plus external
  data, as listed in the manifest; ``PACKED_WEIGHT_FACTOR`` for the LLM's weight-only INT4/INT8
  graphs), ``NODE_BYTES`` per node, plus ``SESSION_OVERHEAD``; while it opens, ``LOAD_FACTOR`` x
  its graph file's own bytes stand in for one copy of them (read, parsed, loaded);
- a stage's first run adds its arena: ``ARENA_FLOOR`` plus ``ACTIVATION_FACTOR`` x the bytes of
  its inputs and outputs at the sizes the runtime runs it (the spec's opt sizes; batch 2 for a
  guided denoiser; for the LLM, its served graph's tensors at a prefill of the whole context), plus, for a denoiser,
  ``ATTENTION_FACTOR`` x the bytes of one attention map over its latent's positions (batch x
  frames x (h x w)^2 float32); the arena is kept until the session closes;
- the LLM is always resident: its session, the token-embedding table (its bytes) and the KV pool
  (``2 x layers x slots x kv_heads x context x head_dim`` float32);
- the process pays ``RUNTIME_OVERHEAD`` once (the verified build, ONNX Runtime's environment);
  where the native core decodes (``LlmRuntime``'s ``auto`` backend finds libomniforge), it also
  pays ``NATIVE_OVERHEAD`` and the native core's LLM session with its arena, opened at start; the
  Python loop's LLM session then opens only for requests the native core does not run
  (teacher-forced signal tokens, adapters), so a plan without media out leaves it out.

A request's peak is the fixed part plus every resident stage and every stage the request uses
(resident stages count whether or not this request uses them: a service has run them before),
plus the largest rise of opening one of them.
Torch-free: ``omniforge run`` follows the plan.
"""

from __future__ import annotations

import functools
import math
import os
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from omniforge.errors import ConfigError
from omniforge.pipeline.manifest import Manifest
from omniforge.pipeline.spec import StageKind
from omniforge.runtime.engine import return_freed_memory
from omniforge.runtime.llm import PREFILL_CHUNK

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# Measured on the default build and on 150M and 7B LLM builds (ONNX Runtime 1.32, CPU provider, glibc
# malloc; docs/plan.md).
RUNTIME_OVERHEAD = 15 * MiB + 512 * KiB  # the opened build (its schema checker) and ONNX Runtime, once
# the part of it that is ONNX Runtime's Python environment, paid with the first Python session: a
# runtime whose text requests all run on the native core opens none (measured on the default build)
ORT_ENV_OVERHEAD = 9 * MiB
NATIVE_OVERHEAD = 23 * MiB  # libomniforge with the ONNX Runtime library it loads, when it decodes
SESSION_OVERHEAD = 144 * KiB  # one InferenceSession beyond its weights and nodes
WEIGHT_FACTOR = 1.0  # resident bytes per byte of served graph, once the load's transient copies are freed
PACKED_WEIGHT_FACTOR = 1.4  # the LLM's weight-only INT4/INT8 (MatMulNBits): its packed copy beside the codes
PACKED_PRECISIONS = ("int4", "int8")
NODE_BYTES = 4 * KiB + 512  # per node of the served graph: its kernel and the buffers it keeps
ARENA_FLOOR = 256 * KiB  # a session's first run: its arena's first chunk
ACTIVATION_FACTOR = 6.0  # arena bytes per byte of the stage's inputs and outputs at run sizes
ATTENTION_FACTOR = 36.0  # a denoiser's arena per byte of one float32 attention map over its latent
LLM_ATTENTION_FACTOR = 1.0  # the LLM's arena per byte of one prefill chunk's attention map
LOAD_FACTOR = 2.7  # bytes held per byte of a graph file while its session opens (read, parsed, loaded)

REQUESTS: dict[str, tuple[str, ...]] = {
    "text": (),
    "image-in-text-out": ("image_encoder", "{image}_input_projector"),
    "audio-in-text-out": ("audio_encoder", "{audio}_input_projector"),
    "video-in-text-out": ("image_encoder", "{image}_input_projector"),  # frames, as images are
    "text-to-image": ("image_output_projector", "image_unet", "image_vae_decoder"),
    "text-to-video": ("video_output_projector", "video_unet", "video_vae_decoder"),
    "text-to-audio": ("audio_output_projector", "audio_unet", "audio_vae_decoder", "vocoder"),
}
ANY = "any"
ALWAYS = ("token_embedding", "llm")  # the LLM runtime holds these from the start

_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kib": KiB, "m": MiB, "mib": MiB, "g": GiB, "gib": GiB, "t": 1 << 40, "tib": 1 << 40,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_memory(value: str | int) -> int:
    """Bytes from ``8GiB``, ``512MiB``, ``8G`` (binary), ``8GB`` (decimal) or a plain byte count;
    anything else, or a size below one MiB, is one ``ConfigError``."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(f"a memory size must be text like '8GiB' or a byte count, got {value!r}")
    m = _SIZE.match(str(value))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ConfigError(f"cannot read memory size {str(value)[:40]!r} (write e.g. 8GiB, 512MiB or 8GB)")
    size = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(size) or not MiB <= size <= 1 << 60:
        raise ConfigError(f"memory size {str(value)[:40]!r} must lie between 1 MiB and 1 EiB")
    return int(size)


def format_bytes(n: float, up: bool = False) -> str:
    """``n`` bytes in MiB below one GiB, else GiB, one decimal (rounded up with ``up``: a budget
    read back from it fits)."""
    unit, name = (GiB, "GiB") if n >= GiB else (MiB, "MiB")
    value = math.ceil(n / unit * 10) / 10 if up else n / unit
    return f"{value:.1f} {name}"


@dataclass(frozen=True)
class StageMemory:
    """What one stage costs: its served graph's bytes, its open session, its arena once run."""

    name: str
    weights: int
    session: int
    activation: int
    load: int = 0  # held for a moment while the session opens (before its arena exists)

    @property
    def total(self) -> int:
        return self.session + self.activation

    @property
    def opening(self) -> int:
        """How far opening this stage rises above its settled memory (0: not at all)."""
        return max(0, self.load - self.total)


@dataclass(frozen=True)
class MemoryPlan:
    """Which stages stay resident and which are opened per request, and each request's peak."""

    budget: int | None
    requests: tuple[str, ...]
    stages: dict[str, StageMemory]
    needs: dict[str, tuple[str, ...]]  # request -> the stages it opens beyond the LLM
    fixed: int  # process overhead, the LLM, its embedding table and KV pool
    kv_pool: int
    native: bool  # the native core decodes: a second LLM session and its library
    resident: tuple[str, ...]
    per_use: tuple[str, ...]
    peaks: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return max(self.peaks.values(), default=self.fixed)

    def to_dict(self) -> dict[str, object]:
        return {
            "budget": self.budget,
            "requests": list(self.requests),
            "fixed": self.fixed,
            "kv_pool": self.kv_pool,
            "native": self.native,
            "resident": list(self.resident),
            "per_use": list(self.per_use),
            "peaks": dict(self.peaks),
            "stages": {
                s.name: {
                    "weights": s.weights,
                    "session": s.session,
                    "activation": s.activation,
                    "load": s.load,
                }
                for s in self.stages.values()
            },
            "needs": {r: list(v) for r, v in self.needs.items()},
            "constants": {
                "runtime_overhead": RUNTIME_OVERHEAD,
                "ort_env_overhead": ORT_ENV_OVERHEAD,
                "native_overhead": NATIVE_OVERHEAD,
                "session_overhead": SESSION_OVERHEAD,
                "weight_factor": WEIGHT_FACTOR,
                "packed_weight_factor": PACKED_WEIGHT_FACTOR,
                "node_bytes": NODE_BYTES,
                "arena_floor": ARENA_FLOOR,
                "activation_factor": ACTIVATION_FACTOR,
                "attention_factor": ATTENTION_FACTOR,
                "llm_attention_factor": LLM_ATTENTION_FACTOR,
                "load_factor": LOAD_FACTOR,
                "prefill_chunk": PREFILL_CHUNK,
            },
        }


def _io_bytes(manifest: Manifest, stage: str, num_slots: int) -> int:
    """Bytes of the stage's inputs and outputs at the sizes the runtime runs it."""
    spec = manifest.pipeline.stage(stage)
    sizes = spec.resolve("opt")
    if spec.kind is StageKind.LLM:  # the served graph's own tensors at a prefill of the whole context
        ctx = spec.dim("total").max
        contract = manifest.stage_build(stage).runtime_variant().contract
        if contract is not None:
            bound = {n for pair in contract.inplace for n in (pair.input, pair.output)}
            tensors = [t for t in (*contract.inputs, *contract.outputs) if t.name not in bound]
        else:
            tensors = [t for t in (*spec.inputs, *spec.outputs) if not t.name.startswith(("past", "present"))]
        seq = min(ctx, PREFILL_CHUNK)  # LlmRuntime prefills a long prompt in chunks
        sizes.update({"batch": num_slots, "seq": seq, "past": ctx - seq, "total": ctx, "cache_len": ctx})
    else:
        if spec.kind not in (StageKind.DECODER, StageKind.VAE) and "batch" in sizes:
            sizes["batch"] = 1  # one item per request; denoisers and VAEs at their opt batch
        tensors = [*spec.inputs, *spec.outputs]
    total = 0
    for t in tensors:
        n = 1
        for d in t.concrete_shape(sizes):
            n *= d
        total += n * _itemsize(t.dtype)
    return total


def _attention_bytes(manifest: Manifest, stage: str, num_slots: int = 1) -> int:
    """One float32 attention map: a denoiser's over its latent's positions, (batch x frames) x
    (h x w)^2, from its first input (``sample``: (batch, C, [frames,] h, w)) at the spec's opt
    sizes; the LLM's at the last chunk of a whole-context prefill, slots x heads x chunk x context."""
    spec = manifest.pipeline.stage(stage)
    if spec.kind is StageKind.LLM and spec.llm is not None:
        ctx = spec.dim("total").max
        return num_slots * spec.llm.num_heads * min(ctx, PREFILL_CHUNK) * ctx * 4
    if spec.kind is not StageKind.DECODER:
        return 0
    shape = spec.inputs[0].concrete_shape(spec.resolve("opt"))
    if len(shape) < 4:
        return 0
    groups = shape[0] * (shape[2] if len(shape) == 5 else 1)
    return groups * (shape[-1] * shape[-2]) ** 2 * 4


def _itemsize(dtype: str) -> int:
    return {"float16": 2, "int8": 1, "uint8": 1, "bool": 1, "int32": 4, "float32": 4}.get(dtype, 8)


def stage_memory(manifest: Manifest, stage: str, num_slots: int = 1) -> StageMemory:
    """The modelled memory of one stage's session and arena."""
    w = manifest.served_bytes(stage)
    if stage == "token_embedding":  # read into a numpy table by the LLM runtime, no session
        return StageMemory(stage, w, w, 0, 2 * w)
    sb = manifest.stage_build(stage)
    v = sb.runtime_variant()
    embedded = manifest.artifacts[v.file].size  # the graph file itself, read whole and parsed
    packed = (
        sb.runtime_variant().precision in PACKED_PRECISIONS
        and manifest.pipeline.stage(stage).kind is StageKind.LLM
    )
    session = (
        int((PACKED_WEIGHT_FACTOR if packed else WEIGHT_FACTOR) * w)
        + NODE_BYTES * sb.nodes
        + SESSION_OVERHEAD
    )
    act = ARENA_FLOOR + int(ACTIVATION_FACTOR * _io_bytes(manifest, stage, num_slots))
    llm = manifest.pipeline.stage(stage).kind is StageKind.LLM
    act += int(
        (LLM_ATTENTION_FACTOR if llm else ATTENTION_FACTOR) * _attention_bytes(manifest, stage, num_slots)
    )
    return StageMemory(stage, w, session, act, session + int((LOAD_FACTOR - 1) * embedded))


def kv_pool_bytes(manifest: Manifest, num_slots: int = 1, max_context: int | None = None) -> int:
    """The KV pool ``LlmRuntime`` preallocates: float32 keys and values for every layer."""
    g = manifest.pipeline.stage("llm").llm
    assert g is not None
    return 2 * g.num_layers * num_slots * g.num_kv_heads * (max_context or g.max_context) * g.head_dim * 4


def request_stages(manifest: Manifest, request: str) -> tuple[str, ...]:
    """The stages ``request`` opens beyond the LLM, in this build (a modality's own input projector
    where it has one); ``ConfigError`` for an unknown request or one the build cannot serve."""
    if request not in REQUESTS:
        raise ConfigError(f"unknown request type '{request}' (choose from {', '.join([*REQUESTS, ANY])})")
    out = []
    for s in REQUESTS[request]:
        if s.startswith("{"):
            modality = s[1 : s.index("}")]
            own = f"{modality}_input_projector"
            s = own if own in manifest.stages else "input_projector"
        if s not in manifest.stages:
            raise ConfigError(f"this build cannot serve '{request}' requests: it has no '{s}' stage")
        out.append(s)
    return tuple(out)


def servable(manifest: Manifest) -> list[str]:
    """The request types this build can serve."""
    out = []
    for r in REQUESTS:
        try:
            request_stages(manifest, r)
        except ConfigError:
            continue
        out.append(r)
    return out


def native_decoding(backend: str = "auto", providers: Sequence[str] = ("CPUExecutionProvider",)) -> bool:
    """Whether ``LlmRuntime(backend=...)`` opens the native core beside its own session: ``native``;
    ``auto`` (``OMNIFORGE_LLM_BACKEND`` decides when set) where libomniforge is found and the
    build runs on the CPU provider only; never for ``python``."""
    from omniforge.runtime.native import check_backend, find_library

    backend = check_backend(backend)
    if backend == "auto":
        backend = check_backend(os.environ.get("OMNIFORGE_LLM_BACKEND") or "auto")
    if backend != "auto":
        return backend == "native"
    return tuple(providers) == ("CPUExecutionProvider",) and find_library() is not None


def plan_memory(
    manifest: Manifest,
    budget: int | None = None,
    requests: Sequence[str] = (ANY,),
    num_slots: int = 1,
    max_context: int | None = None,
    native: bool = False,
    python_loop: bool = False,
) -> MemoryPlan:
    """The plan for ``requests`` (``any``: every type the build serves) under ``budget``.

    Without a budget every stage stays resident (the runtime's default). With one, the LLM stays
    resident and stages are added greedily, those most requests need first (smaller first on a
    tie), while every request's peak still fits; the rest are opened per request. A budget that
    not even the LLM alone fits is one ``ConfigError`` naming the smallest budget that would.
    ``python_loop``: whether the Python loop's LLM session opens beside the native core's: every
    request on the base model runs natively (a media-out request's teacher-forced signal tokens
    included), one with a LoRA adapter takes the Python loop, so pass True for one."""
    if "llm" not in manifest.stages or "token_embedding" not in manifest.stages:
        raise ConfigError("this build has no LLM stage to plan around")
    wanted = _requests(manifest, requests)
    needs = {r: request_stages(manifest, r) for r in wanted}
    used = sorted({s for v in needs.values() for s in v})
    stages = {s: stage_memory(manifest, s, num_slots) for s in (*ALWAYS, *used)}
    kv = kv_pool_bytes(manifest, num_slots, max_context)
    python_llm = not native or python_loop
    python_sessions = python_llm or any(set(needs[r]) - set(ALWAYS) for r in wanted)  # encoders, decoders
    runtime = RUNTIME_OVERHEAD if python_sessions else RUNTIME_OVERHEAD - ORT_ENV_OVERHEAD
    fixed = runtime + kv + sum(stages[s].total for s in ALWAYS if s != "llm" or python_llm)
    if native:
        fixed += NATIVE_OVERHEAD + stages["llm"].total

    def peaks(kept: set[str]) -> dict[str, int]:  # settled, or while its costliest stage opens
        out = {}
        for r in wanted:
            opened = kept | set(needs[r])
            settled = fixed + sum(stages[s].total for s in opened)
            out[r] = settled + max(stages[s].opening for s in (*ALWAYS, *opened))
        return out

    if budget is None:
        kept = set(used)
    else:
        kept = set()
        least = peaks(kept)
        if max(least.values()) > budget:
            worst = max(least, key=lambda r: least[r])
            raise ConfigError(
                f"a budget of {format_bytes(budget)} fits no plan: the smallest that does is "
                f"{format_bytes(least[worst], up=True)} ('{worst}' with only the LLM resident)"
            )
        count = {s: sum(s in v for v in needs.values()) for s in used}
        for s in sorted(used, key=lambda s: (-count[s], stages[s].total, s)):
            if max(peaks(kept | {s}).values()) <= budget:
                kept.add(s)
    return MemoryPlan(
        budget=budget,
        requests=tuple(wanted),
        stages=stages,
        needs=needs,
        fixed=fixed,
        kv_pool=kv,
        native=native,
        resident=(*ALWAYS, *(s for s in used if s in kept)),
        per_use=tuple(s for s in used if s not in kept),
        peaks=peaks(kept),
    )


def _requests(manifest: Manifest, requests: Iterable[str]) -> list[str]:
    asked = list(dict.fromkeys(requests)) or [ANY]
    out: list[str] = []
    for r in asked:
        for x in servable(manifest) if r == ANY else [r]:
            request_stages(manifest, x)  # unknown or unservable: one sentence
            if x not in out:
                out.append(x)
    return out


class _Inflight:
    """Counts a pipeline's requests in flight, so that per-use stages close after the last one."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()


def planned(pipe: Any, budget: int | str, num_slots: int) -> MemoryPlan:
    """The plan for every request type ``pipe``'s build serves under ``budget``, with ``pipe.run``
    made to close the plan's per-use stages once no request is in flight (one ``ConfigError`` when
    nothing fits). Resident stages open on first use and stay open, as without a budget."""
    native = native_decoding("auto", pipe.build.session.providers)
    plan = plan_memory(pipe.build.manifest, parse_memory(budget), (ANY,), num_slots, native=native)
    if not plan.per_use:
        return plan
    run, build, state = pipe.run, pipe.build, _Inflight()

    @functools.wraps(run)
    def run_then_release(*args: Any, **kwargs: Any) -> Any:
        with state.lock:
            state.count += 1
        try:
            return run(*args, **kwargs)
        finally:
            with state.lock:
                state.count -= 1
                if state.count == 0:
                    for s in plan.per_use:
                        build.release(s)
                    return_freed_memory()

    pipe.run = run_then_release
    return plan
