"""Media front ends in numpy + Pillow + the stdlib: images, videos, WAV audio, log-mel features.
Video files (MP4, MOV, MKV, WebM, AVI: their frames and sound track) are decoded with PyAV, an
optional dependency imported on first use (``runtime.video``).

Each reproduces the preprocessing the encoders were exported with (CLIP image preprocessing,
an HTK log-mel spectrogram) and is checked against transformers' own implementations in the
tests. Inputs are read only from regular files (a FIFO or device is refused, never waited on),
and every size is checked against the limits below before anything is decoded or allocated:
an image's pixels and aspect ratio from its header, a WAV's rate and channels from its ``fmt ``
chunk (and only the part of its samples that is used is read), a build's front-end config values.
Writers (PNG, GIF, WAV) replace their target atomically.
"""

from __future__ import annotations

import io
import math
import os
import stat
import struct
import warnings
import wave
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from omniforge.errors import ConfigError, InputError
from omniforge.pipeline.atomic import temp_file

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi"}  # decoded with PyAV (``runtime.video``)

# what a media file or a build's front-end config may ask for; beyond it, one error
MAX_PIXELS = 64_000_000  # of an image or a video frame, as stored and as resized for the encoder
MAX_ASPECT = 100  # longer side : shorter side
MAX_PREPROCESS_SIDE = 4096  # the image preprocessor's shortest edge and crop sides
MAX_VIDEO_FRAMES = 256  # frames sampled from a video
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 384_000  # Hz: WAV files and the audio front end
MAX_CHANNELS = 64
MAX_AUDIO_SECONDS = 30.0  # ``load_wav`` reads at most this much from the start of a file by default
MAX_AUDIO_SAMPLES = 1 << 24  # samples over all channels read from one file (or a video's track)
MAX_WAV_CHUNKS = 1024  # RIFF chunks walked to find 'fmt ' and 'data'
MAX_FFT, MAX_MEL_BINS, MAX_MEL_FRAMES = 1 << 16, 1024, 100_000  # the audio front end's sizes
MAX_MEL_WORK = 1 << 22  # num_frames x n_fft and n_mels x (n_fft // 2 + 1): the front end's largest arrays
MAX_UPSAMPLE = 1024  # one upsampling rate of the vocoder config
MIN_VAE_SCALE, MAX_VAE_SCALE = 1e-6, 1e6  # a VAE config's scaling_factor
MAX_CONFIG_FLOAT, MIN_CONFIG_DIVISOR = 1e6, 1e-6  # a front-end config's means, scales and divisors

_SPECIAL = (
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


# ---- files --------------------------------------------------------------------------------------
def _stat(path: str | os.PathLike[str], what: str) -> tuple[Path, os.stat_result]:
    """``path`` and its status, or one ``InputError`` for something that is not a reachable path."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"the {what} must be given as a file path, got {type(path).__name__}")
    p = Path(path)
    try:
        return p, os.stat(p)
    except FileNotFoundError:
        raise InputError(f"{what} file '{p}' does not exist") from None
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise InputError(f"{what} file '{p}' cannot be reached ({why})") from None


def _not_regular(p: Path, mode: int, what: str) -> InputError:
    if stat.S_ISDIR(mode):
        return InputError(f"{what} path '{p}' is a folder, not a file")
    kind = next((k for test, k in _SPECIAL if test(mode)), "special file")
    return InputError(f"{what} path '{p}' is a {kind}, not a regular file")


def _open_regular(path: str | os.PathLike[str], what: str) -> BinaryIO:
    """``path`` opened for reading if it is a regular file. It is checked before opening and again
    on the open descriptor, which is opened non-blocking: a FIFO or device is refused, never waited on."""
    p, st = _stat(path, what)
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(p, st.st_mode, what)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise InputError(f"{what} file '{p}' is not readable") from None
    except OSError as exc:
        raise InputError(f"{what} file '{p}' cannot be opened ({exc.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # replaced between the two looks
        os.close(fd)
        raise _not_regular(p, st.st_mode, what)
    return _WithinFile(io.FileIO(fd, "rb"), st.st_size)


class _WithinFile(io.BufferedReader):
    """A reader that never asks for more bytes than the file holds past the current position: a
    decoder that reads as far as a length field in the file says (Pillow skips a PNG's IDAT chunk
    by reading its declared length in one call) allocates at most the file's size, not 2 GiB for a
    75-byte file."""

    def __init__(self, raw: io.FileIO, size: int) -> None:
        super().__init__(raw)
        self._size = size

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size > 0:
            size = min(size, max(0, self._size - self.tell()))
        return super().read(size)


# ---- config values ------------------------------------------------------------------------------
def config_int(cfg: Mapping[str, Any], key: str, lo: int, hi: int, what: str, default: Any = None) -> int:
    """``cfg[key]`` as an integer in [lo, hi], else one ``ConfigError`` naming the limit."""
    v = cfg.get(key, default)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(f"the {what} config's '{key}' must be an integer in [{lo}, {hi}], got {_shown(v)}")
    return v


def config_float(cfg: Mapping[str, Any], key: str, what: str, default: float, nonzero: bool = False) -> float:
    """``cfg[key]`` as a float within [-``MAX_CONFIG_FLOAT``, ``MAX_CONFIG_FLOAT``] (and, if
    ``nonzero``, of magnitude at least ``MIN_CONFIG_DIVISOR``: it is divided by), else one
    ``ConfigError``. Within these bounds what is computed from it stays finite in float32."""
    v = cfg.get(key, default)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or not _in_range(abs(v), nonzero):
        raise ConfigError(
            f"the {what} config's '{key}' must be {_float_need(nonzero, 'a', 'number')}, got {_shown(v)}"
        )
    return float(v)


def _in_range(magnitude: Any, nonzero: bool) -> bool:
    return bool(
        np.all(magnitude <= MAX_CONFIG_FLOAT) and (not nonzero or np.all(magnitude >= MIN_CONFIG_DIVISOR))
    )


def _float_need(nonzero: bool, article: str, noun: str) -> str:
    if nonzero:
        return f"{article} finite, non-zero {noun} of magnitude in [{MIN_CONFIG_DIVISOR:g}, {MAX_CONFIG_FLOAT:g}]"
    return f"{article} finite {noun} in [{-MAX_CONFIG_FLOAT:g}, {MAX_CONFIG_FLOAT:g}]"


def _shown(v: object) -> str:
    """A config value as a message shows it: cut short."""
    r = repr(v)
    return r if len(r) <= 60 else f"{r[:40]}... ({len(r)} characters)"


def config_bool(cfg: Mapping[str, Any], key: str, what: str, default: bool) -> bool:
    """``cfg[key]`` if it is true or false (a string such as "false" is refused, not taken as true)."""
    v = cfg.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"the {what} config's '{key}' must be true or false, got {_shown(v)}")
    return v


def _config_section(cfg: Mapping[str, Any], key: str, what: str) -> Mapping[str, Any]:
    v = cfg.get(key, {})
    if not isinstance(v, Mapping):
        raise ConfigError(f"the {what} config's '{key}' must be an object, got {_shown(v)}")
    return v


# ---- images -------------------------------------------------------------------------------------
def check_image_size(width: int, height: int, name: str) -> None:
    """Refuse an image without pixels, above ``MAX_PIXELS``, or with sides further apart than ``MAX_ASPECT``."""
    if width < 1 or height < 1:
        raise InputError(f"image '{name}' is {width}x{height}: it has no pixels")
    if width * height > MAX_PIXELS:
        raise InputError(f"image '{name}' has {width}x{height} pixels, more than {MAX_PIXELS}")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise InputError(f"image '{name}' is {width}x{height}, an aspect ratio beyond {MAX_ASPECT}:1")


def pillow_open(f: BinaryIO) -> Image.Image:
    """``Image.open`` without Pillow's decompression-bomb warning: every caller checks the size
    itself (``MAX_PIXELS`` lies below Pillow's warning threshold) and refuses in one sentence."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(f)


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """An RGB image from a regular file; its size is checked from the header before it is decoded."""
    with _open_regular(path, "image") as f:
        name = Path(path).name
        try:
            with pillow_open(f) as im:
                check_image_size(im.width, im.height, name)
                im.load()
                return _to_rgb(im)
        except InputError:
            raise
        except Image.DecompressionBombError:
            raise InputError(f"image '{name}' has more than {MAX_PIXELS} pixels") from None
        except Exception as exc:  # Pillow's decoders raise many types for corrupt data
            why = type(exc).__name__ if "<_io." in str(exc) else str(exc)  # not the file object's repr
            raise InputError(f"'{name}' is not a readable image ({why})") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB by the image's real range: Pillow's own conversion clips 16- and 32-bit grey to 255."""
    if not im.mode.startswith("I"):
        return im.convert("RGB")
    # PNG stores at most 16 bits (older Pillow opens such files as "I"); "I" is otherwise int32
    top = 65535 if im.mode.startswith("I;16") or im.format == "PNG" else 2**31 - 1
    grey = np.clip(np.asarray(im, dtype=np.float64) / top, 0.0, 1.0)
    return Image.fromarray((grey * 255).round().astype(np.uint8)).convert("RGB")


@dataclass(frozen=True)
class ImagePreprocessing:
    """The image preprocessor config (CLIP's), each size within its limit."""

    shortest_edge: int
    crop: tuple[int, int]  # (height, width)
    resample: Image.Resampling
    do_resize: bool
    do_center_crop: bool
    rescale_factor: float
    do_normalize: bool
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ImagePreprocessing:
        what, side = "image preprocessor", MAX_PREPROCESS_SIDE
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"the {what} config must be an object, got {type(cfg).__name__}")
        short = config_int(_config_section(cfg, "size", what), "shortest_edge", 1, side, what, 224)
        crop_cfg = _config_section(cfg, "crop_size", what) or {"height": short, "width": short}
        crop = tuple(config_int(crop_cfg, k, 1, side, what, short) for k in ("height", "width"))
        resample = config_int(cfg, "resample", 0, max(Image.Resampling), what, 3)
        try:
            mode = Image.Resampling(resample)
        except ValueError:
            raise ConfigError(f"the {what} config's 'resample' {resample} is not a Pillow filter") from None
        # as transformers: without do_rescale the pixels keep their 0-255 range
        do_rescale = config_bool(cfg, "do_rescale", what, True)
        rescale = config_float(cfg, "rescale_factor", what, 1 / 255) if do_rescale else 1.0
        return cls(
            short,
            (crop[0], crop[1]),
            mode,
            config_bool(cfg, "do_resize", what, True),
            config_bool(cfg, "do_center_crop", what, True),
            rescale,
            config_bool(cfg, "do_normalize", what, True),
            _channel_stats(cfg, "image_mean", what, False),
            _channel_stats(cfg, "image_std", what, True),
        )


def _channel_stats(cfg: Mapping[str, Any], key: str, what: str, nonzero: bool) -> np.ndarray:
    v = cfg.get(key, [0.5] * 3)
    try:
        arr = np.asarray(v, np.float64)
    except (TypeError, ValueError, OverflowError):
        arr = np.asarray([np.nan])
    if arr.shape not in ((), (3,)) or not np.isfinite(arr).all() or not _in_range(np.abs(arr), nonzero):
        need = _float_need(nonzero, "one or three", "numbers")
        raise ConfigError(f"the {what} config's '{key}' must be {need}, got {_shown(v)}")
    return np.broadcast_to(arr, (3,)).astype(np.float32)


def _as_image(image: Image.Image | np.ndarray) -> Image.Image:
    """A PIL image of a checked size from an image or an (H, W, 3) uint8 array."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"an image array must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        check_image_size(image.shape[1], image.shape[0], "array")
        return Image.fromarray(np.ascontiguousarray(image))
    if not isinstance(image, Image.Image):
        raise InputError(
            f"an image must be a PIL image or an (H, W, 3) uint8 array, got {type(image).__name__}"
        )
    check_image_size(image.width, image.height, "image")
    return image


def preprocess_image(
    image: Image.Image | np.ndarray, cfg: Mapping[str, Any] | ImagePreprocessing
) -> np.ndarray:
    """CLIP preprocessing: shortest edge -> size, center crop, rescale, normalize -> (3, H, W) float32.

    The image and the size it is resized to are checked against ``MAX_PIXELS`` first."""
    prep = cfg if isinstance(cfg, ImagePreprocessing) else ImagePreprocessing.from_config(cfg)
    image = _as_image(image).convert("RGB")
    w, h = nw, nh = image.size
    if prep.do_resize:
        short = prep.shortest_edge
        nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        if nw * nh > MAX_PIXELS:
            raise InputError(f"a {w}x{h} image resized to {nw}x{nh} would have more than {MAX_PIXELS} pixels")
    if not prep.do_center_crop and max(nw, nh) > MAX_PREPROCESS_SIDE:  # all of it would become floats
        raise InputError(
            f"a {w}x{h} image preprocessed without a center crop is {nw}x{nh}; "
            f"at most {MAX_PREPROCESS_SIDE} pixels a side are encoded"
        )
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), resample=prep.resample)
    x = np.asarray(image)  # (H, W, 3) uint8
    if prep.do_center_crop:
        x = _center_crop(x, *prep.crop)
    out = (x.astype(np.float64) * prep.rescale_factor).astype(np.float32)
    if prep.do_normalize:
        out = (out - prep.mean) / prep.std
    return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32)


def _center_crop(x: np.ndarray, ch: int, cw: int) -> np.ndarray:
    h, w = x.shape[:2]
    if h < ch or w < cw:  # pad like transformers' center_crop does for small images
        ph, pw = max(ch, h), max(cw, w)
        padded = np.zeros((ph, pw, x.shape[2]), x.dtype)
        top, left = (ph - h) // 2, (pw - w) // 2
        padded[top : top + h, left : left + w] = x
        x, h, w = padded, ph, pw
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[top : top + ch, left : left + cw]


def sample_indices(n: int, k: int) -> np.ndarray:
    """``k`` uniformly spaced frame indices out of ``n``."""
    return np.linspace(0, n - 1, k).round().astype(np.int64)


def check_frame_count(num_frames: int) -> int:
    """The number of frames to sample, refused beyond ``MAX_VIDEO_FRAMES``."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)):
        raise ConfigError(f"the number of video frames must be an integer, got {type(num_frames).__name__}")
    if not 1 <= num_frames <= MAX_VIDEO_FRAMES:
        raise ConfigError(f"the number of video frames must lie in [1, {MAX_VIDEO_FRAMES}], got {num_frames}")
    return int(num_frames)


def iter_video_frames(path: str | os.PathLike[str], num_frames: int) -> Iterator[Image.Image]:
    """Uniformly sampled RGB frames, one at a time, from a folder of images, an animated GIF/WebP, or
    a video file (``VIDEO_SUFFIXES``, with PyAV): only the sampled frames are converted and kept."""
    k = check_frame_count(num_frames)
    p, st = _stat(path, "video")
    if stat.S_ISDIR(st.st_mode):
        try:
            files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        except OSError as exc:
            raise InputError(f"video folder '{p}' cannot be listed ({exc.strerror})") from None
        if not files:
            raise InputError(f"video folder '{p}' holds no image frames")
        for i in sample_indices(len(files), k):
            yield load_image(files[i])
        return
    if p.suffix.lower() in VIDEO_SUFFIXES:
        from omniforge.runtime.video import iter_file_frames

        yield from iter_file_frames(p, k)
        return
    with _open_regular(p, "video") as f:
        yield from _animated_frames(f, p.name, k)


def _animated_frames(f: BinaryIO, name: str, k: int) -> Iterator[Image.Image]:
    try:
        with pillow_open(f) as im:
            check_image_size(im.width, im.height, name)
            for i in sample_indices(getattr(im, "n_frames", 1), k):
                im.seek(int(i))
                yield im.convert("RGB")
    except InputError:
        raise
    except Exception as exc:  # Pillow's decoders raise many types for corrupt data
        raise InputError(f"'{name}' is not a readable video (a frame folder, GIF, or MP4) ({exc})") from None


def load_video_frames(path: str | os.PathLike[str], num_frames: int) -> list[Image.Image]:
    """Uniformly sampled RGB frames from a folder of images, an animated GIF/WebP, or a video file."""
    return list(iter_video_frames(path, num_frames))


WAVE_PCM, WAVE_FLOAT, WAVE_EXTENSIBLE = 1, 3, 0xFFFE
# the tail every WAVE_FORMAT_EXTENSIBLE sub-format GUID shares; its first two bytes are the format
_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
_DECODERS: dict[tuple[int, int], Callable[[bytes], np.ndarray]] = {
    (WAVE_PCM, 8): lambda b: (np.frombuffer(b, np.uint8).astype(np.float64) - 128) / 128,
    (WAVE_PCM, 16): lambda b: np.frombuffer(b, "<i2") / 2.0**15,
    (WAVE_PCM, 24): lambda b: _int24(b) / 2.0**23,
    (WAVE_PCM, 32): lambda b: np.frombuffer(b, "<i4") / 2.0**31,
    (WAVE_FLOAT, 32): lambda b: np.frombuffer(b, "<f4"),
    (WAVE_FLOAT, 64): lambda b: np.frombuffer(b, "<f8"),
}


def _int24(b: bytes) -> np.ndarray:
    u = np.frombuffer(b, np.uint8).reshape(-1, 3).astype(np.int32)
    v = u[:, 0] | (u[:, 1] << 8) | (u[:, 2] << 16)
    return np.where(v >= 1 << 23, v - (1 << 24), v)


def _wav_layout(f: BinaryIO, size: int) -> tuple[bytes, int, int]:
    """The ``fmt `` chunk, and the ``data`` chunk's offset and length (a chunk cut short keeps what
    is there), found by walking chunk headers: no sample is read."""
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise ValueError("no RIFF/WAVE header")
    fmt: bytes | None = None
    data: tuple[int, int] | None = None
    pos = 12
    for _ in range(MAX_WAV_CHUNKS):
        f.seek(pos)
        hdr = f.read(8)
        if len(hdr) < 8:
            break
        cid, n = hdr[:4], struct.unpack("<I", hdr[4:])[0]
        if cid == b"fmt " and fmt is None:
            fmt = f.read(min(n, 1024))
        elif cid == b"data" and data is None:
            data = (pos + 8, max(0, min(n, size - pos - 8)))
        if fmt is not None and data is not None:
            return fmt, *data
        pos += 8 + n + (n & 1)  # chunks are word-aligned
    raise ValueError(f"no 'fmt ' or 'data' chunk among its first {MAX_WAV_CHUNKS} chunks")


def _wav_format(fmt: bytes) -> tuple[int, int, int, int]:
    """(format, channels, sample rate, bits per sample) of a ``fmt `` chunk, extensible unwrapped."""
    if len(fmt) < 16:
        raise ValueError("'fmt ' chunk too short")
    tag, channels, rate, _byte_rate, align, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == WAVE_EXTENSIBLE:
        if len(fmt) < 40 or fmt[26:40] != _GUID_TAIL:
            raise ValueError("WAVE_FORMAT_EXTENSIBLE without a known sub-format")
        tag = struct.unpack_from("<H", fmt, 24)[0]
    if channels == 0 or align == 0:
        raise ValueError("no channels")
    return tag, channels, rate, 8 * (align // channels)  # the container width, as it is laid out


def load_wav(
    path: str | os.PathLike[str], max_seconds: float = MAX_AUDIO_SECONDS, channel: int | None = None
) -> tuple[np.ndarray, int]:
    """Mono float32 samples and the sample rate of a WAV file: 8/16/24/32-bit PCM scaled to [-1, 1),
    32/64-bit float as stored, either also inside WAVE_FORMAT_EXTENSIBLE. ``channel``: that channel
    alone (ImageBind's front end reads the first), else the mean of all channels.

    Only the first ``max_seconds`` (and at most ``MAX_AUDIO_SAMPLES`` samples over all channels)
    are read; the rest of a longer file is never loaded."""
    check_max_seconds(max_seconds)
    with _open_regular(path, "audio") as f:
        name = Path(path).name
        try:
            fmt, offset, nbytes = _wav_layout(f, os.fstat(f.fileno()).st_size)
            tag, ch, sr, bits = _wav_format(fmt)
        except (ValueError, struct.error, OSError) as exc:
            raise InputError(f"'{name}' is not a readable PCM WAV file ({exc})") from None
        check_audio_format(name, sr, ch)
        decode = _DECODERS.get((tag, bits))
        if decode is None:
            kind = {WAVE_PCM: "PCM", WAVE_FLOAT: "float"}.get(tag, f"format {tag}")
            raise InputError(
                f"'{name}' holds {bits}-bit {kind} samples; 8/16/24/32-bit PCM and 32/64-bit float are supported"
            )
        frame = bits // 8 * ch
        frames = min(nbytes // frame, math.ceil(max_seconds * sr), MAX_AUDIO_SAMPLES // ch)
        f.seek(offset)
        raw = f.read(frames * frame)
    raw = raw[: len(raw) // frame * frame]  # whole frames only
    if not raw:
        raise InputError(f"'{name}' holds no audio samples")
    return to_mono(decode(raw).reshape(-1, ch), channel, name), sr


def check_max_seconds(max_seconds: float) -> float:
    """``max_seconds`` if it is a positive finite number, else one ``ConfigError``."""
    if (
        isinstance(max_seconds, bool)
        or not isinstance(max_seconds, (int, float))
        or not 0 < max_seconds < math.inf
    ):
        raise ConfigError(f"max_seconds must be a positive finite number, got {max_seconds!r}")
    return float(max_seconds)


def check_audio_format(name: str, sr: int, channels: int) -> None:
    """Refuse a recording whose rate lies outside [``MIN_SAMPLE_RATE``, ``MAX_SAMPLE_RATE``] or that
    has more than ``MAX_CHANNELS`` channels."""
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise InputError(
            f"'{name}' has a sample rate of {sr} Hz; {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz are supported"
        )
    if not 1 <= channels <= MAX_CHANNELS:
        raise InputError(f"'{name}' has {channels} channels; 1 to {MAX_CHANNELS} are supported")


def to_mono(frames: np.ndarray, channel: int | None, name: str) -> np.ndarray:
    """(samples, channels) -> float32 mono: ``channel`` alone (the last one if there are fewer), else
    the mean of all channels. WAV files and video sound tracks share this rule."""
    ch = frames.shape[1]
    x = frames.mean(axis=1) if channel is None else frames[:, min(channel, ch - 1)]
    if not np.isfinite(x).all():
        raise InputError(f"'{name}' holds NaN or infinite samples")
    return x.astype(np.float32)


def check_sample_rate(sr: int, what: str) -> int:
    """``sr`` if it lies in [``MIN_SAMPLE_RATE``, ``MAX_SAMPLE_RATE``], else one ``InputError``."""
    if (
        isinstance(sr, bool)
        or not isinstance(sr, (int, np.integer))
        or not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE
    ):
        raise InputError(f"{what} {sr!r} Hz is outside {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz")
    return int(sr)


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited resampling through the spectrum (the signal is treated as periodic)."""
    check_sample_rate(sr_in, "the input sample rate")
    check_sample_rate(sr_out, "the output sample rate")
    if len(x) == 0:
        raise InputError("there are no samples to resample")
    if sr_in == sr_out:
        return x.astype(np.float32)
    n_out = max(1, round(len(x) * sr_out / sr_in))
    spec = np.fft.rfft(x.astype(np.float64))
    keep = min(len(spec), n_out // 2 + 1)
    out = np.zeros(n_out // 2 + 1, np.complex128)
    out[:keep] = spec[:keep]
    return (np.fft.irfft(out, n_out) * (n_out / len(x))).astype(np.float32)


def hz_to_mel(f: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + f / 700.0)


def mel_filterbank(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    """(n_fft // 2 + 1, n_mels) triangular HTK mel filters from 0 Hz to Nyquist, unnormalised."""
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    mel_pts = np.linspace(hz_to_mel(np.array(0.0)), hz_to_mel(np.array(sr / 2)), n_mels + 2)
    hz_pts = 700.0 * (10 ** (mel_pts / 2595.0) - 1.0)
    fb = np.zeros((len(freqs), n_mels))
    for m in range(n_mels):
        lo, mid, hi = hz_pts[m], hz_pts[m + 1], hz_pts[m + 2]
        up = (freqs - lo) / (mid - lo)
        down = (hi - freqs) / (hi - mid)
        fb[:, m] = np.maximum(0.0, np.minimum(up, down))
    return fb


def log_mel(x: np.ndarray, sr: int, n_fft: int, hop: int, n_mels: int, floor: float = 1e-10) -> np.ndarray:
    """(n_mels, frames) natural-log power mel spectrogram, frames centred with reflect padding."""
    if len(x) <= n_fft // 2:
        x = np.pad(x, (0, n_fft // 2 + 1 - len(x)))
    padded = np.pad(x.astype(np.float64), n_fft // 2, mode="reflect")
    frames = 1 + (len(padded) - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    power = np.abs(np.fft.rfft(padded[idx] * window, axis=1)) ** 2  # (frames, bins)
    mel = power @ mel_filterbank(sr, n_fft, n_mels)  # (frames, n_mels)
    return np.log(np.maximum(mel, floor)).T.astype(np.float32)


@dataclass(frozen=True)
class AudioFrontEnd:
    """The audio front-end config (log-mel sizes), each within its limit."""

    sample_rate: int
    n_fft: int
    hop_length: int
    n_mels: int
    num_frames: int
    mean: float
    std: float

    @classmethod
    def from_config(cls, fe: Mapping[str, Any]) -> AudioFrontEnd:
        what = "audio front end"
        if not isinstance(fe, Mapping):
            raise ConfigError(f"the {what} config must be an object, got {type(fe).__name__}")
        n_fft = config_int(fe, "n_fft", 2, MAX_FFT, what)
        cfg = cls(
            config_int(fe, "sample_rate", MIN_SAMPLE_RATE, MAX_SAMPLE_RATE, what),
            n_fft,
            config_int(fe, "hop_length", 1, n_fft, what),
            config_int(fe, "n_mels", 1, MAX_MEL_BINS, what),
            config_int(fe, "num_frames", 1, MAX_MEL_FRAMES, what),
            config_float(fe, "mean", what, 0.0),
            config_float(fe, "std", what, 1.0, nonzero=True),
        )
        # each size may lie within its own limit while their products, the sizes of the framed
        # signal and of the filter bank, do not
        for name, size in (
            ("num_frames x n_fft", cfg.num_frames * cfg.n_fft),
            ("n_mels x (n_fft // 2 + 1)", cfg.n_mels * (cfg.n_fft // 2 + 1)),
        ):
            if size > MAX_MEL_WORK:
                raise ConfigError(f"the {what} config's {name} is {size}, more than {MAX_MEL_WORK}")
        return cfg

    @property
    def window_samples(self) -> int:
        """Samples at ``sample_rate`` that the ``num_frames`` centred frames cover."""
        return (self.num_frames - 1) * self.hop_length + self.n_fft - self.n_fft // 2

    @property
    def read_seconds(self) -> float:
        """Seconds of a recording the features use, with a margin for resampling's edge."""
        return 1.25 * self.window_samples / self.sample_rate + 0.01


def audio_features(wave_: np.ndarray, sr: int, fe: Mapping[str, Any] | AudioFrontEnd) -> np.ndarray:
    """The audio encoder's input: (1, n_mels, num_frames) normalised log-mel, cropped or padded.

    Only the first ``read_seconds`` of ``wave_`` are used (and resampled)."""
    cfg = fe if isinstance(fe, AudioFrontEnd) else AudioFrontEnd.from_config(fe)
    sr = check_sample_rate(sr, "the audio's sample rate")
    if not isinstance(wave_, np.ndarray) or wave_.ndim != 1 or wave_.size == 0 or wave_.dtype.kind != "f":
        raise InputError("audio samples must be a non-empty one-dimensional float array")
    x = resample(wave_[: math.ceil(cfg.read_seconds * sr)], sr, cfg.sample_rate)
    m = log_mel(x, cfg.sample_rate, cfg.n_fft, cfg.hop_length, cfg.n_mels)
    frames = cfg.num_frames
    if m.shape[1] >= frames:
        m = m[:, :frames]
    else:
        m = np.pad(m, ((0, 0), (0, frames - m.shape[1])), constant_values=float(np.log(1e-10)))
    m = (m - cfg.mean) / cfg.std
    return m[None].astype(np.float32)


# ---- decoder configs ----------------------------------------------------------------------------
def vae_scaling(cfg: Mapping[str, Any]) -> float:
    """The VAE config's ``scaling_factor`` (latents are divided by it before decoding): a number in
    [``MIN_VAE_SCALE``, ``MAX_VAE_SCALE``] (real VAEs use 0.1 to 2). ``block_out_channels``, when
    given, must be a non-empty list of sizes; a config that asks for more than that division
    (``shift_factor``, ``latents_mean``/``latents_std``) is refused rather than decoded differently.
    Else one ``ConfigError``."""
    what = "VAE"
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"the {what} config must be an object, got {type(cfg).__name__}")
    if "block_out_channels" in cfg:
        _size_list(cfg, "block_out_channels", what, 1 << 16)
    for key in ("shift_factor", "latents_mean", "latents_std"):
        if cfg.get(key) not in (None, 0):
            raise ConfigError(
                f"the {what} config's '{key}' is not supported (the runtime decodes latents / scaling_factor)"
            )
    v = cfg.get("scaling_factor", 0.18215)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not MIN_VAE_SCALE <= v <= MAX_VAE_SCALE:
        raise ConfigError(
            f"the {what} config's 'scaling_factor' must be a number in [{MIN_VAE_SCALE:g}, {MAX_VAE_SCALE:g}], "
            f"got {_shown(v)}"
        )
    return float(v)


def check_vocoder_config(cfg: Mapping[str, Any]) -> int:
    """The vocoder config's ``sampling_rate`` (what generated WAVs are written at) within
    [``MIN_SAMPLE_RATE``, ``MAX_SAMPLE_RATE``], after checking that ``upsample_rates``, when given,
    is a non-empty list of rates in [1, ``MAX_UPSAMPLE``]; else one ``ConfigError``."""
    what = "vocoder"
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"the {what} config must be an object, got {type(cfg).__name__}")
    if "upsample_rates" in cfg:
        _size_list(cfg, "upsample_rates", what, MAX_UPSAMPLE)
    if "model_in_dim" in cfg:
        config_int(cfg, "model_in_dim", 1, MAX_MEL_BINS, what)
    return config_int(cfg, "sampling_rate", MIN_SAMPLE_RATE, MAX_SAMPLE_RATE, what, 16000)


def _size_list(cfg: Mapping[str, Any], key: str, what: str, hi: int, most: int = 64) -> list[int]:
    v = cfg[key]
    if not isinstance(v, list) or not 1 <= len(v) <= most:
        raise ConfigError(
            f"the {what} config's '{key}' must be a list of 1 to {most} integers, got {_shown(v)}"
        )
    return [config_int({key: x}, key, 1, hi, what) for x in v]


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) floats in [0, 1] -> uint8."""
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


def write_png(path: str | Path, image: np.ndarray) -> Path:
    return _atomic_write(Path(path), lambda f: Image.fromarray(to_uint8(image)).save(f, format="PNG"))


def write_gif(path: str | Path, frames: np.ndarray, fps: int = 8) -> Path:
    pics = [Image.fromarray(to_uint8(fr)) for fr in frames]
    return _atomic_write(
        Path(path),
        lambda f: pics[0].save(
            f, format="GIF", save_all=True, append_images=pics[1:], duration=1000 // fps, loop=0
        ),
    )


def write_wav(path: str | Path, samples: np.ndarray, sr: int) -> Path:
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).round().astype("<i2")

    def write(f: io.BufferedWriter) -> None:
        with wave.open(f, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(sr)
            w.writeframes(pcm.tobytes())

    return _atomic_write(Path(path), write)
