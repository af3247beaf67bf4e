"""The native decode loop: libomniforge (``native/``) through its C API, with ctypes.

``LlmRuntime(..., backend="native")`` hands text and token-id requests to the library's loop
(prefill, decode, sampling, stop rules, streaming) instead of the Python one; both read the same
build and give the same tokens. ctypes (standard library) keeps the runtime free of a compiled
extension: the library is an ordinary CMake build that services link too.

The library is found from ``OMNIFORGE_NATIVE_LIBRARY`` (a file), else ``build/native/`` of the
source checkout this package runs from (where ``docs/native.md``'s build commands put it).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omniforge.errors import (
    CachePoolExhaustedError,
    ConfigError,
    ContextLengthError,
    EngineError,
    InputError,
    ManifestError,
    OmniforgeError,
)
from omniforge.runtime.sampling import GenerationConfig
from omniforge.runtime.tokenizer import SignalEvent

ENV = "OMNIFORGE_NATIVE_LIBRARY"
_NAMES = ("libomniforge.so", "libomniforge.dylib")
_CHECKOUT = Path(__file__).resolve().parents[2] / "build" / "native"
FINISH = {1: "stop", 2: "stop_string", 3: "length", 4: "cancelled"}
_ERRORS: dict[int, type[OmniforgeError]] = {
    1: InputError,
    2: ManifestError,
    3: EngineError,
    4: InputError,
    5: ContextLengthError,
    6: EngineError,
    7: EngineError,
    8: EngineError,
    9: CachePoolExhaustedError,
}
# the text argument is not NUL-terminated: taken as a pointer and read for its length
_TOKEN_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_size_t)


class _BuildOptions(ctypes.Structure):
    _fields_ = [
        ("ort_library", ctypes.c_char_p),
        ("threads", ctypes.c_int32),
        ("skip_verify", ctypes.c_int32),
    ]


class _GenerateOptions(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("max_new_tokens", ctypes.c_int32),
        ("temperature", ctypes.c_double),
        ("top_k", ctypes.c_int32),
        ("top_p", ctypes.c_double),
        ("repetition_penalty", ctypes.c_double),
        ("seed", ctypes.c_uint64),
        ("stop_token_ids", ctypes.POINTER(ctypes.c_int32)),
        ("n_stop_token_ids", ctypes.c_int32),
        ("stop_strings", ctypes.POINTER(ctypes.c_char_p)),
        ("n_stop_strings", ctypes.c_size_t),
        ("on_token", _TOKEN_CB),
        ("user_data", ctypes.c_void_p),
        ("slot_wait_ms", ctypes.c_int32),
        ("collect_signal_hidden", ctypes.c_int32),
    ]


def find_library() -> Path | None:
    """libomniforge's path: ``OMNIFORGE_NATIVE_LIBRARY`` when set (it must exist), else the
    checkout's ``build/native/``; None when neither has it."""
    given = os.environ.get(ENV)
    if given:
        path = Path(given)
        if not path.is_file():
            raise EngineError(f"{ENV} names {given}, which is not a file")
        return path
    for name in _NAMES:
        if (_CHECKOUT / name).is_file():
            return _CHECKOUT / name
    return None


_LOADED: dict[Path, ctypes.CDLL] = {}
_LOAD_LOCK = threading.Lock()


def load_library(path: Path) -> ctypes.CDLL:
    """The library at ``path`` with its C API's signatures declared (loaded once per process)."""
    with _LOAD_LOCK:
        if path in _LOADED:
            return _LOADED[path]
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise EngineError(f"cannot load the native library {path}: {exc}") from None
        p, i32, sz = ctypes.c_void_p, ctypes.c_int32, ctypes.c_size_t
        sigs = {
            "of_build_open": (i32, [ctypes.c_char_p, ctypes.POINTER(_BuildOptions), ctypes.POINTER(p)]),
            "of_build_close": (None, [p]),
            "of_build_last_error": (ctypes.c_char_p, [p]),
            "of_build_tokenizer": (i32, [p, ctypes.POINTER(p)]),
            "of_tokenizer_close": (None, [p]),
            "of_llm_open": (i32, [p, i32, i32, ctypes.POINTER(p)]),
            "of_llm_close": (None, [p]),
            "of_llm_last_error": (ctypes.c_char_p, [p]),
            "of_llm_embedding_form": (ctypes.c_char_p, [p]),
            "of_llm_set_prefix_cache": (i32, [p, i32, i32]),
            "of_generate_options_init": (None, [ctypes.POINTER(_GenerateOptions)]),
            "of_llm_generate": (
                i32,
                [p, ctypes.POINTER(i32), sz, ctypes.POINTER(_GenerateOptions), ctypes.POINTER(p)],
            ),
            "of_llm_generate_embeddings": (
                i32,
                [
                    p,
                    ctypes.POINTER(ctypes.c_float),
                    sz,
                    ctypes.POINTER(i32),
                    sz,
                    ctypes.POINTER(_GenerateOptions),
                    ctypes.POINTER(p),
                ],
            ),
            "of_generation_tokens": (ctypes.POINTER(i32), [p, ctypes.POINTER(sz)]),
            "of_generation_text": (ctypes.c_void_p, [p, ctypes.POINTER(sz)]),  # may hold NUL bytes
            "of_generation_finish_reason": (i32, [p]),
            "of_generation_reused_tokens": (sz, [p]),
            "of_generation_ttft_s": (ctypes.c_double, [p]),
            "of_generation_decode_s": (ctypes.c_double, [p]),
            "of_generation_free": (None, [p]),
            "of_generation_signal_count": (sz, [p]),
            "of_generation_signal": (
                i32,
                [
                    p,
                    sz,
                    ctypes.POINTER(ctypes.c_char_p),
                    ctypes.POINTER(ctypes.c_char_p),
                    ctypes.POINTER(i32),
                    ctypes.POINTER(sz),
                ],
            ),
            "of_generation_signal_hidden": (
                i32,
                [p, sz, ctypes.POINTER(ctypes.POINTER(ctypes.c_float)), ctypes.POINTER(sz)],
            ),
            "of_llm_signal_modality": (ctypes.c_char_p, [p, i32]),
            "of_llm_embed_tokens": (
                i32,
                [p, ctypes.POINTER(i32), sz, ctypes.POINTER(ctypes.c_float), sz],
            ),
            "of_llm_hidden_after": (
                i32,
                [
                    p,
                    ctypes.POINTER(ctypes.c_float),
                    sz,
                    ctypes.POINTER(i32),
                    sz,
                    ctypes.POINTER(ctypes.c_float),
                    sz,
                ],
            ),
        }
        for name, (restype, argtypes) in sigs.items():
            try:
                fn = getattr(lib, name)
            except AttributeError:
                if hasattr(lib, "of_build_open"):
                    raise EngineError(
                        f"{path} is an older libomniforge than this package (it has no {name}): "
                        "rebuild it as docs/native.md says"
                    ) from None
                raise EngineError(f"{path} is not libomniforge (it has no {name})") from None
            fn.restype, fn.argtypes = restype, argtypes
        _LOADED[path] = lib
        return lib


def _ort_library() -> str:
    import onnxruntime

    return os.path.dirname(onnxruntime.__file__)  # the same ONNX Runtime as the Python sessions


@dataclass
class NativeResult:
    token_ids: list[int]
    text: str
    finish_reason: str
    ttft_s: float
    decode_s: float
    reused_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    signals: list[SignalEvent] = field(default_factory=list)  # the signal tokens generated, in order
    # per signal event, the hidden state it hands on (None: none), when collected
    signal_hidden: list[np.ndarray | None] = field(default_factory=list)


class NativeLlm:
    """A build's LLM opened by libomniforge: its own KV pool of ``num_slots`` sequences; calls from
    several threads run concurrently, one slot each."""

    def __init__(
        self,
        build_dir: Path,
        num_slots: int,
        max_context: int,
        threads: int = 0,
        library: Path | None = None,
        needs_tokenizer: bool = False,
        prefix_cache_entries: int = 0,
        block_size: int = 16,
    ) -> None:
        """``needs_tokenizer``: refuse a build whose tokenizer the library cannot read (its text
        would be empty where the Python runtime's is not). ``prefix_cache_entries``: finished
        requests whose KV later prompts may reuse, in blocks of ``block_size`` tokens."""
        path = library or find_library()
        if path is None:
            raise EngineError(
                "the native backend needs libomniforge: build it as docs/native.md says "
                f"(it is looked for in {_CHECKOUT}) or set {ENV} to its path"
            )
        self.lib = lib = load_library(path)
        self.library = path
        opts = _BuildOptions(_ort_library().encode(), int(threads), 1)  # the Python Build verified it
        build = ctypes.c_void_p()
        status = lib.of_build_open(str(build_dir).encode(), ctypes.byref(opts), ctypes.byref(build))
        if status != 0:
            message = lib.of_build_last_error(build).decode(errors="replace") if build else "out of memory"
            lib.of_build_close(build)
            raise _ERRORS.get(status, EngineError)(f"the native core refused the build: {message}")
        if needs_tokenizer:
            tok = ctypes.c_void_p()
            status = lib.of_build_tokenizer(build, ctypes.byref(tok))
            lib.of_tokenizer_close(tok)
            if status != 0:
                message = lib.of_build_last_error(build).decode(errors="replace")
                lib.of_build_close(build)
                raise _ERRORS.get(status, EngineError)(
                    f"the native core cannot read the tokenizer: {message}"
                )
        llm = ctypes.c_void_p()
        status = lib.of_llm_open(build, int(num_slots), int(max_context), ctypes.byref(llm))
        if status != 0:
            message = lib.of_build_last_error(build).decode(errors="replace")
            lib.of_build_close(build)
            raise _ERRORS.get(status, EngineError)(f"the native core cannot open the LLM: {message}")
        lib.of_build_close(build)  # the LLM keeps what it needs of the build
        self._llm = llm
        if lib.of_llm_set_prefix_cache(llm, int(prefix_cache_entries), int(block_size)) != 0:
            message = lib.of_llm_last_error(llm).decode(errors="replace")
            self.close()
            raise ConfigError(f"the native core refused the prefix cache: {message}")
        self.embedding_form = lib.of_llm_embedding_form(llm).decode()

    def embed(self, ids: np.ndarray, hidden_size: int) -> np.ndarray:
        """(S,) in-vocabulary token ids -> (S, hidden_size) rows: the token embeddings the native
        core feeds the LLM (its table, or the token_embedding session)."""
        arr = np.ascontiguousarray(ids, dtype=np.int32)
        rows = np.empty((len(arr), hidden_size), np.float32)
        self._check(self.lib.of_llm_embed_tokens(self._llm, _i32(arr), len(arr), _f32(rows), rows.size))
        return rows

    def hidden_after(self, rows: np.ndarray, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), H) final hidden states of ``ids`` fed after the (T, H) ``rows`` (teacher
        forcing), at the positions the build's protocol reads signal tokens at."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        arr = np.ascontiguousarray(ids, dtype=np.int32)
        out = np.empty((len(arr), rows.shape[1]), np.float32)
        status = self.lib.of_llm_hidden_after(
            self._llm, _f32(rows), len(rows), _i32(arr), len(arr), _f32(out), out.size
        )
        self._check(status)
        return out

    def _check(self, status: int) -> None:
        """A failed call's status as its error, with the LLM handle's sentence."""
        if status != 0:
            message = self.lib.of_llm_last_error(self._llm).decode(errors="replace")
            raise _ERRORS.get(status, EngineError)(message)

    def close(self) -> None:
        if self._llm:
            self.lib.of_llm_close(self._llm)
            self._llm = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass

    def generate(
        self,
        ids: Sequence[int],
        config: GenerationConfig,
        on_token: Callable[[int, str], None] | None = None,
        slot_wait_s: float = 0.0,
    ) -> NativeResult:
        """Generate from token ids as ``config`` says; ``on_token(token_id, text)`` is called per
        token with the visible text it adds. An exception raised by ``on_token`` cancels the
        request and is raised here once its slot is free."""
        prompt = (ctypes.c_int32 * len(ids))(*ids)
        return self._call(
            lambda opts, out: self.lib.of_llm_generate(self._llm, prompt, len(ids), opts, out),
            config,
            on_token,
            slot_wait_s,
        )

    def generate_rows(
        self,
        rows: np.ndarray,
        history: Sequence[int],
        config: GenerationConfig,
        on_token: Callable[[int, str], None] | None = None,
        slot_wait_s: float = 0.0,
    ) -> NativeResult:
        """As ``generate``, from (T, hidden_size) float32 prompt rows (token embeddings with media
        rows spliced in); ``history``: the prompt's token ids the repetition penalty counts."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2:
            raise InputError(f"prompt rows must be a (T, H) array, got shape {rows.shape}")
        ptr = rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        hist = (ctypes.c_int32 * max(1, len(history)))(*history)
        return self._call(
            lambda opts, out: self.lib.of_llm_generate_embeddings(
                self._llm, ptr, len(rows), hist, len(history), opts, out
            ),
            config,
            on_token,
            slot_wait_s,
        )

    def _call(
        self,
        run: Callable[[object, object], int],
        config: GenerationConfig,
        on_token: Callable[[int, str], None] | None,
        slot_wait_s: float,
    ) -> NativeResult:
        lib = self.lib
        opts = _GenerateOptions()
        lib.of_generate_options_init(ctypes.byref(opts))
        opts.max_new_tokens = config.max_new_tokens
        opts.temperature = config.temperature
        opts.top_k = config.top_k
        opts.top_p = config.top_p
        opts.repetition_penalty = config.repetition_penalty
        opts.seed = config.seed
        keep: list[object] = []  # the buffers the options point at, alive for the call
        if config.stop_token_ids is not None:
            stops = (ctypes.c_int32 * max(1, len(config.stop_token_ids)))(*config.stop_token_ids)
            keep.append(stops)
            opts.stop_token_ids, opts.n_stop_token_ids = stops, len(config.stop_token_ids)
        if config.stop_strings:
            strings = (ctypes.c_char_p * len(config.stop_strings))(*(s.encode() for s in config.stop_strings))
            keep.append(strings)
            opts.stop_strings, opts.n_stop_strings = strings, len(config.stop_strings)
        opts.slot_wait_ms = -1 if slot_wait_s == float("inf") else int(round(slot_wait_s * 1000))
        opts.collect_signal_hidden = int(bool(config.collect_signal_hidden))
        raised: list[BaseException] = []
        if on_token is not None:

            def call(_user: object, token: int, text: int | None, n: int) -> int:
                try:
                    on_token(token, ctypes.string_at(text, n).decode() if n else "")
                    return 0
                except BaseException as exc:  # kept and raised after the call: never across C
                    raised.append(exc)
                    return 1

            cb = _TOKEN_CB(call)
            keep.append(cb)
            opts.on_token = cb
        out = ctypes.c_void_p()
        status = run(ctypes.byref(opts), ctypes.byref(out))
        if status != 0:
            message = lib.of_llm_last_error(self._llm).decode(errors="replace")
            raise _ERRORS.get(status, EngineError)(message)
        try:
            n = ctypes.c_size_t()
            tokens = lib.of_generation_tokens(out, ctypes.byref(n))
            length = ctypes.c_size_t()
            text = lib.of_generation_text(out, ctypes.byref(length))
            result = NativeResult(
                token_ids=[int(tokens[i]) for i in range(n.value)],
                text=ctypes.string_at(text, length.value).decode(errors="replace") if text else "",
                finish_reason=FINISH.get(lib.of_generation_finish_reason(out), ""),
                ttft_s=lib.of_generation_ttft_s(out),
                decode_s=lib.of_generation_decode_s(out),
                reused_tokens=int(lib.of_generation_reused_tokens(out)),
                signals=_signals(lib, out),
                signal_hidden=_signal_hidden(lib, out) if config.collect_signal_hidden else [],
            )
        finally:
            lib.of_generation_free(out)
        if raised:
            raise raised[0]
        return result


def _f32(a: np.ndarray):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


def _i32(a: np.ndarray):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))


def _signals(lib: ctypes.CDLL, out: ctypes.c_void_p) -> list[SignalEvent]:
    events = []
    modality, token = ctypes.c_char_p(), ctypes.c_char_p()
    index = ctypes.c_size_t()
    for i in range(lib.of_generation_signal_count(out)):
        status = lib.of_generation_signal(
            out, i, ctypes.byref(modality), ctypes.byref(token), None, ctypes.byref(index)
        )
        if status != 0:
            raise EngineError(f"the native core has no signal event {i} of its result")
        events.append(SignalEvent(modality.value.decode(), token.value.decode(), int(index.value)))
    return events


def _signal_hidden(lib: ctypes.CDLL, out: ctypes.c_void_p) -> list[np.ndarray | None]:
    rows: list[np.ndarray | None] = []
    data, n = ctypes.POINTER(ctypes.c_float)(), ctypes.c_size_t()
    for i in range(lib.of_generation_signal_count(out)):
        if lib.of_generation_signal_hidden(out, i, ctypes.byref(data), ctypes.byref(n)) != 0:
            raise EngineError(f"the native core has no signal event {i} of its result")
        rows.append(np.ctypeslib.as_array(data, (n.value,)).copy() if n.value else None)
    return rows


BACKENDS = ("auto", "native", "python")


def check_backend(backend: object) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return str(backend)
