"""LoRA adapters switched per request over the build's base LLM (numpy + onnxruntime only).

A build whose model keeps its adapters unmerged holds, beside the in-place LLM graph, one file
per adapter in ONNX Runtime's adapter format and ``adapters/adapters.json`` (slots, ranks, the
base model's fingerprint, the ``auto`` rule). The graph's low-rank inputs are bound per step by
I/O binding: ``RunOptions.add_active_adapter`` does not reach ``run_with_iobinding`` (ONNX Runtime
1.20-1.32 ignore it there, with a warning), and the in-place KV cache needs I/O binding. Rows of
one step may use different adapters: A/B are then stacked per row, padded to the largest rank
with zeros (which add nothing).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from omniforge.errors import ConfigError, InputError, ManifestError
from omniforge.pipeline.manifest import verify_file

AUTO, NONE = "auto", "none"
MODALITY_ORDER = ("video", "audio", "image", "text")


def lora_input_names(slot: str) -> tuple[str, str]:
    """The in-place graph's optional inputs of slot ``layers.{i}.{group}`` (A, then B)."""
    return f"lora.{slot}.A", f"lora.{slot}.B"


def model_version(fingerprint: str) -> int:
    """The 31 bits of a base fingerprint an adapter file's ``model_version`` holds."""
    return int(fingerprint[:8], 16) & 0x7FFFFFFF


@dataclass(frozen=True)
class Adapter:
    """One adapter's A (1, K, r) and B (1, r, N) arrays by graph input name, FP32."""

    name: str
    rank: int
    arrays: dict[str, np.ndarray]


class AdapterSet:
    """The adapters of a build (``of_build``), loaded on first use and kept; thread-safe.

    ``arrays(names)`` gives the graph inputs for one step whose rows use adapters ``names`` (None:
    the base model): (1, K, r) when all rows share one, (B, K, r_max) stacked otherwise."""

    def __init__(
        self,
        slots: dict[str, tuple[int, int]],
        fingerprint: str,
        files: dict[str, Path],
        auto: dict[str, str | None],
        verify: Any = None,
    ) -> None:
        self.slots, self.fingerprint, self.files, self.auto = slots, fingerprint, files, auto
        self._verify = verify  # called with a name before its file is read (the build's hash check)
        self._loaded: dict[str, Adapter] = {}
        self._stacked: OrderedDict[tuple[str | None, ...], dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self._empty = {
            name: np.zeros(shape, np.float32)
            for slot, (k, n) in slots.items()
            for name, shape in zip(lora_input_names(slot), ((1, k, 0), (1, 0, n)), strict=True)
        }

    @classmethod
    def of_build(cls, build: Any) -> AdapterSet | None:
        """The build's adapters, or None when its LLM has none to switch."""
        if "adapters" not in build.manifest.files:
            return None
        index = build.json("adapters")
        try:
            slots = {k: (int(v[0]), int(v[1])) for k, v in index["slots"].items()}
            items = index["adapters"]
            files = {name: build.file(f"adapter.{name}") for name in items}
            auto = dict(index.get("auto") or {})
            fingerprint = str(index["base_fingerprint"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ManifestError(f"adapters.json is malformed ({type(exc).__name__}: {exc})") from None

        def verify(name: str) -> None:
            verify_file(build.path, build.manifest, build.manifest.files[f"adapter.{name}"])

        return cls(slots, fingerprint, files, auto, verify)

    @property
    def names(self) -> list[str]:
        return sorted(self.files)

    def resolve(self, adapter: str | None, modalities: tuple[str, ...] = ()) -> str | None:
        """The adapter a request uses: ``auto`` picks by the ``auto`` rule from the request's
        modalities (in and out; text always counts), first match in the rule's order; ``none`` or
        None: the base model."""
        if adapter is None or adapter == NONE:
            return None
        if adapter == AUTO:
            present = set(modalities) | {"text"}
            for modality, name in self.auto.items():
                if modality in present:
                    return name
            return None
        if not isinstance(adapter, str) or adapter not in self.files:
            raise InputError(
                f"unknown adapter {adapter!r}; this build has {self.names or 'none'} (or 'auto', 'none')"
            )
        return adapter

    def get(self, name: str) -> Adapter:
        with self._lock:
            if name not in self._loaded:
                if self._verify is not None:
                    self._verify(name)
                self._loaded[name] = self._read(name, self.files[name])
            return self._loaded[name]

    def add(self, name: str, path: str | Path) -> Adapter:
        """Load an adapter file made for this base model (``omniforge`` writes them at export)
        under ``name``; one that was packed for another base model is refused."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"adapter file '{path}' does not exist")
        adapter = self._read(name, path)
        with self._lock:
            self.files[name], self._loaded[name] = path, adapter
            self._stacked.clear()
        return adapter

    def _read(self, name: str, path: Path) -> Adapter:
        try:
            fmt = ort.AdapterFormat.read_adapter(str(path))
            params = fmt.get_parameters()
            version = fmt.get_model_version()
        except Exception as exc:  # ORT raises several types for a file that is not an adapter
            raise ConfigError(
                f"'{path.name}' is not an ONNX Runtime adapter file ({str(exc).strip().splitlines()[0][:120]})"
            ) from None
        if version != model_version(self.fingerprint):
            raise ConfigError(
                f"adapter '{name}' ({path.name}) was made for another base model; rebuild it for this one"
            )
        arrays: dict[str, np.ndarray] = {}
        rank = 0
        for slot, (k, n) in self.slots.items():
            a_name, b_name = lora_input_names(slot)
            if a_name not in params or b_name not in params:
                raise ConfigError(f"adapter '{name}' ({path.name}) has no weights for {slot}")
            # copies: the arrays ORT hands out view memory owned by the reader
            a = np.array(params[a_name].numpy(), dtype=np.float32, order="C", copy=True)
            b = np.array(params[b_name].numpy(), dtype=np.float32, order="C", copy=True)
            if (
                a.ndim != 3
                or b.ndim != 3
                or a.shape[:2] != (1, k)
                or b.shape[0] != 1
                or b.shape[2] != n
                or a.shape[2] != b.shape[1]
            ):
                raise ConfigError(
                    f"adapter '{name}' ({path.name}) does not fit this base model: {slot} is "
                    f"{a.shape} x {b.shape}, the graph takes (1, {k}, r) x (1, r, {n})"
                )
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                raise ConfigError(f"adapter '{name}' ({path.name}) holds NaN or Inf")
            arrays[a_name], arrays[b_name] = a, b
            rank = max(rank, a.shape[2])
        extra = sorted(set(params) - set(arrays))
        if extra:
            raise ConfigError(
                f"adapter '{name}' ({path.name}) has weights '{extra[0]}' this base model lacks"
            )
        return Adapter(name, rank, arrays)

    def arrays(self, names: tuple[str | None, ...]) -> dict[str, np.ndarray]:
        """Graph inputs for one step whose rows use ``names`` (one entry per row)."""
        distinct = set(names)
        if len(distinct) == 1:
            (only,) = distinct
            return self._empty if only is None else self.get(only).arrays
        with self._lock:
            hit = self._stacked.get(names)
            if hit is not None:
                self._stacked.move_to_end(names)
                return hit
        rows = [None if n is None else self.get(n) for n in names]
        out: dict[str, np.ndarray] = {}
        for slot, (k, n) in self.slots.items():
            a_name, b_name = lora_input_names(slot)
            r = max((x.arrays[a_name].shape[2] for x in rows if x is not None), default=0)
            a = np.zeros((len(rows), k, r), np.float32)
            b = np.zeros((len(rows), r, n), np.float32)
            for i, x in enumerate(rows):
                if x is not None:
                    ri = x.arrays[a_name].shape[2]
                    a[i, :, :ri], b[i, :ri] = x.arrays[a_name][0], x.arrays[b_name][0]
            out[a_name], out[b_name] = a, b
        with self._lock:
            self._stacked[names] = out
            while len(self._stacked) > 16:
                self._stacked.popitem(last=False)
        return out
