"""Decoding the frames of a video that a front end picks from its frame count and rate (torch-free).

ImageBind's clips are placed in time (2-second clips spread over the video), so its front end needs
the frame rate as well as the count; only the frames it picks are decoded and kept.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

import numpy as np
from PIL import Image

from omniforge.errors import InputError
from omniforge.runtime import media as M

FOLDER_FPS = 30.0  # a folder of frames carries no rate: taken as 30 frames per second
Pick = Callable[[int, float], np.ndarray]  # (frame count, fps) -> frame indices (any shape)


def read_picked_frames(path: str | os.PathLike[str], pick: Pick) -> tuple[np.ndarray, dict[int, Image.Image]]:
    """``pick``'s indices for ``path`` (a frame folder, an animated GIF/WebP or an MP4) and the
    RGB frames at those indices, each decoded once."""
    p, st = M._stat(path, "video")
    if stat.S_ISDIR(st.st_mode):
        try:
            files = sorted(f for f in p.iterdir() if f.suffix.lower() in M.IMAGE_SUFFIXES)
        except OSError as exc:
            raise InputError(f"video folder '{p}' cannot be listed ({exc.strerror})") from None
        if not files:
            raise InputError(f"video folder '{p}' holds no image frames")
        at = _checked(pick(len(files), FOLDER_FPS), len(files))
        return at, {int(i): M.load_image(files[int(i)]).convert("RGB") for i in np.unique(at)}
    if p.suffix.lower() in (".mp4", ".mov", ".mkv", ".avi", ".webm"):
        M._open_regular(p, "video").close()
        return _stream_frames(p, pick)
    with M._open_regular(p, "video") as f:
        try:
            with Image.open(f) as im:
                M.check_image_size(im.width, im.height, p.name)
                n = getattr(im, "n_frames", 1)
                ms = float(im.info.get("duration") or 0)
                at = _checked(pick(n, 1000.0 / ms if ms > 0 else FOLDER_FPS), n)
                frames = {}
                for i in np.unique(at):
                    im.seek(int(i))
                    frames[int(i)] = im.convert("RGB")
                return at, frames
        except InputError:
            raise
        except Exception as exc:  # Pillow's decoders raise many types for corrupt data
            raise InputError(
                f"'{p.name}' is not a readable video (a frame folder, GIF, or MP4) ({exc})"
            ) from None


def _checked(at: np.ndarray, n: int) -> np.ndarray:
    at = np.asarray(at, dtype=np.int64)
    if at.size == 0 or at.min() < 0 or at.max() >= n:
        raise InputError(f"the video's front end picked frames outside the video's {n} frames")
    return at


def _stream_frames(p, pick: Pick) -> tuple[np.ndarray, dict[int, Image.Image]]:
    iio = M.imageio_for(p)
    try:
        meta = iio.immeta(p)
        fps = float(meta.get("fps") or FOLDER_FPS)
        n = sum(1 for _ in iio.imiter(p))  # counted by decoding: container frame counts are unreliable
        at = _checked(pick(n, fps), n)
        want, frames = set(int(i) for i in np.unique(at)), {}
        for i, frame in enumerate(iio.imiter(p)):
            if i in want:
                M.check_image_size(frame.shape[1], frame.shape[0], p.name)
                frames[i] = Image.fromarray(frame).convert("RGB")
        return at, frames
    except InputError:
        raise
    except Exception as exc:  # imageio raises backend-specific errors
        raise InputError(f"'{p.name}' is not a readable video ({exc})") from None
