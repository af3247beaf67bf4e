"""LoRA adapters as build artifacts, switched per request over one base LLM.

Each PEFT adapter of the model folder is packed for the in-place LLM graph and written in ONNX
Runtime's adapter format (``.onnx_adapter``: named tensors, read with
``onnxruntime.AdapterFormat.read_adapter``). The graph gets, for every linear group an adapter
targets (``layers.{i}.qkv/o/gate/up/down``), a low-rank branch ``y += (x @ A) @ B`` whose A
(Ba, K, r) and B (Ba, r, N) are graph inputs with empty defaults (r = 0: the base model). Ba is 1
for one adapter for the whole batch, or the batch size for one adapter per row. The packed QKV
group concatenates the q/k/v A matrices along r and puts their B matrices block-diagonally;
PEFT's scaling is folded into B.

The adapter file's ``model_version`` carries 31 bits of the base model's fingerprint, so an
adapter packed for another base is refused at load; the full fingerprint, the slots and each
adapter's rank are in the build's ``adapters.json``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from omniforge.errors import ConfigError
from omniforge.export.llm_ort import LlamaWeights
from omniforge.pipeline.contracts import lora_slot
from omniforge.runtime.adapters import lora_input_names, model_version

# linear group of the in-place graph -> the HF modules packed into it (in order along N)
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate": ("mlp.gate_proj",),
    "up": ("mlp.up_proj",),
    "down": ("mlp.down_proj",),
}
ADAPTER_VERSION = 1
INDEX_FILE = "adapters/adapters.json"


def _hf(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{module}.weight"


def adapter_slots(
    adapters: dict[str, Any], weights: LlamaWeights, num_layers: int
) -> dict[str, tuple[int, int]]:
    """The (K, N) of every linear group any of ``adapters`` (``LoraAdapter``s) targets, in layer order."""
    slots: dict[str, tuple[int, int]] = {}
    for i in range(num_layers):
        for group, modules in GROUPS.items():
            names = [_hf(i, m) for m in modules]
            if any(n in a.pairs for a in adapters.values() for n in names):
                shapes = [weights.shape(n) for n in names]
                slots[lora_slot(i, group)] = (int(shapes[0][1]), int(sum(s[0] for s in shapes)))
    targeted = {n for a in adapters.values() for n in a.pairs}
    known = {_hf(i, m) for i in range(num_layers) for ms in GROUPS.values() for m in ms}
    other = sorted(targeted - known)
    if other:
        raise ConfigError(
            f"adapters may target the attention and MLP projections only; one targets '{other[0]}'"
        )
    return slots


def pack(
    adapter: Any, slots: dict[str, tuple[int, int]], weights: LlamaWeights
) -> tuple[dict[str, np.ndarray], int]:
    """``adapter``'s pairs as the graph's inputs (A (1, K, r), B (1, r, N) per slot; r = 0 where it
    targets nothing in a slot) and its largest packed rank."""
    arrays: dict[str, np.ndarray] = {}
    rank = 0
    for slot, (k, n) in slots.items():
        _, layer, group = slot.split(".")
        a_parts, b_parts, offset = [], [], 0
        for module in GROUPS[group]:
            name = _hf(int(layer), module)
            pair = adapter.pair(name)
            width = weights.shape(name)[0]
            if pair is not None:
                a, b = pair  # (r, K), (out, r) scaled
                block = np.zeros((len(a), n), np.float32)
                block[:, offset : offset + b.shape[0]] = b.T
                a_parts.append(a.T)
                b_parts.append(block)
            offset += width
        r = sum(p.shape[1] for p in a_parts)
        name_a, name_b = lora_input_names(slot)
        arrays[name_a] = (np.concatenate(a_parts, axis=1) if a_parts else np.zeros((k, 0), np.float32))[None]
        arrays[name_b] = (np.concatenate(b_parts, axis=0) if b_parts else np.zeros((0, n), np.float32))[None]
        rank = max(rank, r)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}, rank


def base_fingerprint(weights: LlamaWeights, num_layers: int) -> str:
    """A SHA-256 over the base LLM's linear weights' names and shapes and the values of its first
    layer's attention weights and final norm: what an adapter was packed against."""
    h = hashlib.sha256()
    for i in range(num_layers):
        for modules in GROUPS.values():
            for m in modules:
                name = _hf(i, m)
                h.update(f"{name}{weights.shape(name)}".encode())
    for name in (_hf(0, "self_attn.q_proj"), _hf(0, "self_attn.v_proj"), "model.norm.weight"):
        h.update(np.ascontiguousarray(weights.tensor(name), np.float32).tobytes())
    return h.hexdigest()


def write_adapter(
    path: Path, arrays: dict[str, np.ndarray], fingerprint: str, dtype: str = "float32"
) -> None:
    """``arrays`` in ONNX Runtime's adapter format, stored as ``dtype`` (float32 or float16)."""
    import onnxruntime as ort

    if dtype not in ("float32", "float16"):
        raise ConfigError(f"adapters are stored as float32 or float16, not '{dtype}'")
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(ADAPTER_VERSION)
    fmt.set_model_version(model_version(fingerprint))
    keep = {k: np.ascontiguousarray(v.astype(dtype)) for k, v in arrays.items()}  # alive until written
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in keep.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt.export_adapter(str(path))


def export_adapters(
    adapters: dict[str, Path],
    weights: LlamaWeights,
    num_layers: int,
    build: Path,
    auto: dict[str, str | None],
    dtype: str = "float32",
) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """Write every adapter of ``adapters`` (name -> PEFT folder) and the index into ``build``;
    return the graph's slots and the manifest's file roles (``adapters``, ``adapter.<name>``)."""
    from omniforge.export.llm_stream import LoraAdapter

    loaded = {name: LoraAdapter(folder) for name, folder in adapters.items()}
    slots = adapter_slots(loaded, weights, num_layers)
    for name, a in loaded.items():
        for n in a.pairs:
            a_shape, b_shape = (a.reader.shape(x) for x in a.pairs[n])
            if (b_shape[0], a_shape[1]) != tuple(weights.shape(n)):
                raise ConfigError(
                    f"adapter '{name}' was trained for another base model: its '{n}' is "
                    f"{b_shape[0]}x{a_shape[1]}, the base LLM's is {'x'.join(map(str, weights.shape(n)))}"
                )
    fingerprint = base_fingerprint(weights, num_layers)
    files: dict[str, str] = {"adapters": INDEX_FILE}
    items: dict[str, Any] = {}
    for name, a in loaded.items():
        arrays, rank = pack(a, slots, weights)
        rel = f"adapters/{name}.onnx_adapter"
        write_adapter(build / rel, arrays, fingerprint, dtype)
        files[f"adapter.{name}"] = rel
        modules = sorted({n.split(".")[-2] for n in a.pairs})
        lora_rank = max(a.reader.shape(pair[0])[0] for pair in a.pairs.values())
        items[name] = {
            "file": rel,
            "rank": lora_rank,  # the adapter's r
            "packed_rank": rank,  # the widest packed group (q, k and v side by side)
            "dtype": dtype,
            "modules": modules,
        }
    index = {
        "version": ADAPTER_VERSION,
        "base_fingerprint": fingerprint,
        "slots": {k: list(v) for k, v in slots.items()},
        "adapters": items,
        "auto": auto,
    }
    (build / INDEX_FILE).parent.mkdir(parents=True, exist_ok=True)
    (build / INDEX_FILE).write_text(json.dumps(index, indent=1))
    return slots, files
