"""Media front ends in numpy + Pillow + the stdlib: images, videos, WAV audio, log-mel features.

Each reproduces the preprocessing the encoders were exported with (CLIP image preprocessing,
an HTK log-mel spectrogram) and is checked against transformers' own implementations in the
tests. Writers (PNG, GIF, WAV) replace their target atomically.
"""

from __future__ import annotations

import io
import os
import struct
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from omniforge.errors import InputError
from omniforge.pipeline.atomic import temp_file

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
MAX_PIXELS = 64_000_000  # refuse decompression bombs


def _existing(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} file '{p}' does not exist")
    if not os.access(p, os.R_OK):
        raise InputError(f"{what} file '{p}' is not readable")
    return p


def load_image(path: str | Path) -> Image.Image:
    """An RGB image from a file, or one clear error for missing, corrupt or huge files."""
    p = _existing(path, "image")
    if p.is_dir():
        raise InputError(f"image path '{p}' is a folder, not an image file")
    try:
        with Image.open(p) as im:
            if im.width * im.height > MAX_PIXELS:
                raise InputError(
                    f"image '{p.name}' has {im.width}x{im.height} pixels, more than {MAX_PIXELS}"
                )
            im.load()
            return _to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"'{p.name}' is not a readable image ({exc})") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB by the image's real range: Pillow's own conversion clips 16- and 32-bit grey to 255."""
    if not im.mode.startswith("I"):
        return im.convert("RGB")
    # PNG stores at most 16 bits (older Pillow opens such files as "I"); "I" is otherwise int32
    top = 65535 if im.mode.startswith("I;16") or im.format == "PNG" else 2**31 - 1
    grey = np.clip(np.asarray(im, dtype=np.float64) / top, 0.0, 1.0)
    return Image.fromarray((grey * 255).round().astype(np.uint8)).convert("RGB")


def preprocess_image(image: Image.Image | np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
    """CLIP preprocessing: shortest edge -> size, center crop, rescale, normalize -> (3, H, W) float32."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"an image array must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        image = Image.fromarray(image)
    image = image.convert("RGB")
    short = int(cfg.get("size", {}).get("shortest_edge", 224))
    crop = cfg.get("crop_size", {"height": short, "width": short})
    ch, cw = int(crop["height"]), int(crop["width"])
    w, h = image.size
    if cfg.get("do_resize", True):
        if w <= h:
            nw, nh = short, int(short * h / w)
        else:
            nw, nh = int(short * w / h), short
        image = image.resize((nw, nh), resample=Image.Resampling(int(cfg.get("resample", 3))))
    x = np.asarray(image)  # (H, W, 3) uint8
    if cfg.get("do_center_crop", True):
        x = _center_crop(x, ch, cw)
    out = x.astype(np.float64) * float(cfg.get("rescale_factor", 1 / 255))
    out = out.astype(np.float32)
    if cfg.get("do_normalize", True):
        mean = np.asarray(cfg.get("image_mean", [0.5] * 3), np.float32)
        std = np.asarray(cfg.get("image_std", [0.5] * 3), np.float32)
        out = (out - mean) / std
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


def load_video_frames(path: str | Path, num_frames: int) -> list[Image.Image]:
    """Uniformly sampled RGB frames from a folder of images, an animated GIF/WebP, or an MP4 (imageio)."""
    p = _existing(path, "video")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"video folder '{p}' holds no image frames")
        return [load_image(files[i]) for i in sample_indices(len(files), num_frames)]
    if p.suffix.lower() in (".mp4", ".mov", ".mkv", ".avi", ".webm"):
        return _video_file_frames(p, num_frames)
    try:
        with Image.open(p) as im:
            frames = [f.convert("RGB") for f in ImageSequence.Iterator(im)]
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(
            f"'{p.name}' is not a readable video (a frame folder, GIF, or MP4) ({exc})"
        ) from None
    return [frames[i] for i in sample_indices(len(frames), num_frames)]


def _video_file_frames(p: Path, num_frames: int) -> list[Image.Image]:
    try:
        import imageio.v3 as iio
    except ImportError:
        raise InputError(
            f"reading '{p.suffix}' video needs imageio with an ffmpeg backend (`pip install imageio imageio-ffmpeg`); "
            "a folder of frames or a GIF works without it"
        ) from None
    try:
        frames = iio.imread(p)
    except Exception as exc:  # imageio raises backend-specific errors
        raise InputError(f"'{p.name}' is not a readable video ({exc})") from None
    return [Image.fromarray(frames[i]).convert("RGB") for i in sample_indices(len(frames), num_frames)]


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


def _riff_chunks(data: bytes) -> dict[bytes, bytes]:
    """The chunks of a RIFF/WAVE file by id (first of each); a last chunk cut short keeps what is there."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("no RIFF/WAVE header")
    chunks: dict[bytes, bytes] = {}
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        chunks.setdefault(cid, data[pos + 8 : pos + 8 + size])
        pos += 8 + size + (size & 1)  # chunks are word-aligned
    return chunks


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


def load_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples and the sample rate of a WAV file: 8/16/24/32-bit PCM scaled to [-1, 1),
    32/64-bit float as stored, either also inside WAVE_FORMAT_EXTENSIBLE."""
    p = _existing(path, "audio")
    try:
        chunks = _riff_chunks(p.read_bytes())
        if b"fmt " not in chunks or b"data" not in chunks:
            raise ValueError("no 'fmt ' or 'data' chunk")
        tag, ch, sr, bits = _wav_format(chunks[b"fmt "])
    except (ValueError, struct.error, OSError) as exc:
        raise InputError(f"'{p.name}' is not a readable PCM WAV file ({exc})") from None
    decode = _DECODERS.get((tag, bits))
    if decode is None:
        kind = {WAVE_PCM: "PCM", WAVE_FLOAT: "float"}.get(tag, f"format {tag}")
        raise InputError(
            f"'{p.name}' holds {bits}-bit {kind} samples; 8/16/24/32-bit PCM and 32/64-bit float are supported"
        )
    raw = chunks[b"data"]
    raw = raw[: len(raw) // (bits // 8 * ch) * (bits // 8 * ch)]  # whole frames only
    if not raw:
        raise InputError(f"'{p.name}' holds no audio samples")
    x = decode(raw).reshape(-1, ch).mean(axis=1)
    if not np.isfinite(x).all():
        raise InputError(f"'{p.name}' holds NaN or infinite samples")
    return x.astype(np.float32), sr


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited resampling through the spectrum (the signal is treated as periodic)."""
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


def audio_features(wave_: np.ndarray, sr: int, fe: dict[str, Any]) -> np.ndarray:
    """The audio encoder's input: (1, n_mels, num_frames) normalised log-mel, cropped or padded."""
    rate = int(fe["sample_rate"])
    x = resample(wave_, sr, rate)
    m = log_mel(x, rate, int(fe["n_fft"]), int(fe["hop_length"]), int(fe["n_mels"]))
    frames = int(fe["num_frames"])
    if m.shape[1] >= frames:
        m = m[:, :frames]
    else:
        m = np.pad(m, ((0, 0), (0, frames - m.shape[1])), constant_values=float(np.log(1e-10)))
    m = (m - float(fe.get("mean", 0.0))) / float(fe.get("std", 1.0))
    return m[None].astype(np.float32)


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
