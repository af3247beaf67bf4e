"""Continuous batching: requests join and leave the running batch between decode steps.

One scheduler thread owns the LLM's KV pool slots it hands out. Each iteration it admits queued
requests into free slots (reusing cached prefixes), feeds at most one prefill chunk (so a long
newcomer stalls running streams by one chunk at most), then runs one decode step over every
decoding sequence, grouped into runs of adjacent slots (the in-place graph takes a batch as
adjacent slots). Each request keeps its own sampling settings, stop rules and streaming callback;
cancelling one frees its slot before the next step. A full pool queues requests up to
``max_queue``; beyond it ``submit`` refuses with ``QueueFullError`` (retryable).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from omniforge.errors import CachePoolExhaustedError, ConfigError, InputError, QueueFullError
from omniforge.runtime.adapters import AUTO
from omniforge.runtime.kv_cache import SlotRange
from omniforge.runtime.llm import GenerationResult, LlmRuntime, Media, _config, _groups, _Seq
from omniforge.runtime.sampling import GenerationConfig

_DONE = object()


@dataclass(eq=False)  # compared by identity (it holds arrays)
class _Request:
    seq: _Seq
    ids: list[int]
    config: GenerationConfig
    stop_ids: set[int]
    on_text: Callable[[str], None] | None
    handle: RequestHandle
    slot: int = -1
    fed_prompt: int = 0  # prompt rows already in the cache (reused prefix + prefilled chunks)
    t0: float = field(default_factory=time.perf_counter)
    t_decode: float = 0.0


class RequestHandle:
    """A submitted request: ``result()`` waits for it, ``stream()`` yields its text as it comes,
    ``cancel()`` stops it (its slot is freed before the next step)."""

    def __init__(
        self, on_done: Callable[[GenerationResult | None, BaseException | None], None] | None = None
    ) -> None:
        self._on_done = on_done
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._pieces: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError("the request has not finished yet")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def stream(self) -> Iterator[str]:
        """The text pieces as they are generated; ends when the request does (errors re-raised)."""
        while True:
            piece = self._pieces.get()
            if piece is _DONE:
                break
            yield str(piece)
        self.result()

    def _finish(self, result: GenerationResult | None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._pieces.put(_DONE)
        self._done.set()
        if self._on_done is not None:
            try:
                self._on_done(result, error)
            except Exception:  # noqa: BLE001 - the caller's callback cannot stop the scheduler
                pass


class ContinuousBatcher:
    """Iteration-level scheduling of many requests over one ``LlmRuntime``'s KV pool."""

    def __init__(self, runtime: LlmRuntime, max_queue: int = 64, prefill_chunk: int = 64) -> None:
        for name, v, low in (("max_queue", max_queue, 0), ("prefill_chunk", prefill_chunk, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= 1 << 20:
                raise ConfigError(f"{name} must be an integer in [{low}, {1 << 20}], got {v!r}")
        self.rt = runtime
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self._queue: deque[_Request] = deque()
        self._bindings: dict[tuple[str, int, int], object] = {}
        self._active: list[_Request] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="omniforge-batcher", daemon=True)
        self._thread.start()

    # ---- the API ------------------------------------------------------------------------------
    def submit(
        self,
        prompt: str | Sequence[int] | np.ndarray,
        config: GenerationConfig | None = None,
        on_text: Callable[[str], None] | None = None,
        media: Media | None = None,
        on_done: Callable[[GenerationResult | None, BaseException | None], None] | None = None,
        adapter: str | None = AUTO,
    ) -> RequestHandle:
        """Queue a request (its prompt is checked and embedded on the caller's thread). ``on_text``
        gets each text piece and ``on_done`` the result or the error, on the scheduler thread.
        ``adapter``: its LoRA adapter (name, ``auto`` or ``none``); requests with different
        adapters decode in the same steps."""
        config = _config(config)
        if on_text is not None and not callable(on_text):
            raise InputError(f"on_text must be callable, got {type(on_text).__name__}")
        name = self.rt.resolve_adapter(adapter, list(media) if isinstance(media, dict) else ())
        rows, ids = self.rt.prepare(prompt, media)
        self.rt.check_fits(len(rows))
        handle = RequestHandle(on_done)
        seq = _Seq(rows, list(ids), np.random.default_rng(config.seed), stream=True, adapter=name)
        req = _Request(seq, list(ids), config, self.rt.stop_ids(config), on_text, handle)
        with self._wake:
            if self._closed:
                raise ConfigError("the batcher is closed")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(
                    f"{len(self._queue)} requests are already waiting for a KV-cache slot (the bound is "
                    f"{self.max_queue}); retry later"
                )
            self._queue.append(req)
            self._wake.notify()
        return handle

    def generate(
        self, prompt, config: GenerationConfig | None = None, on_text=None, media=None, adapter=AUTO
    ) -> GenerationResult:
        return self.submit(prompt, config, on_text, media, adapter=adapter).result()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._active)

    def close(self) -> None:
        """Stop the scheduler: queued and running requests end with an error."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def __enter__(self) -> ContinuousBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the scheduler ------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._closed and not self._queue and not self._active:
                        self._wake.wait()
                    if self._closed:
                        break
                try:
                    self._iterate()
                except Exception as exc:  # noqa: BLE001 - a scheduler bug fails the running requests, not the thread
                    for req in list(self._active):
                        self._fail(req, exc)
        finally:
            err = ConfigError("the batcher was closed before the request finished")
            for req in [*self._active, *self._queue]:
                self._end(req, None, err)
            self._queue.clear()

    def _iterate(self) -> None:
        self._drop_cancelled()
        self._admit()
        prefilling = [r for r in self._active if r.fed_prompt < len(r.seq.rows)]
        if prefilling:
            self._prefill_chunk(prefilling[0])
        decoding = [r for r in self._active if r.fed_prompt == len(r.seq.rows) and not r.seq.finish]
        if decoding:
            self._decode(decoding)
        for req in [r for r in self._active if r.seq.finish]:
            self._complete(req)
        if not decoding and not prefilling and self._queue:
            time.sleep(0.002)  # the pool is full of prefix-cache slots being released elsewhere

    def _drop_cancelled(self) -> None:
        with self._lock:
            for req in [r for r in self._queue if r.handle.cancelled]:
                self._queue.remove(req)
                self._end(req, self._result(req, "cancelled"))
        for req in [r for r in self._active if r.handle.cancelled]:
            req.seq.finish = req.seq.finish or "cancelled"
            self._complete(req, keep_cache=False)

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    return
                req = self._queue[0]
            try:
                slot = self.rt.pool.allocate(1)
            except CachePoolExhaustedError:
                if self.rt.prefix_cache.evict_one():
                    continue
                return
            with self._lock:
                self._queue.popleft()
            req.slot = slot.start
            req.seq.reused = self.rt.prefix_cache.reuse(req.seq.rows, req.slot, req.seq.adapter or "")
            req.fed_prompt = req.seq.reused
            self._active.append(req)

    def _prefill_chunk(self, req: _Request) -> None:
        s = req.seq
        end = min(len(s.rows), req.fed_prompt + self.prefill_chunk)
        try:
            binding = self._binding(req.slot, 1, self.rt.engine_key(s.adapter))
            binding.use_adapters(self.rt.adapter_arrays([s.adapter]))
            logits, hidden = binding.step(s.rows[None, req.fed_prompt : end])
        except Exception as exc:  # noqa: BLE001 - the request fails, the others go on
            self._fail(req, exc)
            return
        req.fed_prompt = end
        if end == len(s.rows):
            s.ttft = time.perf_counter() - req.t0
            req.t_decode = time.perf_counter()
            self._emit(req, self.rt._accept(0, s, logits[0], req.config, req.stop_ids, hidden[0, -1]))

    def _decode(self, reqs: list[_Request]) -> None:
        by_slot = {r.slot: r for r in reqs}
        keys = [
            self.rt.engine_key(by_slot[j].seq.adapter) if j in by_slot else None
            for j in range(self.rt.pool.num_slots)
        ]
        for first, count, key in _groups(keys):  # adjacent slots on one engine
            run = [by_slot[j] for j in range(first, first + count)]
            feed = [r.seq.generated[-1] for r in run]
            emb = self.rt.embed_ids(feed, trusted=True)[:, None]
            try:
                binding = self._binding(first, count, key)
                binding.use_adapters(self.rt.adapter_arrays([r.seq.adapter for r in run]))
                logits, hidden = binding.step(emb, copy=False, trusted=True)
            except Exception as exc:  # noqa: BLE001
                for r in run:
                    self._fail(r, exc)
                continue
            for j, r in enumerate(run):
                self._emit(
                    r,
                    self.rt._decoded(
                        0, r.seq, feed[j], emb[j, 0], logits[j], hidden[j, 0], r.config, r.stop_ids
                    ),
                )

    def _binding(self, first: int, count: int, engine: str = ""):
        """The step binding of slots [first, first + count) on engine ``engine`` (``engine_key``),
        made once (it views the pool's memory)."""
        key = (engine, first, count)
        if key not in self._bindings:
            self._bindings[key] = self.rt.engine_for(engine).bind(self.rt.pool, SlotRange(first, count))
        return self._bindings[key]

    def _emit(self, req: _Request, pieces: Iterator[tuple[int, str]]) -> None:
        for _k, delta in pieces:
            if not delta:
                continue
            req.handle._pieces.put(delta)
            if req.on_text is not None:
                try:
                    req.on_text(delta)
                except Exception as exc:  # noqa: BLE001 - a failing callback ends its own request
                    self._fail(req, exc)
                    return

    def _fail(self, req: _Request, exc: BaseException) -> None:
        if req in self._active:
            self._active.remove(req)
            self.rt.pool.release(SlotRange(req.slot, 1))
        self._end(req, None, exc)

    def _complete(self, req: _Request, keep_cache: bool = True) -> None:
        if req not in self._active:
            return
        self._active.remove(req)
        s = req.seq
        adopted = False
        if keep_cache and s.finish != "cancelled":
            fed = np.concatenate([s.rows, np.asarray(s.fed, np.float32).reshape(-1, s.rows.shape[1])])
            adopted = self.rt.prefix_cache.add(req.slot, fed, s.adapter or "")
        if not adopted:
            self.rt.pool.release(SlotRange(req.slot, 1))
        self._end(req, self._result(req, s.finish))

    def _result(self, req: _Request, finish: str) -> GenerationResult:
        decode_s = time.perf_counter() - req.t_decode if req.t_decode else 0.0
        return self.rt._result(req.seq, finish, decode_s)

    @staticmethod
    def _end(req: _Request, result: GenerationResult | None, error: BaseException | None = None) -> None:
        if not req.handle.done:
            req.handle._finish(result, error)
