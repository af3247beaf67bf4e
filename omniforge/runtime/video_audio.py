"""A video's sound track beside its frames (torch-free): how the two row groups are fused.

The frames go through the image encoder and its projector as for a silent video; the track (a WAV
file) through the audio encoder and its projector as an audio input; the video's rows are then
``concat`` (the frame rows, then the track rows, at the video's place in the prompt) or ``mean``
(``(1 - weight) * frames + weight * track``, row by row: both groups must have as many rows).
``nextgpt.json``'s ``video_audio`` section sets it (``configs/video_audio.json`` in a build);
without one, a track is concatenated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from omniforge.errors import ConfigError, InputError, OmniforgeError

FUSIONS = ("concat", "mean")


@dataclass(frozen=True)
class VideoAudio:
    """How a video's rows and its track's rows become the video's rows."""

    fusion: str = "concat"
    weight: float = 0.5  # the track's share under ``mean``

    def problem(self) -> str | None:
        """Why these settings are invalid, in one sentence; None when they are valid."""
        if self.fusion not in FUSIONS:
            return f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}"
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or not 0 <= w <= 1:
            return f"weight must be a number in [0, 1], got {w!r}"
        return None

    @classmethod
    def from_config(cls, cfg: Any, error: type[OmniforgeError] = ConfigError) -> VideoAudio:
        """Settings from a ``video_audio`` mapping (``error`` with one sentence when invalid)."""
        if not isinstance(cfg, Mapping):
            raise error(f"video_audio must be an object with 'fusion' and 'weight', got {cfg!r}")
        unknown = sorted(set(cfg) - {"fusion", "weight"})
        if unknown:
            raise error(f"video_audio has unknown keys {unknown} (it takes 'fusion' and 'weight')")
        va = cls(**cfg)
        why = va.problem()
        if why is not None:
            raise error(f"video_audio {why}")
        return va

    def to_config(self) -> dict[str, Any]:
        return {"fusion": self.fusion, "weight": float(self.weight)}

    def check_rows(self, video_rows: int, track_rows: int) -> None:
        """Refuse a ``mean`` over groups of different sizes (``ConfigError``)."""
        if self.fusion == "mean" and video_rows != track_rows:
            raise ConfigError(
                f"video_audio fusion 'mean' needs as many rows from the frames as from the track; the "
                f"image encoder gives {video_rows} and the audio encoder {track_rows} (use 'concat')"
            )

    def fuse(self, frames: np.ndarray, track: np.ndarray) -> np.ndarray:
        """(n, H) frame rows and (m, H) track rows -> the video's rows."""
        if self.fusion == "concat":
            return np.concatenate([frames, track]).astype(np.float32)
        if frames.shape != track.shape:
            raise InputError(
                f"video_audio fusion 'mean' needs as many rows from the frames ({frames.shape[0]}) as "
                f"from the track ({track.shape[0]})"
            )
        w = np.float32(self.weight)
        return ((np.float32(1) - w) * frames + w * track).astype(np.float32)
