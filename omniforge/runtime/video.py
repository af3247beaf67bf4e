"""Video input, torch-free: the frames a front end picks, and a video file's sound track.

Frame folders and animated GIF/WebP are read with Pillow; video files (``media.VIDEO_SUFFIXES``)
with PyAV (FFmpeg's libraries, bundled in its wheels: the ``video`` extra), imported on first use.
ImageBind's clips are placed in time (2-second clips spread over the video), so its front end needs
the frame rate as well as the count; only the frames it picks are converted and kept.

A video file's sound track is its first audio stream, decoded at its own rate (the audio front
ends resample) and made mono by the rule WAV files follow (``media.to_mono``), with the same
scaling of integer samples: a WAV and the same samples muxed into a video give the same rows.
"""

from __future__ import annotations

import math
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from omniforge._lazy import lazy_import
from omniforge.errors import InputError, OmniforgeError
from omniforge.runtime import media as M

av = lazy_import("av", extra="video", hint="A frame folder, a GIF and a WAV track are read without it.")

FOLDER_FPS = 30.0  # a folder of frames carries no rate: taken as 30 frames per second
Pick = Callable[[int, float], np.ndarray]  # (frame count, fps) -> frame indices (any shape)

# integer sample formats (planar or packed) -> the divisor that maps them to [-1, 1), as WAV's
_INT_SCALE = {"s16": 2.0**15, "s32": 2.0**31, "s64": 2.0**63}


def read_picked_frames(path: str | os.PathLike[str], pick: Pick) -> tuple[np.ndarray, dict[int, Image.Image]]:
    """``pick``'s indices for ``path`` (a frame folder, an animated GIF/WebP or a video file) and the
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
    if is_video_file(p):
        n, fps = _count_frames(p)
        at = _checked(pick(n, fps), n)
        return at, dict(_frames_at(p, {int(i) for i in np.unique(at)}))
    with M._open_regular(p, "video") as f:
        try:
            with M.pillow_open(f) as im:
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


def is_video_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a video file that PyAV decodes (by its suffix, as frames are read)."""
    return Path(path).suffix.lower() in M.VIDEO_SUFFIXES


def iter_file_frames(path: str | os.PathLike[str], num_frames: int) -> Iterator[Image.Image]:
    """``num_frames`` uniformly sampled RGB frames of a video file, in order, one at a time."""
    p = Path(path)
    n, _ = _count_frames(p)
    counts = Counter(int(i) for i in M.sample_indices(n, M.check_frame_count(num_frames)))
    for i, frame in _frames_at(p, set(counts)):
        for _ in range(counts[i]):  # a frame sampled twice (fewer frames than asked) is yielded twice
            yield frame


@contextmanager
def _opened(p: Path, failure: str) -> Iterator[Any]:
    """``p``, a checked regular file, opened by PyAV; an FFmpeg error while it is open becomes one
    ``InputError``: "'name' <failure> (FFmpeg's reason)"."""
    with M._open_regular(p, "video") as f:
        try:
            with av.open(f, "r") as container:
                yield container
        except OmniforgeError:  # ours, and a missing PyAV's install hint
            raise
        except (av.FFmpegError, ValueError, OSError, EOFError, MemoryError) as exc:
            why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise InputError(f"'{p.name}' {failure} ({why})") from None


def _video_stream(container: Any, name: str) -> Any:
    if not container.streams.video:
        raise InputError(f"'{name}' holds no video stream")
    stream = container.streams.video[0]
    stream.codec_context.thread_type = "AUTO"
    ctx = stream.codec_context
    if ctx.width and ctx.height:  # as the container declares it; each frame is checked again
        M.check_image_size(ctx.width, ctx.height, name)
    return stream


def _count_frames(p: Path) -> tuple[int, float]:
    """The number of frames of ``p`` (counted by decoding: container frame counts are unreliable)
    and its frame rate."""
    with _opened(p, "is not a readable video") as container:
        stream = _video_stream(container, p.name)
        n = sum(1 for _ in container.decode(stream))
        rate = stream.average_rate or stream.guessed_rate
    if n == 0:
        raise InputError(f"'{p.name}' holds no video frames")
    return n, float(rate) if rate and rate > 0 else FOLDER_FPS


def _frames_at(p: Path, want: set[int]) -> Iterator[tuple[int, Image.Image]]:
    """(index, RGB frame) for each index in ``want``, ascending, from one pass that stops after the last."""
    last = max(want)
    with _opened(p, "is not a readable video") as container:
        for i, frame in enumerate(container.decode(_video_stream(container, p.name))):
            if i in want:
                M.check_image_size(frame.width, frame.height, p.name)
                yield i, Image.fromarray(frame.to_ndarray(format="rgb24"))
            if i >= last:
                return
    raise InputError(f"'{p.name}' gave fewer frames on its second reading than on its first")


def has_sound(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a video file with an audio stream (a frame folder or a GIF has none)."""
    p, st = M._stat(path, "video")
    if stat.S_ISDIR(st.st_mode) or not is_video_file(p):
        return False
    with _opened(p, "is not a readable video") as container:
        return bool(container.streams.audio)


def load_sound(
    path: str | os.PathLike[str], max_seconds: float = M.MAX_AUDIO_SECONDS, channel: int | None = None
) -> tuple[np.ndarray, int]:
    """Mono float32 samples and the rate of a WAV file (``media.load_wav``) or of a video file's
    sound track; ``max_seconds`` and ``channel`` as for ``load_wav``."""
    if not is_video_file(path):
        return M.load_wav(path, max_seconds, channel)
    M.check_max_seconds(max_seconds)
    p = Path(path)
    with _opened(p, "has a sound track that cannot be decoded") as container:
        if not container.streams.audio:
            raise InputError(f"'{p.name}' has no sound track (no audio stream)")
        parts, got, fmt = [], 0, None
        for frame in container.decode(container.streams.audio[0]):
            now = (frame.sample_rate, len(frame.layout.channels))
            if fmt is None:
                fmt = now
                M.check_audio_format(p.name, *fmt)
                limit = min(math.ceil(max_seconds * fmt[0]), M.MAX_AUDIO_SAMPLES // fmt[1])
            elif now != fmt:
                raise InputError(f"'{p.name}' has a sound track whose sample rate or channels change midway")
            x = _samples(frame)[: limit - got]
            parts.append(x)
            got += len(x)
            if got >= limit:
                break
    if not got:
        raise InputError(f"'{p.name}' has a sound track that holds no samples")
    return M.to_mono(np.concatenate(parts), channel, p.name), fmt[0]


def _samples(frame: Any) -> np.ndarray:
    """(samples, channels) of a decoded audio frame: floats as decoded, integers scaled to [-1, 1)."""
    x = frame.to_ndarray()
    ch = len(frame.layout.channels)
    x = x.T if frame.format.is_planar else x.reshape(-1, ch)  # planar: (ch, n); packed: (1, n * ch)
    kind = frame.format.name.rstrip("p")  # "s16p" -> "s16", "fltp" -> "flt"
    if kind in ("flt", "dbl"):
        return x
    if kind == "u8":
        return (x.astype(np.float64) - 128) / 128
    if kind in _INT_SCALE:
        return x / _INT_SCALE[kind]
    raise InputError(f"a sound track decodes to '{frame.format.name}' samples, which are not supported")
