"""ImageBind's input transforms (``imagebind/data.py``, as NExT-GPT calls them) in numpy + Pillow.

- image: Pillow bicubic resize of the short side to 224, torchvision's center crop, /255, CLIP
  mean/std, repeated to a 2-frame clip -> (3, 2, 224, 224);
- video: 5 clips of 2 s placed by pytorchvideo 0.1.5's ``ConstantClipsPerVideoSampler``, each clip's
  first and last frame, short side to 224 (torch's bilinear, no antialias), CLIP mean/std, 3 crops
  along the long side -> (15, 3, 2, 224, 224);
- audio: torchaudio's sinc resampling to 16 kHz, 3 clips of 2 s placed by the same sampler, Kaldi
  fbank (128 mel bins, Hann window, 25/10 ms, no dither, no energy) padded or cut to 204 frames,
  ``(x + 4.268) / 9.138`` -> (3, 1, 128, 204).

The encoders embed each clip; ImageBind averages a video's or an audio's clip embeddings.
Clip times are the same exact fractions, image and video arithmetic is float32 as in torch; the
resampler and fbank run in float64 (torchaudio's float32 rounding moves the weakest mel bins by up to
~4e-4 before normalisation). The tests check all of it against torch ports of the originals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
from PIL import Image

from omniforge.errors import ConfigError, InputError
from omniforge.runtime.media import (
    MAX_AUDIO_SAMPLES,
    MAX_PIXELS,
    _as_image,
    check_image_size,
    check_sample_rate,
)

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
SAMPLE_RATE = 16_000  # Hz: ImageBind's audio rate
AUDIO_MEAN, AUDIO_STD = -4.268, 9.138  # of ImageBind's fbank (AudioSet statistics)
MAX_CLIPS = 64  # clips per video or audio
MAX_RESAMPLE_TABLE = 1 << 24  # entries of the resampling kernel (phases x taps)
MAX_IMAGE_SIDE = 4096  # the ``size`` an image or a video is brought to


# ---- parameters ----------------------------------------------------------------------------------------
def _count(v: object, what: str, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= hi:
        raise ConfigError(f"{what} must be an integer in [1, {hi}], got {v!r}")
    return int(v)


def _positive(v: object, what: str) -> float:
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float, np.floating, np.integer))
        or not 0 < v < math.inf
    ):
        raise ConfigError(f"{what} must be a positive finite number, got {v!r}")
    return float(v)


# ---- image ---------------------------------------------------------------------------------------------
def _center_crop_offsets(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision's ``center_crop`` offsets: Python's ``round`` halves to even."""
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def _normalize(x: np.ndarray) -> np.ndarray:
    """(3, ...) in [0, 1] -> CLIP-normalised, in float32 like torchvision."""
    shape = (3,) + (1,) * (x.ndim - 1)
    return (x - CLIP_MEAN.reshape(shape)) / CLIP_STD.reshape(shape)


def image_clip(picture: Image.Image | np.ndarray, size: int = 224, frames: int = 2) -> np.ndarray:
    """ImageBind's image transform -> (3, frames, size, size) float32: an image is a clip of itself.

    ``picture``: a PIL image (converted to RGB) or an (H, W, 3) uint8 array."""
    size = _count(size, "the image size", MAX_IMAGE_SIDE)
    frames = _count(frames, "the frames per clip", 16)
    im = _as_image(picture).convert("RGB")
    w, h = im.size
    # torchvision's Resize(int): the short side to ``size``, the long side truncated
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if nw * nh > MAX_PIXELS:
        raise InputError(f"a {w}x{h} image resized to {nw}x{nh} would have more than {MAX_PIXELS} pixels")
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    x = np.asarray(im)  # (H, W, 3) uint8
    top, left = _center_crop_offsets(nh, nw, size)
    x = x[top : top + size, left : left + size].transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    x = _normalize(x)  # (3, S, S)
    return np.ascontiguousarray(np.repeat(x[:, None], frames, axis=1), dtype=np.float32)


# ---- clip placement ------------------------------------------------------------------------------------
def video_clip_starts(duration_s: float, clips: int = 5, clip_s: float = 2.0) -> list[Fraction]:
    """Start times of pytorchvideo 0.1.5's ``ConstantClipsPerVideoSampler`` (used for audio too):
    ``i * max(duration - clip_s, 0) / clips`` for ``i < clips``, in exact fractions as it computes.

    Later pytorchvideo versions divide by ``clips - 1``; ImageBind was trained and NExT-GPT run with
    0.1.5, whose last clip stops short of the end."""
    clips = _count(clips, "the number of clips", MAX_CLIPS)
    clip = Fraction(_positive(clip_s, "the clip length"))
    duration = float(duration_s)
    if not 0 <= duration < math.inf:
        raise InputError(f"a duration must be finite and non-negative, got {duration_s!r}")
    max_start = Fraction(max(duration - float(clip), 0))  # float - Fraction is a float there too
    step = max_start / clips
    return [step * i for i in range(clips)]


def video_frame_indices(
    num_frames: int, fps: float, clips: int = 5, clip_s: float = 2.0, frames_per_clip: int = 2
) -> np.ndarray:
    """(clips, frames_per_clip) indices of the decoded frames ImageBind uses, so that a caller can
    decode only those: pytorchvideo's decord clip ``[ceil(fps * start), min(ceil(fps * end), n))``,
    then ``UniformTemporalSubsample`` (for 2 frames: the clip's first and last).

    A video shorter than ``clip_s`` gives ``clips`` identical clips spanning the whole video."""
    n = _count(num_frames, "the number of video frames", 1 << 31)
    clips = _count(clips, "the number of clips", MAX_CLIPS)
    fps = _positive(fps, "the frame rate")
    k = _count(frames_per_clip, "the frames per clip", 64)
    clip = Fraction(_positive(clip_s, "the clip length"))
    out = np.empty((clips, k), np.int64)
    for c, start in enumerate(video_clip_starts(float(n) / fps, clips, clip_s)):
        first = math.ceil(fps * float(start))
        stop = min(math.ceil(fps * float(start + clip)), n)
        if stop <= first:
            raise InputError(f"a {clip_s} s clip at {float(start):.3f} s holds no frame of a {fps} fps video")
        out[c] = first + _uniform_subsample(stop - first, k)
    return out


def _uniform_subsample(t: int, k: int) -> np.ndarray:
    """``torch.linspace(0, t - 1, k).long()`` as torch computes it (float32, from both ends)."""
    if k == 1:
        return np.zeros(1, np.int64)
    step = np.float32((t - 1) / (k - 1))
    i = np.arange(k)
    half = k // 2
    lin = np.where(
        i < half,
        np.float32(0) + step * i.astype(np.float32),
        np.float32(t - 1) - step * (k - 1 - i).astype(np.float32),
    )
    return np.clip(lin, 0, t - 1).astype(np.int64)


# ---- video ---------------------------------------------------------------------------------------------
def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's bilinear source taps, ``align_corners=False``, no antialias, in float32 as on CPU."""
    scale = np.float32(n_in / n_out)
    src = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, i1, lam


def _resize_bilinear(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(..., H, W) float32 -> (..., out_h, out_w) like ``F.interpolate(mode="bilinear")``."""
    h0, h1, lh = _linear_taps(x.shape[-2], out_h)
    x = x[..., h0, :] * (1 - lh)[:, None] + x[..., h1, :] * lh[:, None]
    w0, w1, lw = _linear_taps(x.shape[-1], out_w)
    return (x[..., w0] * (1 - lw) + x[..., w1] * lw).astype(np.float32)


def _spatial_crops(clip: np.ndarray, size: int) -> list[np.ndarray]:
    """ImageBind's ``SpatialCrop(size, 3)``: start, centre, end of the long side (left/centre/right, or
    top/centre/bottom for a portrait video); a square clip gives three equal crops."""
    h, w = clip.shape[-2:]
    y, x = int(math.ceil((h - size) / 2)), int(math.ceil((w - size) / 2))
    crops = []
    for idx in range(3):
        top, left = y, x
        if h > w:
            top = {0: 0, 1: y, 2: h - size}[idx]
        else:
            left = {0: 0, 1: x, 2: w - size}[idx]
        crops.append(clip[..., top : top + size, left : left + size])
    return crops


def _frame(f: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(f, Image.Image):
        f = np.asarray(_as_image(f).convert("RGB"))
    if not isinstance(f, np.ndarray) or f.ndim != 3 or f.shape[2] != 3 or f.dtype != np.uint8:
        got = f"{f.shape} {f.dtype}" if isinstance(f, np.ndarray) else type(f).__name__
        raise InputError(f"a video frame must be an (H, W, 3) uint8 array or a PIL image, got {got}")
    check_image_size(f.shape[1], f.shape[0], "video frame")
    return f


def clips_from_frames(picked: Sequence[Sequence[np.ndarray | Image.Image]], size: int = 224) -> np.ndarray:
    """ImageBind's per-clip video transform of frames already picked by ``video_frame_indices``
    (one row of frames per clip) -> (clips * 3, 3, frames_per_clip, size, size) float32, clip-major
    (clip 0's three crops first): /255, pytorchvideo's ``ShortSideScale`` (torch's bilinear, no
    antialias), CLIP mean/std, ImageBind's ``SpatialCrop(size, 3)``."""
    size = _count(size, "the video size", MAX_IMAGE_SIDE)
    if not isinstance(picked, Sequence) or len(picked) == 0 or len(picked) > MAX_CLIPS:
        raise InputError(f"a video needs 1 to {MAX_CLIPS} clips of frames")
    out = []
    for row in picked:
        frames = [_frame(f) for f in row]
        if not frames or len({f.shape for f in frames}) != 1:
            raise InputError(f"a clip needs frames of one size, got {sorted({f.shape for f in frames})}")
        clip = np.stack(frames).astype(np.float32).transpose(3, 0, 1, 2) / np.float32(255)  # (3, T, H, W)
        h, w = clip.shape[-2:]
        if w < h:  # pytorchvideo's ShortSideScale
            nh, nw = int(math.floor(float(h) / w * size)), size
        else:
            nh, nw = size, int(math.floor(float(w) / h * size))
        if nh * nw > MAX_PIXELS:
            raise InputError(f"a {w}x{h} video resized to {nw}x{nh} would have more than {MAX_PIXELS} pixels")
        clip = _normalize(_resize_bilinear(clip, nh, nw))
        out.extend(_spatial_crops(clip, size))
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


def video_clips(
    frames: Sequence[np.ndarray | Image.Image] | np.ndarray,
    fps: float,
    size: int = 224,
    clips: int = 5,
    clip_s: float = 2.0,
    frames_per_clip: int = 2,
) -> np.ndarray:
    """ImageBind's video transform over all decoded RGB frames (a sequence of (H, W, 3) uint8 frames or
    PIL images, or an (N, H, W, 3) uint8 array) at ``fps`` -> (clips * 3, 3, frames_per_clip, size,
    size) float32: ``video_frame_indices`` then ``clips_from_frames``.

    Only the frames ``video_frame_indices`` names are read from ``frames``; a lazy sequence works.
    A video shorter than ``clip_s`` gives ``clips`` identical clips of its first and last frames."""
    if isinstance(frames, np.ndarray) and frames.ndim != 4:
        raise InputError(f"a video array must be (N, H, W, 3) uint8, got shape {frames.shape}")
    if not isinstance(frames, (Sequence, np.ndarray)) or len(frames) == 0:
        raise InputError("a video needs a non-empty sequence of frames")
    idx = video_frame_indices(len(frames), fps, clips, clip_s, frames_per_clip)
    return clips_from_frames([[frames[int(i)] for i in row] for row in idx], size)


# ---- audio ---------------------------------------------------------------------------------------------
def resample_sinc(samples: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """torchaudio's ``functional.resample`` with its defaults (Hann-windowed sinc, 6 zero crossings,
    rolloff 0.99) -> float32; what ImageBind applies to audio that is not at 16 kHz. The kernel is
    evaluated in float64 (torchaudio's is in the waveform's float32)."""
    sr_in = check_sample_rate(sr_in, "the input sample rate")
    sr_out = check_sample_rate(sr_out, "the output sample rate")
    x = np.asarray(samples, np.float64)
    if sr_in == sr_out:
        return x.astype(np.float32)
    g = math.gcd(sr_in, sr_out)
    orig, new = sr_in // g, sr_out // g
    lowpass_width, base = 6, min(orig, new) * 0.99
    width = math.ceil(lowpass_width * orig / base)
    taps = 2 * width + orig
    if new * taps > MAX_RESAMPLE_TABLE:
        raise InputError(
            f"resampling {sr_in} Hz to {sr_out} Hz needs a {new}x{taps} sinc table; "
            f"convert the audio to a common rate (e.g. 48000 or 44100 Hz) first"
        )
    t = (np.arange(0, -new, -1)[:, None] / new + np.arange(-width, width + orig)[None, :] / orig) * base
    t = np.clip(t, -lowpass_width, lowpass_width)
    window = np.cos(t * np.pi / lowpass_width / 2) ** 2
    t = t * np.pi
    safe = np.where(t == 0, 1.0, t)
    kernel = np.where(t == 0, 1.0, np.sin(safe) / safe) * window * (base / orig)  # (new, taps)
    padded = np.pad(x, (width, width + orig))
    frames = np.lib.stride_tricks.sliding_window_view(padded, taps)[::orig]  # (len // orig + 1, taps)
    out = (frames @ kernel.T).reshape(-1)
    # torchaudio takes the ceiling of a float32 tensor of new * length / orig
    target = int(np.ceil(np.float32(new * len(x) / orig)))
    return out[:target].astype(np.float32)


def kaldi_fbank(samples: np.ndarray, sample_rate: int = SAMPLE_RATE, n_mels: int = 128) -> np.ndarray:
    """(frames, n_mels) float32 log mel energies as ``torchaudio.compliance.kaldi.fbank`` computes them
    with ImageBind's arguments: 25 ms frames every 10 ms, edges snipped, per-frame DC removal,
    pre-emphasis 0.97, symmetric Hann window, FFT padded to a power of two, power spectrum, HTK-mel
    triangles from 20 Hz to Nyquist, log floored at float32's epsilon, no energy, no dither."""
    n_mels = _count(n_mels, "the number of mel bins", 1024)
    sample_rate = check_sample_rate(sample_rate, "the fbank's sample rate")
    if n_mels <= 3:
        raise ConfigError(f"Kaldi fbank needs more than 3 mel bins, got {n_mels}")
    x = np.asarray(samples, np.float64)
    shift = int(sample_rate * 10.0 * 0.001)
    size = int(sample_rate * 25.0 * 0.001)
    n_fft = 2 ** (size - 1).bit_length()
    if len(x) < size:
        raise InputError(f"a clip needs at least one 25 ms frame ({size} samples), it has {len(x)}")
    m = 1 + (len(x) - size) // shift
    frames = np.lib.stride_tricks.sliding_window_view(x, size)[::shift][:m]  # (m, size)
    frames = frames - frames.mean(axis=1, keepdims=True)
    frames = frames - 0.97 * np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = frames * (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(size) / (size - 1)))
    power = np.abs(np.fft.rfft(frames, n=n_fft, axis=1)) ** 2  # (m, n_fft // 2 + 1)
    mel = power[:, : n_fft // 2] @ _kaldi_mel_banks(n_mels, n_fft, sample_rate).T  # Nyquist bin weight 0
    return np.log(np.maximum(mel, np.finfo(np.float32).eps)).astype(np.float32)


def _kaldi_mel_banks(n_mels: int, n_fft: int, sample_rate: int) -> np.ndarray:
    """(n_mels, n_fft // 2) triangles on Kaldi's mel scale ``1127 ln(1 + f / 700)``, 20 Hz to Nyquist,
    computed in float32 in torchaudio's order (its ``get_mel_banks`` builds them in float32)."""
    f32 = np.float32
    lo, hi = 1127.0 * math.log(1.0 + 20.0 / 700.0), 1127.0 * math.log(1.0 + 0.5 * sample_rate / 700.0)
    delta = (hi - lo) / (n_mels + 1)
    b = np.arange(n_mels, dtype=f32)[:, None]
    left = f32(lo) + b * f32(delta)
    center = f32(lo) + (b + f32(1.0)) * f32(delta)
    right = f32(lo) + (b + f32(2.0)) * f32(delta)
    freq = f32(sample_rate / n_fft) * np.arange(n_fft // 2, dtype=f32)
    mel = (f32(1127.0) * np.log(f32(1.0) + freq / f32(700.0)))[None, :]
    up, down = (mel - left) / (center - left), (right - mel) / (right - center)
    return np.maximum(f32(0), np.minimum(up, down)).astype(np.float64)


def audio_clips(
    samples: np.ndarray,
    sample_rate: int,
    clips: int = 3,
    clip_s: float = 2.0,
    n_mels: int = 128,
    target_frames: int = 204,
    mean: float = AUDIO_MEAN,
    std: float = AUDIO_STD,
) -> np.ndarray:
    """ImageBind's audio transform of mono float samples -> (clips, 1, n_mels, target_frames) float32.

    ImageBind reads the first channel of a multi-channel file: pass that one. Clips are cut at
    ``int(t * 16000)`` of the sampler's exact start and end times; an audio shorter than a clip gives
    ``clips`` copies of the whole audio, its fbank padded with zeros before normalisation.
    Faithful to ImageBind's ``waveform -= waveform.mean()`` on views of one waveform: each clip's
    mean is subtracted in place from the shared samples before the next clip is cut, so a clip that
    overlaps an earlier one sees that clip's shift (a step that only frames across it feel)."""
    clips = _count(clips, "the number of clips", MAX_CLIPS)
    sample_rate = check_sample_rate(sample_rate, "the audio's sample rate")
    n_mels = _count(n_mels, "the number of mel bins", 1024)
    target_frames = _count(target_frames, "the number of fbank frames", 100_000)
    std = float(std)
    if not (math.isfinite(float(mean)) and math.isfinite(std) and std != 0):
        raise ConfigError(
            f"the fbank mean and std must be finite and the std non-zero, got {mean!r}, {std!r}"
        )
    if not isinstance(samples, np.ndarray) or samples.ndim != 1 or samples.dtype.kind != "f":
        got = (
            f"{samples.shape} {samples.dtype}" if isinstance(samples, np.ndarray) else type(samples).__name__
        )
        raise InputError(f"audio samples must be a one-dimensional float array, got {got}")
    if samples.size == 0:
        raise InputError("the audio has no samples")
    if samples.size > MAX_AUDIO_SAMPLES or samples.size * SAMPLE_RATE > MAX_AUDIO_SAMPLES * sample_rate:
        raise InputError(f"the audio is longer than {MAX_AUDIO_SAMPLES} samples at {SAMPLE_RATE} Hz")
    if not np.isfinite(samples).all():
        raise InputError("the audio holds NaN or infinite samples")
    wave = resample_sinc(samples.astype(np.float32), sample_rate, SAMPLE_RATE)  # float32, like torchaudio's
    clip = Fraction(_positive(clip_s, "the clip length"))
    out = np.empty((clips, 1, n_mels, target_frames), np.float32)
    for c, start in enumerate(video_clip_starts(len(wave) / SAMPLE_RATE, clips, clip_s)):
        view = wave[int(start * SAMPLE_RATE) : int((start + clip) * SAMPLE_RATE)]
        view -= view.mean(dtype=np.float32)  # in place on ``wave``, as ImageBind's
        fb = kaldi_fbank(view, SAMPLE_RATE, n_mels).T[:, :target_frames]  # (n_mels, <= target_frames)
        fb = np.pad(fb, ((0, 0), (0, target_frames - fb.shape[1])))
        out[c, 0] = (fb - np.float32(mean)) / np.float32(std)
    return out
