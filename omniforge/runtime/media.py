"""Media front ends in numpy + Pillow + the stdlib: images, videos, WAV audio, log-mel features.

Each reproduces the preprocessing the encoders were exported with (CLIP image preprocessing,
an HTK log-mel spectrogram) and is checked against transformers' own implementations in the
tests. Writers (PNG, GIF, WAV) replace their target atomically.
"""

from __future__ import annotations

import io
import os
import tempfile
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from omniforge.errors import InputError

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
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"'{p.name}' is not a readable image ({exc})") from None


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


def load_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples in [-1, 1] and the sample rate of a PCM WAV file."""
    p = _existing(path, "audio")
    try:
        with wave.open(str(p), "rb") as w:
            sr, ch, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError, OSError) as exc:
        raise InputError(f"'{p.name}' is not a readable PCM WAV file ({exc})") from None
    if n == 0 or not raw:
        raise InputError(f"'{p.name}' holds no audio samples")
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / (1 << 23)
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / 2**31
    else:
        raise InputError(f"'{p.name}' uses {8 * width}-bit samples; 8, 16, 24 and 32-bit PCM are supported")
    usable = len(x) // ch * ch
    return x[:usable].reshape(-1, ch).mean(axis=1).astype(np.float32), sr


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
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
