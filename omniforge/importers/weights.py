"""Weights read from pickles without running their code, and from safetensors.

Released checkpoints (NExT-GPT's ``pytorch_model.pt``, Vicuna's ``pytorch_model-*.bin`` shards) are
pickles, and unpickling can run arbitrary code. They are read only through
``torch.load(weights_only=True)``, which rebuilds tensors and plain containers and refuses anything
else; a refused or damaged file is one sentence, never a traceback or a warning.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from omniforge.errors import ConfigError, ModelNotFoundError

PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
WEIGHT_SUFFIXES = (*PICKLE_SUFFIXES, ".safetensors")
# a checkpoint's tensors are sometimes one level down, beside training state
WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")
# index files, safetensors first: a folder holding both formats is read from safetensors
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
DAMAGED = "corrupt, truncated, or not a pickle of tensors and plain containers"


def load_pickled_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickled state dict (``.pt/.pth/.bin``), read with ``weights_only=True``.

    ``{"state_dict": {...}}``-style wrappers are unwrapped. A pickle that needs anything beyond
    tensors and plain containers is refused with a ConfigError; nothing of it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{path} does not exist or is not a file")
    try:
        # mmap keeps a multi-GB shard out of memory until its tensors are used (zip format only)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        # the weights-only unpickler names the callable a pickle asks for: "GLOBAL posix.system"
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise ConfigError(
                f"{path} is refused: unpickling it would import {found.group(1)}, code beyond tensors "
                "and plain containers, and omniforge never runs a checkpoint's code"
            ) from None
        raise ConfigError(f"{path} is not a readable PyTorch weights file ({DAMAGED})") from None
    except Exception:  # torch.load raises RuntimeError, EOFError, KeyError... on damaged files
        raise ConfigError(f"{path} is not a readable PyTorch weights file ({DAMAGED})") from None
    return _as_state_dict(obj, path)


def _as_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # {"model": {"state_dict": {...}}} at most
        if not isinstance(obj, dict):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise ConfigError(f"{path} holds {type(obj).__name__}, not a state dict of named tensors")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(
            f"{path} is not a plain state dict: {len(bad)} entries are not named tensors (e.g. {', '.join(bad[:3])})"
        )
    return obj


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """One weights file: ``.safetensors`` with safetensors, ``.pt/.pth/.bin`` weights-only."""
    path = Path(path)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ConfigError(
            f"{path} is not a weights file omniforge reads (one of {', '.join(WEIGHT_SUFFIXES)})"
        )
    if path.suffix != ".safetensors":
        return load_pickled_weights(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{path} does not exist or is not a file")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{path} is not a readable safetensors file ({exc})") from None


def read_sharded_folder(folder: str | Path) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """``(shard file name, its tensors)`` one shard at a time, so a model never sits in memory whole.

    ``folder`` is an HF model folder (``model-*.safetensors`` or ``pytorch_model-*.bin`` with their
    index json, or one ``model.safetensors`` / ``pytorch_model.bin``) or a single weights file.
    Every shard must hold exactly the tensors its index assigns to it.
    """
    folder = Path(folder)
    if folder.is_file():
        yield folder.name, read_weights(folder)
        return
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder} does not exist")
    index = next((folder / n for n in INDEX_FILES if (folder / n).is_file()), None)
    if index is None:
        single = next((folder / n for n in SINGLE_FILES if (folder / n).is_file()), None)
        if single is None:
            raise ModelNotFoundError(
                f"{folder} has no weights: expected {' or '.join(INDEX_FILES)} with its shards, or {' or '.join(SINGLE_FILES)}"
            )
        yield single.name, read_weights(single)
        return
    for name, keys in _index_shards(index).items():
        state = read_weights(folder / name)
        if set(state) != keys:
            missing, extra = sorted(keys - set(state)), sorted(set(state) - keys)
            raise ConfigError(
                f"{folder / name} does not match {index.name}: "
                f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3]) or '-'}), "
                f"{len(extra)} not in the index (e.g. {', '.join(extra[:3]) or '-'})"
            )
        yield name, state


def _index_shards(index: Path) -> dict[str, set[str]]:
    """Shard file name -> the tensor names the index puts in it, shards in name order."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ConfigError(f"{index} is not a weights index (a JSON object with a weight_map)") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConfigError(f"{index} has an empty or invalid weight_map")
    shards: dict[str, set[str]] = {}
    for key, name in weight_map.items():
        # shard names are plain file names beside the index: never a path out of the folder
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(WEIGHT_SUFFIXES):
            raise ConfigError(f"{index} names {name!r} as a shard, which is not a weights file in its folder")
        shards.setdefault(name, set()).add(key)
    missing = [n for n in shards if not (index.parent / n).is_file()]
    if missing:
        raise ModelNotFoundError(
            f"{index} lists shards that are not in {index.parent}: {', '.join(missing[:3])}"
        )
    return dict(sorted(shards.items()))  # HF numbers its shards: 00001-of-N first
