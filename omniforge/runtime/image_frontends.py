"""Image front ends beside CLIP's and ImageBind's (torch-free): BLIP's exact-size resize."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from PIL import Image

from omniforge.errors import ManifestError
from omniforge.runtime import media as M


def resize_normalize(picture: Image.Image | np.ndarray, cfg: Mapping[str, object]) -> np.ndarray:
    """BLIP's image processor: RGB, resized to exactly ``height`` x ``width`` (no crop) with Pillow's
    ``resample`` filter, /255, normalised by ``mean`` / ``std`` -> (3, height, width) float32."""
    h, w, resample = (
        _int(cfg, k, lo, hi) for k, lo, hi in (("height", 1, 4096), ("width", 1, 4096), ("resample", 0, 5))
    )
    mean, std = (_triple(cfg, k) for k in ("mean", "std"))
    image = M._as_image(picture).convert("RGB").resize((w, h), resample=Image.Resampling(resample))
    x = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    return ((x - mean) / std).transpose(2, 0, 1).astype(np.float32)


def _int(cfg: Mapping[str, object], key: str, low: int, high: int) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise ManifestError(f"the image front end's '{key}' must be an integer in [{low}, {high}], got {v!r}")
    return v


def _triple(cfg: Mapping[str, object], key: str) -> np.ndarray:
    v = cfg.get(key)
    arr = np.asarray(v, dtype=np.float64) if isinstance(v, list) and len(v) == 3 else None
    if arr is None or not np.isfinite(arr).all() or (key == "std" and (arr <= 0).any()):
        raise ManifestError(f"the image front end's '{key}' must be three finite numbers, got {v!r}")
    return arr.astype(np.float32)
