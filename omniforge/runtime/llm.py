"""Text generation with the LLM stage: in-place KV cache, prefix reuse, sampling, streaming, batches.

Only numpy, onnxruntime and tokenizers are used. The LLM runs as the build's ONNX Runtime variant
(GroupQueryAttention with the cache bound in place, see ``omniforge.export.llm_ort``); prompts
are embedding rows, so projected media embeddings can stand in for placeholder tokens.

The decode loop is Python's or, where libomniforge is present, the native core's
(``omniforge.runtime.native``): ``backend="auto"`` hands it the requests it runs the same way
(a prompt of token rows only, the base model), ``"native"`` insists, ``"python"`` never uses it.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from omniforge.errors import (
    CachePoolExhaustedError,
    ConfigError,
    ContextLengthError,
    EngineError,
    InputError,
    OmniforgeError,
)
from omniforge.pipeline.contracts import Contract, Role, Slot, llm_inplace_contract
from omniforge.pipeline.protocol import MediaPart, PromptProtocol
from omniforge.pipeline.spec import LlmGeometry
from omniforge.runtime.adapters import AUTO, AdapterSet
from omniforge.runtime.build import Build
from omniforge.runtime.chat_template import NO_TEMPLATE, ChatPrompt, use_chat_template
from omniforge.runtime.engine import (
    GraphSource,
    SessionConfig,
    available_memory,
    check_graph_io,
    open_session,
)
from omniforge.runtime.kv_cache import KVCachePool, PrefixCache, SlotRange
from omniforge.runtime.native import NativeLlm, check_backend, find_library
from omniforge.runtime.sampling import GenerationConfig, select_token
from omniforge.runtime.tokenizer import SignalEvent

Media = dict[str, list[np.ndarray]]  # modality -> projected embeddings (n_tokens, hidden) per item


class LlmEngine:
    """The in-place LLM graph: ``step`` runs new rows for sequences living in pool slots.

    Every tensor is bound by its purpose in the graph's ``Contract`` (read from the manifest), and
    each past K/V input is bound to the same pool memory as the present output it aliases."""

    def __init__(
        self,
        path: Path | GraphSource,
        geometry: LlmGeometry,
        config: SessionConfig | None = None,
        contract: Contract | None = None,
        preset: str = "serving",
    ) -> None:
        self.geometry = geometry
        self.contract = contract or llm_inplace_contract(geometry)
        if len(self.contract.inplace) != 2 * geometry.num_layers:
            raise EngineError(
                f"'{path.name}' binds {len(self.contract.inplace)} K/V buffers in place; "
                f"a {geometry.num_layers}-layer LLM needs {2 * geometry.num_layers}"
            )
        self.session = open_session(path, preset, config)
        name = Path(path.name if isinstance(path, GraphSource) else path).name
        check_graph_io(self.session, self.contract, "the in-place LLM contract", name)
        c = self.contract
        self.names = {k: c.slot(k) for k in Slot}
        # the optional low-rank inputs of an LLM whose adapters are switched at run time
        self.lora_inputs = [
            x.name for x in self.session.get_overridable_initializers() if x.name.startswith("lora.")
        ]

    @classmethod
    def of_build(cls, build: Build, preset: str = "serving", adapter: str | None = None) -> LlmEngine:
        """The build's in-place LLM variant (with ``adapter`` merged in: its merged variant), bound
        from its contract in the manifest."""
        sb = build.manifest.stage_build("llm")
        variant = sb.require(Role.ORT_INPLACE_LLM, "llm") if adapter is None else sb.merged()[adapter]
        spec = build.pipeline.stage("llm")
        assert spec.llm is not None
        return cls(build.graph(variant), spec.llm, build.session, variant.contract, preset)

    def bind(self, pool: KVCachePool, slots: SlotRange) -> StepBinding:
        return StepBinding(self, pool, slots)


PREFILL_CHUNK = 512  # prompt rows per prefill run: bounds the attention arena of a long prompt


class StepBinding:
    """An I/O binding whose past and present caches are the same pool memory."""

    def __init__(self, engine: LlmEngine, pool: KVCachePool, slots: SlotRange) -> None:
        self.engine, self.pool, self.slots = engine, pool, slots
        self.names = n = engine.names
        self.io = engine.session.io_binding()
        self.io.bind_output(n[Slot.LOGITS])  # bound first: get_outputs() lists them at 0 and 1
        self.io.bind_output(n[Slot.HIDDEN])
        for pair, ov in zip(engine.contract.inplace, pool.bindings(slots), strict=True):
            self.io.bind_ortvalue_input(pair.input, ov)
            self.io.bind_ortvalue_output(pair.output, ov)
        self._decode: dict[str, np.ndarray] | None = None  # one-token buffers, bound once
        self._bound_decode = False
        self._adapters: object = None  # the adapter arrays bound now (kept alive while bound)

    def use_adapters(self, arrays: dict[str, np.ndarray] | None) -> None:
        """Bind the low-rank inputs (``AdapterSet.arrays``) for the following steps (None: a build
        without switchable adapters). Rebinds only when they change."""
        if arrays is None or arrays is self._adapters or not self.engine.lora_inputs:
            return
        for name in self.engine.lora_inputs:
            self.io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arrays[name]))
        self._adapters = arrays

    def _decode_buffers(self) -> dict[str, np.ndarray]:
        """Inputs and outputs of a one-token step, allocated and bound once for this binding: a
        decode step then only writes the new row and lengths in place (no per-token allocation)."""
        if self._decode is None:
            g, b = self.engine.geometry, self.slots.count
            self._decode = {
                Slot.EMBEDS: np.zeros((b, 1, g.hidden_size), np.float32),
                Slot.SEQLENS: np.zeros(b, np.int32),
                Slot.TOTAL: np.zeros((), np.int32),
                Slot.LOGITS: np.zeros((b, 1, g.vocab_size), np.float32),
                Slot.HIDDEN: np.zeros((b, 1, g.hidden_size), np.float32),
            }
        if not self._bound_decode:
            for purpose, buf in self._decode.items():
                ov = ort.OrtValue.ortvalue_from_numpy(buf)  # shares the numpy buffer
                if purpose in (Slot.LOGITS, Slot.HIDDEN):
                    self.io.bind_ortvalue_output(self.names[purpose], ov)
                else:
                    self.io.bind_ortvalue_input(self.names[purpose], ov)
            self._bound_decode = True
        return self._decode

    def _check(self, embeds: np.ndarray) -> None:
        g = self.engine.geometry
        if not isinstance(embeds, np.ndarray) or embeds.dtype != np.float32 or embeds.ndim != 3:
            raise InputError(f"LLM rows must be a float32 array of shape (batch, seq, {g.hidden_size})")
        b, s, h = embeds.shape  # (b, S, H)
        if b != self.slots.count or h != g.hidden_size or s < 1:
            raise InputError(
                f"LLM rows must have shape ({self.slots.count}, seq >= 1, {g.hidden_size}), got {embeds.shape}"
            )
        if not np.isfinite(embeds).all():
            raise InputError("LLM rows contain NaN or Inf")

    def step(
        self, embeds: np.ndarray, copy: bool = True, trusted: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(b, S, H) new rows -> last-position logits (b, V) and hidden states (b, S, H).

        The rows are checked against the contract (dtype, shape, finite values) before the session
        sees them, unless ``trusted`` (the decode loop's rows, looked up from the checked embedding
        table). ``copy=False``: a one-token step returns views of the bound output buffers, valid
        until the next step (the decode loop reads them at once)."""
        if not trusted:
            self._check(embeds)
        s = embeds.shape[1]
        lengths = self.pool.lengths[self.slots.start : self.slots.stop]
        new = lengths + s
        if int(new.max()) > self.pool.max_context:
            raise ContextLengthError(
                f"the sequence would reach {int(new.max())} tokens; the context holds {self.pool.max_context}"
            )
        if s > PREFILL_CHUNK:  # a long prompt in chunks, each attending to the rows before it
            parts = [
                self.step(embeds[:, i : i + PREFILL_CHUNK], trusted=True) for i in range(0, s, PREFILL_CHUNK)
            ]
            return parts[-1][0], np.concatenate([h for _, h in parts], axis=1)
        n = self.names
        if s == 1:
            buf = self._decode_buffers()
            np.copyto(buf[Slot.EMBEDS], embeds)
            buf[Slot.SEQLENS][:] = new - 1
            buf[Slot.TOTAL][...] = new.max()
        else:
            self.io.bind_cpu_input(n[Slot.EMBEDS], np.ascontiguousarray(embeds))
            self.io.bind_cpu_input(n[Slot.SEQLENS], (new - 1).astype(np.int32))
            self.io.bind_cpu_input(n[Slot.TOTAL], np.array(new.max(), dtype=np.int32))
            self.io.bind_output(n[Slot.LOGITS])
            self.io.bind_output(n[Slot.HIDDEN])
            self._bound_decode = False
        try:
            self.engine.session.run_with_iobinding(self.io)
        except Exception as exc:  # a backend failure, reported as one sentence
            raise EngineError(f"the LLM step failed: {str(exc).strip().splitlines()[0]}") from None
        self.pool.lengths[self.slots.start : self.slots.stop] = new
        if s == 1:
            if not copy:
                return buf[Slot.LOGITS][:, -1], buf[Slot.HIDDEN]
            return buf[Slot.LOGITS][:, -1].copy(), buf[Slot.HIDDEN].copy()
        out = self.io.get_outputs()
        return out[0].numpy()[:, -1], out[1].numpy()


@dataclass
class Probe:
    """What ``probe`` returns per sequence: next-token logits after the prompt and after each
    decode step (steps + 1, V), and the hidden states of every row fed (T + steps, H)."""

    logits: list[np.ndarray]
    hidden: list[np.ndarray]


def probe(engine: LlmEngine, prompts: Sequence[np.ndarray], follow: Sequence[np.ndarray] = ()) -> Probe:
    """Prefill each (T_k, H) prompt into its own slot, then decode all together, feeding row t of
    each (steps, H) ``follow`` array at step t. The one way quantization metrics, parity, compare
    and bench drive an LLM graph outside generation."""
    g = engine.geometry
    steps = len(follow[0]) if len(follow) else 0
    need = max(len(p) for p in prompts) + steps
    pool = KVCachePool(g, len(prompts), max_context=need)
    logits: list[list[np.ndarray]] = [[] for _ in prompts]
    hidden: list[list[np.ndarray]] = [[] for _ in prompts]
    for k, rows in enumerate(prompts):
        lg, hd = engine.bind(pool, SlotRange(k, 1)).step(np.asarray(rows, np.float32)[None])
        logits[k].append(lg[0])
        hidden[k].append(hd[0])
    together = engine.bind(pool, SlotRange(0, len(prompts)))
    for t in range(steps):
        rows = np.stack([np.asarray(f[t], np.float32) for f in follow])[:, None]
        lg, hd = together.step(rows)
        for k in range(len(prompts)):
            logits[k].append(lg[k])
            hidden[k].append(hd[k])
    return Probe([np.stack(x) for x in logits], [np.concatenate(x) for x in hidden])


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "stop_string" | "length"
    prompt_tokens: int
    reused_prefix_tokens: int
    ttft_s: float
    decode_s: float
    signal_hidden: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> (n, H)
    signals: list[SignalEvent] = field(default_factory=list)  # signal tokens generated (not in ``text``)
    adapter: str | None = None  # the LoRA adapter it was generated with (None: the base model)

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.new_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


@dataclass
class _Seq:
    rows: np.ndarray  # (T, H) prompt rows
    history: list[int]  # token ids seen (prompt text ids + generated) for the repetition penalty
    rng: np.random.Generator | None = None  # None: the native loop samples (its results only are kept)
    generated: list[int] = field(default_factory=list)
    fed: list[np.ndarray] = field(default_factory=list)  # embedding rows of generated tokens fed back
    text: str = ""
    emitted: int = 0
    finish: str = ""
    reused: int = 0
    ttft: float = 0.0
    stream: bool = True  # keep the text up to date token by token (for streaming callbacks)
    signal_rows: dict[str, list[np.ndarray]] = field(default_factory=dict)
    adapter: str | None = None


class LlmRuntime:
    """Generate from a build's LLM. Thread-safe: requests share the engines and the KV pool."""

    def __init__(
        self,
        build: Build | str | Path,
        num_slots: int = 4,
        max_context: int | None = None,
        prefix_cache_entries: int = 2,
        block_size: int = 16,
        session: SessionConfig | None = None,
        slot_wait_s: float = 0.0,
        backend: str = "auto",
    ) -> None:
        """``backend``: the decode loop: ``auto`` (the native core's where libomniforge is found
        and the request allows it, else Python's; ``OMNIFORGE_LLM_BACKEND`` overrides ``auto``),
        ``native`` (an error when the library is missing or refuses the build) or ``python``."""
        self.build = build if isinstance(build, Build) else Build(build, session)
        stage = self.build.pipeline.stage("llm")
        assert stage.llm is not None
        self.geometry = stage.llm
        self.slot_wait_s = slot_wait_s  # how long a request waits for a free cache slot before failing
        self.tokenizer = self.build.tokenizer() if "tokenizer" in self.build.manifest.files else None
        self.pool = KVCachePool(stage.llm, num_slots, max_context)
        self.prefix_cache = PrefixCache(self.pool, min(prefix_cache_entries, num_slots - 1), block_size)
        self.signal_ids: dict[int, str] = {}
        for modality, tokens in self.build.pipeline.signal_tokens.items():
            for t in tokens:
                tid = self.tokenizer.token_id(t)
                if tid is not None:
                    self.signal_ids[tid] = modality
        self.placeholder_ids = {
            tid: m
            for m, t in self.build.pipeline.placeholders.items()
            if (tid := self.tokenizer.token_id(t)) is not None
        }
        self.protocol = (
            PromptProtocol.from_dict(self.build.json("protocol"))
            if "protocol" in self.build.manifest.files
            else None
        )
        # which hidden state stands for a generated signal token: the one that predicted it
        # (NExT-GPT's generation) or the one computed at it
        self.signal_position = self.protocol.signal_position if self.protocol else "at_token"
        self.adapters = AdapterSet.of_build(self.build)
        self.merged_adapters = sorted(self.build.manifest.stage_build("llm").merged())
        # the Python loop's sessions, opened on first use: a runtime whose requests all run on
        # the native core never holds the LLM's weights twice
        self._engines: dict[str, LlmEngine] = {}
        self._engines_lock = threading.Lock()
        backend = check_backend(backend)
        if backend == "auto":
            backend = check_backend(os.environ.get("OMNIFORGE_LLM_BACKEND") or "auto")
        self.native = self._open_native(backend)
        self.backend = "native" if self.native is not None else "python"
        if self.native is None:
            self.engine_for("")  # opened now: a graph ONNX Runtime refuses fails here, not mid-request

    def _open_native(self, backend: str) -> NativeLlm | None:
        """The native core's LLM for ``backend`` (None: the Python loop)."""
        if backend == "python":
            return None
        cpu_only = tuple(self.build.session.providers) == ("CPUExecutionProvider",)
        if backend == "auto" and (not cpu_only or find_library() is None or not self._room_for_native()):
            return None
        if not cpu_only:
            raise ConfigError(
                "the native backend runs ONNX Runtime's CPU provider only; use backend='python'"
            )
        try:
            return NativeLlm(
                self.build.path,
                self.pool.num_slots,
                self.pool.max_context,
                self.build.session.threads,
                needs_tokenizer=self.tokenizer is not None,
                prefix_cache_entries=self.prefix_cache.max_entries,
                block_size=self.prefix_cache.block_size,
            )
        except OmniforgeError:
            if backend == "native":
                raise
            return None  # auto: a build the library refuses runs on the Python loop

    def _room_for_native(self) -> bool:
        """Whether the native core's own LLM session (~1.4x the graph for MatMulNBits) would take at
        most half the memory available now: ``auto`` stays on the Python loop otherwise, so a model
        near the machine's size is not held twice once a request needs the Python loop's session
        (adapters, batches, teacher-forced signal tokens)."""
        return 1.4 * self.build.manifest.served_bytes("llm") <= available_memory() / 2

    def engine_key(self, adapter: str | None) -> str:
        """Which engine runs a sequence with ``adapter``: its merged variant's (the adapter's
        name) where the build has one, else the base graph's ("")."""
        return adapter if adapter is not None and adapter in self.merged_adapters else ""

    @property
    def engine(self) -> LlmEngine:
        """The base model's engine (opened on first use)."""
        return self.engine_for("")

    def engine_for(self, key: str) -> LlmEngine:
        """The engine of ``engine_key``, opened on first use."""
        with self._engines_lock:
            if key not in self._engines:
                self._engines[key] = LlmEngine.of_build(self.build, adapter=key or None)
            return self._engines[key]

    def bind_for(self, adapters: Sequence[str | None], slots: SlotRange) -> StepBinding:
        """A binding of ``slots`` on the engine of ``adapters`` (one engine for all), their
        low-rank inputs bound."""
        binding = self.engine_for(self.engine_key(adapters[0])).bind(self.pool, slots)
        binding.use_adapters(self.adapter_arrays(adapters))
        return binding

    # ---- adapters -----------------------------------------------------------------------------
    def resolve_adapter(self, adapter: str | None, modalities: Sequence[str] = ()) -> str | None:
        """The adapter a request runs with: a name, ``auto`` (by the build's rule, from the
        request's modalities in and out), or ``none``/None for the base model."""
        if self.adapters is None:
            if adapter in (None, AUTO, "none"):
                return None
            raise InputError(f"this build has no switchable adapters; {adapter!r} cannot be used")
        return self.adapters.resolve(adapter, tuple(modalities))

    def adapter_arrays(self, names: Sequence[str | None]) -> dict[str, np.ndarray] | None:
        """The low-rank inputs for one step whose rows use ``names``."""
        return self.adapters.arrays(tuple(names)) if self.adapters is not None else None

    # ---- inputs -------------------------------------------------------------------------------
    @functools.cached_property
    def table(self) -> EmbeddingTable | None:
        """The token-embedding table for a numpy lookup in the decode loop, read on first use (with
        the native loop the native core's table serves instead, so it is held once); None for a
        form only the stage's session reads."""
        return EmbeddingTable.from_onnx(
            self.build.graph(self.build.manifest.stage_build("token_embedding").served()).data
        )

    def embed_ids(self, ids: Sequence[int] | np.ndarray, trusted: bool = False) -> np.ndarray:
        """(S,) token ids -> (S, H) embedding rows; ``trusted``: ids the sampler chose, known to be
        in range (the decode loop skips the checks). With the native loop, the native core's
        embeddings (the same values), so the table is not held twice."""
        if self.native is not None:
            arr = np.asarray(ids, dtype=np.int64) if trusted else self._token_array(ids)
            return self.native.embed(arr, self.geometry.hidden_size)
        if trusted and self.table is not None:
            return self.table.lookup(np.asarray(ids, dtype=np.int64))
        arr = self._token_array(ids)
        if self.table is not None:
            return self.table.lookup(arr)
        engine = self.build.engine("token_embedding")
        (ids_in,), (rows_out, *_) = engine.contract.input_names, engine.contract.output_names
        return engine.run({ids_in: arr[None]})[rows_out][0]

    def _token_array(self, ids: object) -> np.ndarray:
        """``ids`` as a checked (S,) int64 array: a sequence or 1-D integer array of in-vocabulary
        ids, no longer than the context (huge Python ints are refused before numpy sees them)."""
        vocab = self.geometry.vocab_size
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1:
                raise InputError(f"token ids must be one-dimensional, got shape {ids.shape}")
            if ids.dtype.kind not in "iu":
                raise InputError(f"token ids must be integers, got an array of {ids.dtype}")
            values: Sequence[int] = ids
        elif isinstance(ids, (str, bytes, bytearray, memoryview)) or not isinstance(ids, Sequence):
            raise InputError(f"token ids must be a sequence of integers, got {type(ids).__name__}")
        else:
            values = ids
        if len(values) > self.pool.max_context:
            raise ContextLengthError(
                f"{len(values)} token ids do not fit: the context holds {self.pool.max_context}"
            )
        if not isinstance(ids, np.ndarray):
            for v in values:
                if isinstance(v, (Sequence, np.ndarray)) and not isinstance(v, str):
                    raise InputError("token ids must be one-dimensional: got a nested sequence")
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                    raise InputError(f"token ids must be integers, got {type(v).__name__} {v!r:.40}")
        if len(values):
            lo, hi = (
                (int(ids.min()), int(ids.max()))
                if isinstance(ids, np.ndarray)
                else (min(values), max(values))
            )
            if lo < 0 or hi >= vocab:
                raise InputError(f"token ids must lie in [0, {vocab}), got [{lo}, {hi}]")
        return np.asarray(values, dtype=np.int64)

    def prepare(
        self, prompt: str | Sequence[int] | np.ndarray, media: Media | None = None
    ) -> tuple[np.ndarray, list[int]]:
        """Prompt -> (T, H) rows and the token ids among them; media rows replace placeholders in order.

        ``prompt`` is text (valid Unicode), a sequence or 1-D integer array of token ids, or a (T, H)
        float array of ready embeddings; anything else (bytes, None, ...) is refused. The rows fed to
        the LLM, media rows included, are checked against the context before any is computed.
        """
        if isinstance(prompt, np.ndarray) and prompt.dtype.kind == "f":
            if prompt.ndim != 2 or prompt.shape[1] != self.geometry.hidden_size:
                raise InputError(
                    f"prompt embeddings must have shape (T, {self.geometry.hidden_size}), got {prompt.shape}"
                )
            if len(prompt) == 0:
                raise InputError("the prompt is empty")
            self.check_fits(len(prompt), "the prompt embedding")
            if not np.isfinite(prompt).all():
                raise InputError("prompt embeddings contain NaN or Inf")
            return np.ascontiguousarray(prompt, dtype=np.float32), []
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InputError("this build has no tokenizer; pass token ids or embeddings instead of text")
            ids = self.tokenizer.encode(prompt, max_tokens=self.pool.max_context)
        elif isinstance(prompt, (bytes, bytearray, memoryview)):
            raise InputError(
                "a prompt must be text (str), token ids or embeddings, got bytes: decode it first"
            )
        elif isinstance(prompt, (Sequence, np.ndarray)):
            ids = self._token_array(prompt).tolist()
        else:
            raise InputError(
                "a prompt must be text, a sequence of token ids or a (T, H) float array, "
                f"got {type(prompt).__name__}"
            )
        if not ids:
            raise InputError("the prompt is empty")
        self.check_fits(len(ids))  # media rows replace placeholders: never fewer rows than ids
        plan = self._media_plan(ids, media)
        fed = len(ids) + sum(len(item) - 1 for _, item in plan)
        if plan:
            self.check_fits(fed, "the prompt with its media")
        rows = self.embed_ids(ids)
        pieces: list[np.ndarray] = []
        start = 0
        for pos, item in plan:
            pieces += [rows[start:pos], item]
            start = pos + 1
        pieces.append(rows[start:])
        return np.ascontiguousarray(np.concatenate(pieces)), ids

    def prepare_protocol(
        self, prompt: str, items: Sequence[tuple[str, np.ndarray]]
    ) -> tuple[np.ndarray, list[int]]:
        """Prompt text and media rows -> (T, H) rows and their token ids, laid out by the build's
        conversation protocol (NExT-GPT's: BOS before each text segment, each item wrapped in
        ``<Img>``/``</Img>``); the length is checked against the context before any row is computed."""
        if self.protocol is None or self.tokenizer is None:
            raise InputError("this build has no conversation protocol and tokenizer")
        if not isinstance(prompt, str):
            raise InputError(f"a prompt must be text, got {type(prompt).__name__}")
        bos = self.tokenizer.token_id(self.tokenizer.bos_token) if self.tokenizer.bos_token else None
        checked = [self._media_rows(m, rows) for m, rows in items]
        plan: list[list[int] | np.ndarray] = []
        for part in self.protocol.layout(prompt, len(checked)):
            if isinstance(part, MediaPart):
                plan.append(checked[part.index])
                continue
            ids = self.tokenizer.encode(part.text, max_tokens=self.pool.max_context, special=False)
            plan.append(([bos] if part.bos and bos is not None else []) + ids)
        self.check_fits(sum(len(x) for x in plan), "the prompt with its media" if checked else "the prompt")
        all_ids = [t for x in plan if isinstance(x, list) for t in x]
        pieces = [x if isinstance(x, np.ndarray) else self.embed_ids(x) for x in plan if len(x)]
        return np.ascontiguousarray(np.concatenate(pieces)), all_ids

    def _media_plan(self, ids: list[int], media: Media | None) -> list[tuple[int, np.ndarray]]:
        """(placeholder position, checked (n, H) float32 rows) for each media item, in order."""
        if media is None:
            return []
        if not isinstance(media, dict):
            raise InputError(f"media must map a modality to a list of embeddings, got {type(media).__name__}")
        queues = {k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in media.items()}
        for m in queues:
            if m not in self.build.pipeline.placeholders:
                raise InputError(
                    f"unknown modality '{m}' (this build takes: {sorted(self.build.pipeline.placeholders)})"
                )
        plan: list[tuple[int, np.ndarray]] = []
        for pos, tid in enumerate(ids):
            modality = self.placeholder_ids.get(tid)
            if modality is None or not queues.get(modality):
                continue
            item = queues[modality].pop(0)
            plan.append((pos, self._media_rows(modality, item)))
        leftover = {m: len(v) for m, v in queues.items() if v}
        if leftover:
            raise InputError(
                f"the prompt has fewer placeholders than media items: {leftover} left without a placeholder"
            )
        return plan

    def _media_rows(self, modality: str, item: object) -> np.ndarray:
        h = self.geometry.hidden_size
        arr = np.asarray(item) if isinstance(item, (np.ndarray, list, tuple)) else None
        if arr is None or arr.dtype.kind not in "fiu" or arr.ndim != 2 or arr.shape[1] != h or not len(arr):
            shape = arr.shape if arr is not None else type(item).__name__
            raise InputError(f"{modality} embeddings must have shape (n, {h}) with n >= 1, got {shape}")
        if len(arr) > self.pool.max_context:  # counted before a copy: a broadcast view may be huge
            raise ContextLengthError(
                f"{modality} embeddings have {len(arr)} rows; the context holds {self.pool.max_context}"
            )
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise InputError(f"{modality} embeddings contain NaN or Inf")
        return arr

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> ChatPrompt:
        """``messages`` (``{"role", "content"}`` dicts) rendered by the build's chat template, as
        transformers' ``apply_chat_template(..., tokenize=False)`` renders them; ``generate`` and
        ``stream`` take the result as the prompt and add no special tokens to it."""
        template = self.tokenizer.chat_template if self.tokenizer is not None else None
        if template is None:
            raise ConfigError(NO_TEMPLATE)
        return template.render(messages, add_generation_prompt)

    # ---- generation ---------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | Sequence[int] | np.ndarray,
        config: GenerationConfig | None = None,
        media: Media | None = None,
        on_text: Callable[[str], None] | None = None,
        adapter: str | None = AUTO,
    ) -> GenerationResult:
        """Generate for one prompt; ``on_text`` receives the text as it streams; ``adapter``: a
        LoRA adapter's name, ``auto`` (chosen from the media given) or ``none``."""
        if on_text is not None and not callable(on_text):
            raise InputError(f"on_text must be callable, got {type(on_text).__name__}")
        name = self.resolve_adapter(adapter, list(media) if isinstance(media, dict) else ())
        rows, ids = self.prepare(prompt, media)
        cb = (lambda _i, d: on_text(d)) if on_text else None
        return self.generate_rows([rows], [ids], _config(config), cb, [name])[0]

    def generate_batch(
        self,
        prompts: Sequence[str | Sequence[int] | np.ndarray],
        config: GenerationConfig | None = None,
        adapters: str | None | Sequence[str | None] = AUTO,
    ) -> list[GenerationResult]:
        """Generate for several prompts at once; each result equals generating it alone.
        ``adapters``: one for all prompts, or one per prompt (rows of a step may differ)."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise InputError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
        per = [adapters] * len(prompts) if adapters is None or isinstance(adapters, str) else list(adapters)
        if len(per) != len(prompts):
            raise InputError(f"{len(per)} adapters given for {len(prompts)} prompts")
        names = [self.resolve_adapter(a) for a in per]
        prepared = [self.prepare(p) for p in prompts]
        return self.generate_rows(
            [r for r, _ in prepared], [i for _, i in prepared], _config(config), adapters=names
        )

    def stream(
        self, prompt: str | Sequence[int], config: GenerationConfig | None = None, adapter: str | None = AUTO
    ) -> Iterator[str]:
        """Yield text pieces as they are generated."""
        name = self.resolve_adapter(adapter)
        rows, ids = self.prepare(prompt)
        if self._native_runs([rows], [ids], [name]):
            yield from self._stream_native(rows, ids, _config(config))
            return
        yield from (d for _i, d in self._run([rows], [ids], _config(config), adapters=[name]) if d)

    def generate_rows(
        self,
        rows: list[np.ndarray],
        ids: list[list[int]],
        config: GenerationConfig,
        on_text: Callable[[int, str], None] | None = None,
        adapters: Sequence[str | None] | None = None,
    ) -> list[GenerationResult]:
        """Generate from prepared rows; ``adapters``: each sequence's resolved adapter (None: the
        base model; the argument None: the base model for all)."""
        config = _config(config)
        if not isinstance(rows, (list, tuple)) or not isinstance(ids, (list, tuple)) or len(rows) != len(ids):
            raise InputError("rows and ids must be two lists of the same length, one entry per sequence")
        if not rows:
            raise InputError("there is no sequence to generate for")
        if on_text is not None and not callable(on_text):
            raise InputError(f"on_text must be callable, got {type(on_text).__name__}")
        adapters = list(adapters) if adapters is not None else [None] * len(rows)
        if len(adapters) != len(rows):
            raise InputError(f"{len(adapters)} adapters given for {len(rows)} sequences")
        if self._native_runs(rows, ids, adapters):
            return [self._generate_native(rows[0], ids[0], config, on_text)]
        gen = self._run(rows, ids, config, stream=on_text is not None, adapters=adapters)
        try:
            while True:
                try:
                    i, delta = next(gen)
                except StopIteration as stop:
                    return stop.value
                if on_text and delta:
                    on_text(i, delta)
        finally:
            gen.close()  # a callback that raised: the slots are released now, not when the frame dies

    def hidden_after(
        self, rows: np.ndarray, ids: Sequence[int], predicting: bool = False, adapter: str | None = None
    ) -> np.ndarray:
        """Final hidden states (len(ids), H) of tokens ``ids`` fed after the embedding ``rows``
        (teacher forcing; a cached prefix of ``rows`` is reused, nothing is kept). ``predicting``:
        the hidden states that predict each of ``ids`` instead (the last row's and those of
        ``ids[:-1]``), as NExT-GPT's generation reads its signal tokens. ``adapter``: the resolved
        adapter the rows were generated with."""
        fed = list(ids[:-1]) if predicting else list(ids)
        if len(rows) + len(fed) > self.pool.max_context:  # nothing is generated after them: they may fill it
            raise ContextLengthError(
                f"{len(rows)} rows followed by {len(fed)} tokens is {len(rows) + len(fed)} tokens fed to the "
                f"LLM; the context holds {self.pool.max_context}"
            )
        if (
            self.native is not None
            and adapter is None
            and predicting == (self.signal_position == "predicting")
        ):
            self._token_array(ids)  # checked as the Python path's embedding checks them
            return self.native.hidden_after(rows, ids)  # the base model: no Python session needed
        full = np.concatenate([rows, self.embed_ids(fed)]) if fed else rows
        slot = self.allocate_slots(1)
        try:  # at least the rows whose hidden states are read are computed anew
            reused = self.prefix_cache.reuse(
                full[: len(rows) + (0 if predicting else 1)], slot.start, adapter or ""
            )
            _, hidden = self.bind_for([adapter], slot).step(full[None, reused:])
        finally:
            self.pool.release(slot)
        return hidden[0, -len(ids) :]

    # ---- the native loop -----------------------------------------------------------------------
    def _native_runs(
        self, rows: Sequence[np.ndarray], ids: Sequence[Sequence[int]], adapters: Sequence[str | None]
    ) -> bool:
        """Whether the native core runs this request as the Python loop would: one sequence on the
        base model (its rows: token embeddings, media rows spliced in, or ready embeddings)."""
        if self.native is None or len(rows) != 1 or adapters[0] is not None:
            return False
        r = rows[0]
        return (
            isinstance(r, np.ndarray)
            and r.ndim == 2
            and r.shape[1] == self.geometry.hidden_size
            and len(r) > 0
        )

    def _generate_native(
        self,
        rows: np.ndarray,
        ids: Sequence[int],
        config: GenerationConfig,
        on_text: Callable[[int, str], None] | None = None,
    ) -> GenerationResult:
        """One request on the native loop, as ``_run`` would return it, signal tokens' hidden
        states included (the native core keeps the rows the protocol reads)."""
        assert self.native is not None
        self.check_fits(len(rows))
        cb = (lambda _t, d: on_text(0, d) if d else None) if on_text else None
        out = self.native.generate_rows(rows, list(ids), config, cb, self.slot_wait_s)
        s = _Seq(rows, list(ids), generated=out.token_ids, text=out.text)
        s.reused = out.reused_tokens
        for event, hidden in zip(out.signals, out.signal_hidden, strict=False):
            if hidden is not None:
                s.signal_rows.setdefault(event.modality, []).append(hidden)
        return self._result(s, out.finish_reason, out.decode_s, ttft=out.ttft_s, signals=out.signals)

    def _stream_native(self, rows: np.ndarray, ids: Sequence[int], config: GenerationConfig) -> Iterator[str]:
        """Yield the native loop's text pieces as they come (it runs on a worker thread; closing
        the iterator cancels the request)."""
        pieces: queue.Queue = queue.Queue()
        stop = threading.Event()
        done = object()

        def on_text(_i: int, delta: str) -> None:
            if stop.is_set():
                raise _StreamClosed
            pieces.put(delta)

        def work() -> None:
            try:
                self._generate_native(rows, ids, config, on_text)
            except _StreamClosed:
                pass
            except BaseException as exc:  # raised in the consumer's thread
                pieces.put(exc)
            pieces.put(done)

        worker = threading.Thread(target=work, name="omniforge-native-stream", daemon=True)
        worker.start()
        try:
            while (item := pieces.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            worker.join()

    def check_fits(self, tokens: int, what: str = "the prompt") -> None:
        """Refuse ``tokens`` rows fed to the LLM that leave no room in the context for one more;
        ``what`` names what they are in the message."""
        ctx = self.pool.max_context
        if tokens >= ctx:
            raise ContextLengthError(
                f"{what} is {tokens} tokens fed to the LLM; the context holds {ctx}, leaving no room "
                "for a new token"
            )

    def allocate_slots(self, count: int) -> SlotRange:
        """``count`` adjacent slots, evicting prefix-cache entries as needed; waits up to
        ``slot_wait_s`` for running requests to finish, evicting what they leave to the prefix
        cache as well, then ``CachePoolExhaustedError``."""
        if count > self.pool.num_slots:
            return self.pool.allocate(count)  # can never fit: refused at once
        deadline = time.monotonic() + self.slot_wait_s
        while True:
            try:
                return self.pool.allocate(count)
            except CachePoolExhaustedError:
                if self.prefix_cache.evict_one():
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
            try:  # woken by a release; re-checked at least every 50 ms for slots adopted by the cache
                return self.pool.allocate(count, wait_s=min(remaining, 0.05))
            except CachePoolExhaustedError:
                continue

    def stop_ids(self, config: GenerationConfig) -> set[int]:
        if config.stop_token_ids is not None:
            return set(config.stop_token_ids)
        eos = self.tokenizer.eos_id if self.tokenizer is not None else None
        return {eos} if eos is not None else set()

    def _run(
        self,
        rows: list[np.ndarray],
        ids: list[list[int]],
        cfg: GenerationConfig,
        stream: bool = True,
        adapters: Sequence[str | None] | None = None,
    ):
        """Generator: yields (sequence index, text delta); returns the results."""
        ctx = self.pool.max_context
        for r in rows:
            self.check_fits(len(r))
        t0 = time.perf_counter()
        stop_ids = self.stop_ids(cfg)
        predicting = self.signal_position == "predicting"
        seqs = [
            _Seq(r, list(i), np.random.default_rng(cfg.seed), stream=stream, adapter=a)
            for r, i, a in zip(rows, ids, adapters or [None] * len(rows), strict=True)
        ]
        slots = self.allocate_slots(len(seqs))
        adopted: set[int] = set()
        try:
            for k, s in enumerate(seqs):  # prefill one sequence at a time: no padding
                slot = slots.start + k
                s.reused = self.prefix_cache.reuse(s.rows, slot, s.adapter or "")
                binding = self.bind_for([s.adapter], SlotRange(slot, 1))
                logits, hid = binding.step(s.rows[None, s.reused :])
                s.ttft = time.perf_counter() - t0
                yield from self._accept(k, s, logits[0], cfg, stop_ids, hid[0, -1])
            t_decode = time.perf_counter()
            bindings: dict[tuple[str, int, int], StepBinding] = {}
            while not all(s.finish for s in seqs):
                # active sequences in runs of adjacent slots on one engine: finished ones stop
                # costing work; a merged-adapter variant runs its own sequences
                keys = [None if s.finish else self.engine_key(s.adapter) for s in seqs]
                for first, count, key in _groups(keys):
                    run = SlotRange(slots.start + first, count)
                    binding = bindings.get((key, run.start, count)) or bindings.setdefault(
                        (key, run.start, count), self.engine_for(key).bind(self.pool, run)
                    )
                    feed = [seqs[first + j].generated[-1] for j in range(count)]
                    emb = self.embed_ids(feed, trusted=True)[:, None]  # (count, 1, H)
                    binding.use_adapters(self.adapter_arrays([seqs[first + j].adapter for j in range(count)]))
                    logits, hidden = binding.step(emb, copy=False, trusted=True)
                    for j in range(count):
                        k, s = first + j, seqs[first + j]
                        yield from self._decoded(
                            k, s, feed[j], emb[j, 0], logits[j], hidden[j, 0], cfg, stop_ids
                        )
            decode_s = time.perf_counter() - t_decode
            for k, s in enumerate(seqs):  # a signal token generated last still needs its hidden state
                if predicting:
                    break
                last = s.generated[-1]
                if cfg.collect_signal_hidden and last in self.signal_ids and s.finish != "stop":
                    slot = SlotRange(slots.start + k, 1)
                    if self.pool.lengths[slot.start] < ctx:
                        emb = self.embed_ids([last])
                        _, hidden = self.bind_for([s.adapter], slot).step(emb[None])
                        s.fed.append(emb[0])
                        self._record_signal(s, last, hidden[0, 0], cfg)
            for k, s in enumerate(seqs):
                fed = np.concatenate([s.rows, np.asarray(s.fed, np.float32).reshape(-1, s.rows.shape[1])])
                if self.prefix_cache.add(slots.start + k, fed, s.adapter or ""):
                    adopted.add(slots.start + k)
        finally:
            for j in range(slots.start, slots.stop):
                if j not in adopted:
                    self.pool.release(SlotRange(j, 1))
        return [self._result(s, s.finish, decode_s) for s in seqs]

    def _decoded(
        self,
        k: int,
        s: _Seq,
        fed_token: int,
        fed_row: np.ndarray,
        logits: np.ndarray,
        hidden: np.ndarray,
        cfg: GenerationConfig,
        stop_ids: set[int],
    ):
        """After a decode step that fed ``fed_token`` to sequence ``k``: keep its row, the hidden
        state its protocol reads for signal tokens, and choose the next token."""
        s.fed.append(fed_row)
        if self.signal_position == "predicting":
            yield from self._accept(k, s, logits, cfg, stop_ids, hidden)
        else:
            self._record_signal(s, fed_token, hidden, cfg)
            yield from self._accept(k, s, logits, cfg, stop_ids)

    def _result(
        self,
        s: _Seq,
        finish: str,
        decode_s: float,
        ttft: float | None = None,
        signals: list[SignalEvent] | None = None,
    ) -> GenerationResult:
        return GenerationResult(
            text=s.text,
            token_ids=list(s.generated),
            finish_reason=finish,
            prompt_tokens=len(s.rows),
            reused_prefix_tokens=s.reused,
            ttft_s=s.ttft if ttft is None else ttft,
            decode_s=decode_s,
            signal_hidden={m: np.stack(v) for m, v in s.signal_rows.items()},
            signals=signals
            if signals is not None
            else (self.tokenizer.signal_events(s.generated, self.signal_ids) if self.tokenizer else []),
            adapter=s.adapter,
        )

    def _record_signal(self, s: _Seq, token: int, hidden: np.ndarray, cfg: GenerationConfig) -> None:
        modality = self.signal_ids.get(token)
        if modality is not None and cfg.collect_signal_hidden:
            s.signal_rows.setdefault(modality, []).append(hidden.copy())

    def _decode(self, ids: list[int], stop_ids: set[int]) -> str:
        if self.tokenizer is None:
            return ""
        hidden = stop_ids | self.signal_ids.keys() | self.placeholder_ids.keys()
        return self.tokenizer.visible_text(ids, hidden)

    def _accept(
        self,
        k: int,
        s: _Seq,
        logits: np.ndarray,
        cfg: GenerationConfig,
        stop_ids: set[int],
        hidden: np.ndarray | None = None,
    ):
        """Choose the next token of sequence ``k``; update its text and finish state. ``hidden``:
        the hidden state that produced ``logits``, kept when it predicts a signal token (protocols
        whose signal position is ``predicting``)."""
        history = np.asarray(s.history, np.int64) if cfg.repetition_penalty != 1.0 else _NO_HISTORY
        token = select_token(logits, cfg, s.rng, history)
        s.generated.append(token)
        s.history.append(token)
        if hidden is not None and self.signal_position == "predicting":
            self._record_signal(s, token, hidden, cfg)
        out_of_room = len(s.rows) + len(s.generated) > self.pool.max_context  # the next feed would overflow
        if token in stop_ids:
            s.finish = "stop"
        elif len(s.generated) >= cfg.max_new_tokens or out_of_room:
            s.finish = "length"
        # the text is kept up to date per token only when streamed or searched for stop strings
        if not (s.stream or cfg.stop_strings):
            if s.finish:
                s.text = self._decode(s.generated, stop_ids)
            return
        # also at a stop token: it flushes the bytes held back for an incomplete character
        text = self._decode(s.generated, stop_ids)
        for stop in cfg.stop_strings:
            cut = text.find(stop)
            if cut >= 0:
                text, s.finish = text[:cut], "stop_string"
        if text.endswith("\ufffd") and not s.finish:
            return  # an incomplete UTF-8 sequence: wait for the next token
        s.text = text
        delta = text[s.emitted :]
        s.emitted = len(text)
        if delta:
            yield k, delta


_NO_HISTORY = np.zeros(0, np.int64)


class _StreamClosed(Exception):
    """The consumer of a native stream went away: the request is cancelled."""


def _config(config: object) -> GenerationConfig:
    """``config`` if it is a ``GenerationConfig``, the defaults for None, else one ``ConfigError``."""
    if config is None:
        return GenerationConfig()
    if not isinstance(config, GenerationConfig):
        raise ConfigError(f"a generation config must be a GenerationConfig, got {type(config).__name__}")
    return config


class EmbeddingTable:
    """The token-embedding stage as a numpy lookup (FP32 table, or INT8 rows with a scale each).

    Read once from the stage's ONNX file, so the decode loop does not pay a session call per token.
    """

    def __init__(self, table: np.ndarray, scale: np.ndarray | None = None) -> None:
        self.table, self.scale = table, scale

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        rows = self.table[ids]
        if self.scale is None:
            return rows
        return rows.astype(np.float32) * self.scale[ids]

    @classmethod
    def from_onnx(cls, graph: bytes) -> EmbeddingTable | None:
        """The table of a serialized embedding graph (external data is not read: such a graph is
        left to the engine)."""
        import onnx
        from onnx import numpy_helper

        model = onnx.load_model_from_string(graph)  # external data is never read from bytes
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            return None
        ops = [n.op_type for n in model.graph.node]
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        if ops == ["Gather"] and model.graph.node[0].input[0] in inits:
            return cls(np.ascontiguousarray(inits[model.graph.node[0].input[0]], np.float32))
        if ops == ["Gather", "Cast", "Gather", "Mul"] and {"table_int8", "row_scale"} <= set(inits):
            return cls(inits["table_int8"], inits["row_scale"].astype(np.float32))
        return None  # another form: the engine does the lookup


def _groups(keys: Sequence[str | None]) -> list[tuple[int, int, str]]:
    """(first index, length, key) of each run of consecutive equal keys that are not None."""
    out: list[tuple[int, int, str]] = []
    for i, k in enumerate(keys):
        if k is None:
            continue
        if out and out[-1][0] + out[-1][1] == i and out[-1][2] == k:
            out[-1] = (out[-1][0], out[-1][1] + 1, k)
        else:
            out.append((i, 1, k))
    return out


class Chat:
    """A conversation. With a chat template, each turn renders the whole conversation (the messages
    so far, the new user message, the generation prompt) and generates from it; the reply is kept
    as the assistant's message. Without one, each turn's text is appended raw to the previous
    turns' rows and replies. Either way the previous turns are a prefix the prefix cache reuses.

    ``template``: True (the build's chat template; an error when it has none), False (raw text),
    or None (the template when the build has one and no conversation protocol: a NExT-GPT build's
    protocol lays out its own prompts). ``system``: a system message opening the conversation
    (with a template only). Media fill the placeholders of the conversation in order, across turns.
    """

    def __init__(
        self,
        runtime: LlmRuntime,
        config: GenerationConfig | None = None,
        adapter: str | None = AUTO,
        template: bool | None = None,
        system: str | None = None,
    ) -> None:
        self.runtime = runtime
        self.config = config or GenerationConfig()
        self.adapter = adapter  # one adapter for the whole conversation, resolved at the first turn
        self._resolved = False
        has_template = runtime.tokenizer is not None and runtime.tokenizer.has_chat_template
        self.template = use_chat_template(template, has_template, runtime.protocol is not None)
        if system is not None and not isinstance(system, str):
            raise InputError(f"a system message must be text, got {type(system).__name__}")
        if system is not None and not self.template:
            raise ConfigError("a system message needs a chat template, and this chat sends raw text")
        self.messages: list[dict[str, str]] = (
            [] if system is None else [{"role": "system", "content": system}]
        )
        self.rows: np.ndarray | None = None  # raw chats: the conversation's rows and ids so far
        self.ids: list[int] = []
        self._media: dict[str, list[np.ndarray]] = {}  # templated chats: each modality's items so far
        self._unfilled: set[str] = set()  # modalities with a placeholder an earlier turn left empty

    def send(
        self, text: str, media: Media | None = None, on_text: Callable[[str], None] | None = None
    ) -> GenerationResult:
        if not self._resolved:
            self.adapter = self.runtime.resolve_adapter(
                self.adapter, list(media) if isinstance(media, dict) else ()
            )
            self._resolved = True
        if not isinstance(text, str):
            raise InputError(f"a chat message must be text, got {type(text).__name__}")
        cb = (lambda _i, d: on_text(d)) if on_text else None
        if not self.template:
            new_rows, new_ids = self.runtime.prepare(text, media)
            rows = new_rows if self.rows is None else np.concatenate([self.rows, new_rows])
            ids = self.ids + new_ids
            result = self.runtime.generate_rows([rows], [ids], self.config, cb, [self.adapter])[0]
            self.rows = np.concatenate([rows, self.runtime.embed_ids(result.token_ids)])
            self.ids = ids + result.token_ids
        else:
            messages = [*self.messages, {"role": "user", "content": text}]
            prompt = self.runtime.apply_chat_template(messages)
            all_media = self._with(media)
            rows, ids = self.runtime.prepare(prompt, all_media)
            result = self.runtime.generate_rows([rows], [ids], self.config, cb, [self.adapter])[0]
            self.messages = [*messages, {"role": "assistant", "content": result.text}]
            self._media = all_media or {}
            held = [self.runtime.placeholder_ids[t] for t in ids if t in self.runtime.placeholder_ids]
            for m in set(held):  # placeholders past the media given stay tokens
                if held.count(m) > len(self._media.get(m, ())):
                    self._unfilled.add(m)
        return result

    def _with(self, media: Media | None) -> Media | None:
        """The conversation's media with this turn's appended: the rendered conversation holds
        every turn's placeholders, filled in order."""
        if media is None:
            return self._media or None
        if not isinstance(media, dict):
            raise InputError(f"media must map a modality to a list of embeddings, got {type(media).__name__}")
        late = sorted(self._unfilled & set(media))
        if late:
            raise InputError(
                f"an earlier turn left an empty {late[0]} placeholder, which this turn's {late[0]} would "
                "fill: give each turn as many media items as placeholders"
            )
        out = {m: list(v) for m, v in self._media.items()}
        for m, v in media.items():
            out.setdefault(m, []).extend(v if isinstance(v, (list, tuple)) else [v])
        return out
