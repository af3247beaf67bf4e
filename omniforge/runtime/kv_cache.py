"""The KV cache: a preallocated pool shared by all live sequences, written in place.

Memory is allocated once per layer as ``(num_slots, kv_heads, max_context, head_dim)`` float32
arrays. A sequence owns one slot (a batch of ``n`` sequences owns ``n`` adjacent slots); ONNX
Runtime's GroupQueryAttention reads the slot's valid prefix and writes each new token's K/V into
it, because the graph's past and present outputs are bound to the same ``OrtValue``. Nothing is
concatenated or copied per step. A slot is one contiguous region rather than a list of pages
because the attention kernel needs a contiguous cache per sequence; the prefix cache below shares
work between sequences at block granularity instead.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from omniforge.errors import CachePoolExhaustedError, ConfigError
from omniforge.pipeline.spec import LlmGeometry


def physical_memory() -> int:
    """Bytes of RAM on this machine (a large bound where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


@dataclass(frozen=True)
class SlotRange:
    start: int
    count: int

    @property
    def stop(self) -> int:
        return self.start + self.count


class KVCachePool:
    """Preallocated K/V memory for ``num_slots`` sequences of up to ``max_context`` tokens."""

    def __init__(self, geometry: LlmGeometry, num_slots: int = 4, max_context: int | None = None) -> None:
        if num_slots < 1:
            raise ConfigError("the KV-cache pool needs at least one slot")
        self.geometry = g = geometry
        self.max_context = max_context or g.max_context
        if not 1 <= self.max_context <= g.max_context:
            raise ConfigError(
                f"max context {self.max_context} must lie in [1, {g.max_context}] for this model"
            )
        self.num_slots = num_slots
        shape = (num_slots, g.num_kv_heads, self.max_context, g.head_dim)  # (slots, nkv, C, hd)
        need = 2 * g.num_layers * int(np.prod(shape, dtype=np.int64)) * 4
        if need > physical_memory():
            raise ConfigError(
                f"a KV cache of {num_slots} slots x {self.max_context} tokens needs {need / 2**30:.1f} GiB, more than "
                f"this machine's {physical_memory() / 2**30:.1f} GiB; use fewer slots or a shorter context"
            )
        self.keys = [np.zeros(shape, np.float32) for _ in range(g.num_layers)]
        self.values = [np.zeros(shape, np.float32) for _ in range(g.num_layers)]
        self.lengths = np.zeros(num_slots, np.int64)  # valid tokens per slot
        self._free = [True] * num_slots
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._ortvalues: dict[tuple[int, int], list[ort.OrtValue]] = {}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.keys, *self.values))

    @property
    def slots_in_use(self) -> int:
        return self._free.count(False)

    def allocate(self, count: int = 1, wait_s: float = 0.0) -> SlotRange:
        """``count`` adjacent free slots; waits up to ``wait_s`` for them, then ``CachePoolExhaustedError``."""
        if not 1 <= count <= self.num_slots:
            raise CachePoolExhaustedError(
                f"a request for {count} slots can never fit a pool of {self.num_slots}"
            )
        with self._freed:
            if wait_s > 0:
                self._freed.wait_for(lambda: self._find(count) is not None, timeout=wait_s)
            start = self._find(count)
            if start is None:
                raise CachePoolExhaustedError(
                    f"the KV-cache pool has no {count} free adjacent slot(s) ({self.slots_in_use}/{self.num_slots} in use); "
                    "retry later or create the runtime with more slots"
                )
            for j in range(start, start + count):
                self._free[j] = False
            self.lengths[start : start + count] = 0
            return SlotRange(start, count)

    def _find(self, count: int) -> int | None:
        run = 0
        for i, free in enumerate(self._free):
            run = run + 1 if free else 0
            if run == count:
                return i - count + 1
        return None

    def release(self, slots: SlotRange) -> None:
        with self._freed:
            for j in range(slots.start, slots.stop):
                self._free[j] = True
            self.lengths[slots.start : slots.stop] = 0
            self._freed.notify_all()

    def bindings(self, slots: SlotRange) -> list[ort.OrtValue]:
        """An OrtValue per layer for keys then values (layer 0 key, layer 0 value, ...), viewing the
        slots' memory without a copy: the order of an in-place contract's pairs."""
        key = (slots.start, slots.count)
        with self._lock:
            return self._bindings_locked(key, slots)

    def _bindings_locked(self, key: tuple[int, int], slots: SlotRange) -> list[ort.OrtValue]:
        if key not in self._ortvalues:
            out = []
            for i in range(self.geometry.num_layers):
                for arrays in (self.keys, self.values):
                    view = arrays[i][slots.start : slots.stop]  # contiguous: a slice of the first axis
                    out.append(ort.OrtValue.ortvalue_from_numpy(view))
            self._ortvalues[key] = out
        return self._ortvalues[key]

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` cached tokens of slot ``src`` into slot ``dst``."""
        for arrays in (self.keys, self.values):
            for a in arrays:
                a[dst, :, :length] = a[src, :, :length]
        self.lengths[dst] = length


def block_hashes(rows: np.ndarray, block_size: int, namespace: str = "") -> list[bytes]:
    """Chained digests of each full block of embedding rows: equal digests mean equal prefixes
    computed under the same ``namespace`` (the LoRA adapter the cache was filled with)."""
    out, h = [], namespace.encode()
    for b in range(len(rows) // block_size):
        h = hashlib.blake2b(
            h + rows[b * block_size : (b + 1) * block_size].tobytes(), digest_size=16
        ).digest()
        out.append(h)
    return out


class PrefixCache:
    """Keeps the KV of finished sequences so a later request with the same prefix skips its prefill.

    Keys are chained hashes of the embedding rows fed to the LLM, per block of ``block_size``
    tokens, so text and spliced media embeddings are matched alike; the chain starts from the
    adapter's name, so KV computed under one adapter is never reused under another. An entry pins
    its slot until it is evicted (least recently used first) to make room for a new request.
    """

    def __init__(self, pool: KVCachePool, max_entries: int = 2, block_size: int = 16) -> None:
        self.pool = pool
        self.max_entries = max_entries
        self.block_size = block_size
        self._entries: OrderedDict[int, list[bytes]] = OrderedDict()  # slot -> block hashes
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, slot: int, rows: np.ndarray, namespace: str = "") -> bool:
        """Adopt ``slot`` (whose cache holds ``rows``, computed under adapter ``namespace``) as an
        entry; False if caching is off or useless."""
        hashes = block_hashes(rows, self.block_size, namespace)
        if self.max_entries == 0 or not hashes:
            return False
        with self._lock:
            self._entries[slot] = hashes
            self._entries.move_to_end(slot)
            while len(self._entries) > self.max_entries:
                old, _ = self._entries.popitem(last=False)
                self.pool.release(SlotRange(old, 1))
        return True

    def reuse(self, rows: np.ndarray, dst: int, namespace: str = "") -> int:
        """Copy the longest prefix of ``rows`` cached under ``namespace`` into slot ``dst``; return
        its length (0: none).

        At least one row is left to run, since its logits are needed. The copy happens under the
        cache's lock, so a concurrent eviction cannot recycle the source slot mid-copy.
        """
        limit = (len(rows) - 1) // self.block_size
        if limit <= 0 or not self._entries:
            return 0
        wanted = block_hashes(rows[: limit * self.block_size], self.block_size, namespace)
        with self._lock:
            best, best_n = -1, 0
            for slot, hashes in self._entries.items():
                n = 0
                for a, b in zip(wanted, hashes, strict=False):
                    if a != b:
                        break
                    n += 1
                if n > best_n:
                    best, best_n = slot, n
            if best_n == 0:
                return 0
            self._entries.move_to_end(best)
            length = best_n * self.block_size
            self.pool.copy_prefix(best, dst, length)
        return length

    def evict_one(self) -> bool:
        with self._lock:
            if not self._entries:
                return False
            old, _ = self._entries.popitem(last=False)
        self.pool.release(SlotRange(old, 1))
        return True

    def clear(self) -> None:
        while self.evict_one():
            pass
