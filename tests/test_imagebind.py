"""ImageBind as omniforge encoders: the numpy front ends against torch ports of ImageBind's transforms,
the imported stages against an independent functional reference, config inference and refusals,
and ONNX export with a dynamic batch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from omniforge.errors import ConfigError, InputError, ModelNotFoundError
from omniforge.model.imagebind import (
    IMAGEBIND_HUGE,
    ImageBindAudio,
    ImageBindConfig,
    ImageBindVision,
    config_from_state,
    encoder_state,
    load_imagebind,
    save_imagebind,
)
from omniforge.runtime import imagebind_media as ibm
from tests.release_format.imagebind import (
    imagebind_state,
    make_imagebind_pth,
    reference_audio,
    reference_vision,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VISION_HEADS, AUDIO_HEADS = 4, 3  # the fabricated checkpoint's widths are 32 and 24


# ---- torch ports of ImageBind's transforms (imagebind/data.py, torchvision, pytorchvideo 0.1.5, torchaudio)
def torch_image(im: Image.Image, size: int = 224) -> torch.Tensor:
    """Resize(size, BICUBIC) on a PIL image (torchvision hands it to Pillow), CenterCrop, ToTensor,
    Normalize, then PadIm2Video(repeat, 2)."""
    im = im.convert("RGB")
    w, h = im.size
    short, long = min(w, h), max(w, h)
    new_short, new_long = size, int(size * long / short)
    nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BICUBIC)
    x = torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous().float().div(255)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    x = x[:, top : top + size, left : left + size]
    x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    return x.unsqueeze(1).repeat(1, 2, 1, 1)


class ConstantClipsPerVideoSampler:
    """pytorchvideo 0.1.5's sampler, as ImageBind drives it through ``get_clip_timepoints``."""

    def __init__(self, clip_duration: float, clips_per_video: int) -> None:
        self._clip_duration = Fraction(clip_duration)
        self._clips_per_video = clips_per_video
        self._current_clip_index = 0

    def __call__(self, last_clip_time, video_duration):
        max_possible_clip_start = Fraction(max(video_duration - self._clip_duration, 0))
        uniform_clip = Fraction(max_possible_clip_start, self._clips_per_video)
        clip_start_sec = uniform_clip * self._current_clip_index
        self._current_clip_index += 1
        is_last_clip = False
        if (
            self._current_clip_index >= self._clips_per_video
            or uniform_clip * self._current_clip_index > max_possible_clip_start
        ):
            self._current_clip_index = 0
            is_last_clip = True
        return clip_start_sec, clip_start_sec + self._clip_duration, is_last_clip


def get_clip_timepoints(sampler: ConstantClipsPerVideoSampler, duration: float) -> list:
    points, is_last, end = [], False, 0.0
    while not is_last:
        start, end, is_last = sampler(end, duration)
        points.append((start, end))
    return points


def uniform_crop(images: torch.Tensor, size: int, spatial_idx: int) -> torch.Tensor:
    height, width = images.shape[2], images.shape[3]
    y_offset = int(math.ceil((height - size) / 2))
    x_offset = int(math.ceil((width - size) / 2))
    if height > width:
        y_offset = {0: 0, 1: y_offset, 2: height - size}[spatial_idx]
    else:
        x_offset = {0: 0, 1: x_offset, 2: width - size}[spatial_idx]
    return images[:, :, y_offset : y_offset + size, x_offset : x_offset + size]


def torch_video(frames: np.ndarray, fps: float, size: int = 224) -> torch.Tensor:
    """``load_and_transform_video_data`` with decord's frames already decoded: (N, H, W, 3) uint8."""
    n = len(frames)
    duration = float(n) / float(fps)  # EncodedVideoDecord.duration
    out = []
    for start, end in get_clip_timepoints(ConstantClipsPerVideoSampler(2, 5), duration):
        start_idx, end_idx = math.ceil(fps * start), min(math.ceil(fps * end), n)  # get_clip
        video = torch.from_numpy(frames[start_idx:end_idx]).float().permute(3, 0, 1, 2)  # (C, T, H, W)
        t = video.shape[1]
        idx = torch.clamp(torch.linspace(0, t - 1, 2), 0, t - 1).long()  # UniformTemporalSubsample(2)
        clip = torch.index_select(video, 1, idx) / 255.0
        c, t, h, w = clip.shape  # ShortSideScale(224)
        if w < h:
            new_h, new_w = int(math.floor((float(h) / w) * size)), size
        else:
            new_h, new_w = size, int(math.floor((float(w) / h) * size))
        clip = F.interpolate(clip, size=(new_h, new_w), mode="bilinear", align_corners=False)
        clip = (clip - torch.tensor(CLIP_MEAN)[:, None, None, None]) / torch.tensor(CLIP_STD)[
            :, None, None, None
        ]
        out.extend(uniform_crop(clip, size, i) for i in range(3))  # SpatialCrop(224, 3)
    return torch.stack(out)


def torch_resample(waveform: torch.Tensor, orig_freq: int, new_freq: int) -> torch.Tensor:
    """torchaudio.functional.resample with its defaults (sinc_interp_hann, width 6, rolloff 0.99)."""
    if orig_freq == new_freq:
        return waveform
    gcd = math.gcd(orig_freq, new_freq)
    orig, new = orig_freq // gcd, new_freq // gcd
    base = min(orig, new) * 0.99
    width = math.ceil(6 * orig / base)
    idx = torch.arange(-width, width + orig, dtype=waveform.dtype)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=waveform.dtype)[:, None, None] / new + idx
    t *= base
    t = t.clamp_(-6, 6)
    window = torch.cos(t * math.pi / 6 / 2) ** 2
    t *= math.pi
    kernels = torch.where(t == 0, torch.tensor(1.0), t.sin() / t) * window * (base / orig)
    length = waveform.shape[-1]
    x = F.pad(waveform, (width, width + orig))
    out = F.conv1d(x[:, None], kernels, stride=orig).transpose(1, 2).reshape(waveform.shape[0], -1)
    return out[..., : torch.ceil(torch.as_tensor(new * length / orig)).long()]


def torch_fbank(waveform: torch.Tensor, sample_frequency: float, num_mel_bins: int) -> torch.Tensor:
    """torchaudio.compliance.kaldi.fbank(waveform, htk_compat=True, use_energy=False,
    window_type="hanning", dither=0.0, frame_length=25, frame_shift=10) and the other defaults."""
    w = waveform[0]
    shift = int(sample_frequency * 10 * 0.001)
    size = int(sample_frequency * 25 * 0.001)
    padded = 2 ** (size - 1).bit_length()
    m = 1 + (w.shape[0] - size) // shift
    x = w.as_strided((m, size), (shift * w.stride(0), w.stride(0)))
    x = x - x.mean(dim=1, keepdim=True)
    prev = F.pad(x.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)
    x = x - 0.97 * prev[:, :-1]
    x = x * torch.hann_window(size, periodic=False, dtype=x.dtype)
    x = F.pad(x, (0, padded - size))
    spectrum = torch.fft.rfft(x).abs().pow(2.0)
    # get_mel_banks(num_mel_bins, padded, sample_frequency, low_freq=20, high_freq=0 -> Nyquist)
    mel_lo, mel_hi = 1127.0 * math.log(1 + 20 / 700), 1127.0 * math.log(1 + 0.5 * sample_frequency / 700)
    delta = (mel_hi - mel_lo) / (num_mel_bins + 1)
    b = torch.arange(num_mel_bins).unsqueeze(1)
    left, center, right = mel_lo + b * delta, mel_lo + (b + 1.0) * delta, mel_lo + (b + 2.0) * delta
    mel = 1127.0 * (1.0 + sample_frequency / padded * torch.arange(padded / 2) / 700.0).log().unsqueeze(0)
    banks = torch.max(
        torch.zeros(1), torch.min((mel - left) / (center - left), (right - mel) / (right - center))
    )
    banks = F.pad(banks, (0, 1)).to(x.dtype)
    eps = torch.tensor(torch.finfo(torch.float).eps, dtype=x.dtype)
    return torch.max(torch.mm(spectrum, banks.T), eps).log()


def torch_audio(samples: np.ndarray, sr: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``load_and_transform_audio_data`` after torchaudio.load: (3, 1, 128, 204); in float32 as
    ImageBind runs it, or in float64 to compare algorithms without float32's rounding noise."""
    waveform = torch.from_numpy(samples.astype(np.float32)).to(dtype)[None]  # (1, n)
    if sr != 16000:
        waveform = torch_resample(waveform, sr, 16000)
    out = []
    for start, end in get_clip_timepoints(ConstantClipsPerVideoSampler(2, 3), waveform.size(1) / 16000):
        clip = waveform[:, int(start * 16000) : int(end * 16000)]  # a view: the next line writes through
        clip -= clip.mean()
        fbank = torch_fbank(clip, 16000, 128).transpose(0, 1)
        p = 204 - fbank.size(1)
        fbank = F.pad(fbank, (0, p)) if p > 0 else fbank[:, :204]
        out.append(((fbank - (-4.268)) / 9.138).unsqueeze(0))  # Normalize(mean, std) on (1, 128, 204)
    return torch.stack(out)


# ---- (a) front ends ----------------------------------------------------------------------------------------
def _picture(w: int, h: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    return np.clip(smooth + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "w,h", [(203, 200), (150, 333), (640, 480), (224, 224), (50, 40)]
)  # 203x200 resizes to 227x224: the crop offset 1.5 rounds to 2, not 1
def test_image_clip_matches_torchvision_port(w, h):
    arr = _picture(w, h, w)
    got = ibm.image_clip(Image.fromarray(arr))
    assert got.shape == (3, 2, 224, 224) and got.dtype == np.float32
    np.testing.assert_allclose(got, torch_image(Image.fromarray(arr)).numpy(), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(ibm.image_clip(arr), got)  # an array is the same picture
    assert np.array_equal(got[:, 0], got[:, 1])


def test_image_clip_converts_to_rgb_and_refuses_bad_input():
    rgba = Image.fromarray(_picture(60, 90, 1)).convert("RGBA")
    np.testing.assert_allclose(ibm.image_clip(rgba), torch_image(rgba).numpy(), atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="uint8"):
        ibm.image_clip(np.zeros((10, 10), np.uint8))
    with pytest.raises(InputError, match="PIL image"):
        ibm.image_clip("picture.png")


def _video(n: int, w: int, h: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = _picture(w, h, seed).astype(np.int16)
    shift = rng.integers(-40, 40, (n, 1, 1, 3))
    return np.clip(base[None] + shift + np.arange(n)[:, None, None, None] * 3, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "n,fps,w,h",
    [(31, 10.0, 320, 240), (75, 29.97, 180, 260), (9, 8.0, 240, 240), (1, 25.0, 256, 300)],
)  # landscape, portrait at a fractional rate, square shorter than a clip, a single frame
def test_video_clips_match_imagebind_port(n, fps, w, h):
    frames = _video(n, w, h, n)
    got = ibm.video_clips(list(frames), fps)
    assert got.shape == (15, 3, 2, 224, 224) and got.dtype == np.float32
    np.testing.assert_allclose(
        got, torch_video(frames, fps).numpy(), atol=1e-4, rtol=0
    )  # 1-ulp tap positions
    np.testing.assert_array_equal(ibm.video_clips(frames, fps), got)  # an (N, H, W, 3) array too
    picked = [[frames[i] for i in row] for row in ibm.video_frame_indices(n, fps)]  # decode only these
    np.testing.assert_array_equal(ibm.clips_from_frames(picked), got)


def test_clip_placement_is_pytorchvideo_0_1_5():
    sampler = ConstantClipsPerVideoSampler(2, 5)
    for duration in (0.5, 2.0, 3.1, 10.0, 97.3):
        want = [s for s, _ in get_clip_timepoints(sampler, duration)]
        assert ibm.video_clip_starts(duration) == want
    assert ibm.video_clip_starts(12.0) == [0, 2, 4, 6, 8]  # 0.1.5 divides by N: the last clip ends at 10 s
    idx = ibm.video_frame_indices(120, 10.0)  # 12 s at 10 fps
    np.testing.assert_array_equal(idx, [[0, 19], [20, 39], [40, 59], [60, 79], [80, 99]])
    np.testing.assert_array_equal(ibm.video_frame_indices(7, 10.0), [[0, 6]] * 5)  # shorter than a clip


def test_video_refusals():
    with pytest.raises(InputError, match="non-empty"):
        ibm.video_clips([], 10.0)
    with pytest.raises(ConfigError, match="frame rate"):
        ibm.video_clips(list(_video(3, 32, 32, 0)), float("nan"))
    with pytest.raises(InputError, match="uint8"):
        ibm.video_clips([np.zeros((32, 32, 3), np.float32)] * 3, 10.0)
    with pytest.raises(InputError, match="one size"):
        ibm.clips_from_frames([[np.zeros((32, 32, 3), np.uint8), np.zeros((32, 40, 3), np.uint8)]])
    with pytest.raises(InputError, match="holds no frame"):
        ibm.video_frame_indices(2, 0.25)  # 8 s at 0.25 fps: a 2 s clip at 1.2 s spans no frame


def _sound(seconds: float, sr: int, seed: int) -> np.ndarray:
    """Tones, white noise, a random walk (energy in the lowest mel bins too) and a DC offset."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    tones = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3150 * t * (1 + 0.1 * t))
    walk = np.cumsum(rng.standard_normal(t.shape)) * 8 / sr
    return (tones + 0.05 * rng.standard_normal(t.shape) + walk + 0.1).astype(np.float32)


@pytest.mark.parametrize("sr", [44100, 22050, 8000])
def test_resample_matches_torchaudio_port(sr):
    x = _sound(0.7, sr, 0)
    got = ibm.resample_sinc(x, sr, 16000)
    want = torch_resample(torch.from_numpy(x)[None], sr, 16000)[0].numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # torchaudio rounds the output length through float32: 160 * 4411 / 441 = 1600.36 -> 1601 samples
    assert len(ibm.resample_sinc(np.zeros(4411, np.float32), 44100, 16000)) == 1601


def test_kaldi_fbank_matches_torchaudio_port():
    x = _sound(1.0, 16000, 1)
    got = ibm.kaldi_fbank(x)
    # ImageBind runs torchaudio in float32, whose FFT rounding moves the log of the weakest mel bins
    # by up to ~4e-4; in float64 the same algorithm is within the float32 mel banks' rounding
    for dtype, atol in ((torch.float32, 1e-3), (torch.float64, 1e-4)):
        want = torch_fbank(torch.from_numpy(x).to(dtype)[None], 16000, 128).numpy()
        assert got.shape == want.shape == (98, 128)
        np.testing.assert_allclose(got, want, atol=atol, rtol=0)


@pytest.mark.parametrize(
    "seconds,sr", [(5.0, 16000), (3.3, 44100), (0.5, 22050), (12.0, 48000)]
)  # overlapping clips; resampled; shorter than a clip (padded); far apart clips
def test_audio_clips_match_imagebind_port(seconds, sr):
    x = _sound(seconds, sr, int(seconds * 10))
    got = ibm.audio_clips(x, sr)
    assert got.shape == (3, 1, 128, 204) and got.dtype == np.float32
    np.testing.assert_allclose(got, torch_audio(x, sr, torch.float64).numpy(), atol=1e-4, rtol=0)
    # as ImageBind runs it, in float32: its FFT rounding alone moves the weakest bins by up to ~4e-4
    np.testing.assert_allclose(got, torch_audio(x, sr).numpy(), atol=1e-3, rtol=0)


def test_audio_keeps_imagebinds_in_place_mean_shift():
    """Overlapping clips share samples that the earlier clips shifted; the caller's array is untouched."""
    x = _sound(4.0, 16000, 3) + np.linspace(0, 1, 64000, dtype=np.float32)  # a drifting offset
    before = x.copy()
    got = ibm.audio_clips(x, 16000)
    np.testing.assert_array_equal(x, before)
    independent = []
    for start in ibm.video_clip_starts(4.0, 3):
        s = int(start * 16000)
        clip = x[s : s + 32000] - x[s : s + 32000].mean()
        fb = np.pad(ibm.kaldi_fbank(clip).T, ((0, 0), (0, 6)))
        independent.append((fb + 4.268) / 9.138)
    diff = np.abs(got[:, 0] - np.stack(independent))
    assert diff[0].max() < 1e-5  # the first clip sees no earlier shift
    assert diff[1:].max() > 1e-3  # later ones do, in the frames across the step


def test_audio_refusals():
    with pytest.raises(InputError, match="no samples"):
        ibm.audio_clips(np.zeros(0, np.float32), 16000)
    with pytest.raises(InputError, match="one-dimensional"):
        ibm.audio_clips(np.zeros((2, 16000), np.float32), 16000)
    with pytest.raises(InputError, match="NaN"):
        ibm.audio_clips(np.array([0.0, np.inf] * 400, np.float32), 16000)
    with pytest.raises(InputError, match="25 ms"):
        ibm.audio_clips(np.zeros(300, np.float32), 16000)
    with pytest.raises(InputError, match="Hz"):
        ibm.audio_clips(np.zeros(16000, np.float32), 0)
    with pytest.raises(InputError, match="sinc table"):
        ibm.audio_clips(np.zeros(44101, np.float32), 44101)


def test_front_ends_import_without_torch():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch': raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import numpy as np\n"
        "from omniforge.runtime import imagebind_media as m\n"
        "print(m.audio_clips(np.ones(20000, np.float32), 16000).shape)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "(3, 1, 128, 204)" in res.stdout


# ---- (b) the stages from a fabricated imagebind_huge.pth ----------------------------------------------------
@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagebind")
    make_imagebind_pth(root / "imagebind_huge.pth")
    state = torch.load(root / "imagebind_huge.pth", map_location="cpu", weights_only=True)
    cfg = config_from_state(state, VISION_HEADS, AUDIO_HEADS)
    save_imagebind(state, cfg, root / "imagebind")
    return state, cfg, root / "imagebind"


def test_stages_match_the_independent_reference(release):
    state, _, folder = release
    vision, audio = load_imagebind(folder, "image"), load_imagebind(folder, "audio")
    assert not vision.training and not audio.training
    g = torch.Generator().manual_seed(1)
    clips, fbank = torch.randn(3, 3, 2, 224, 224, generator=g), torch.randn(2, 1, 128, 204, generator=g)
    with torch.no_grad():
        v, a = vision(clips), audio(fbank)
        torch.testing.assert_close(v, reference_vision(state, clips, VISION_HEADS), atol=1e-5, rtol=0)
        torch.testing.assert_close(a, reference_audio(state, fbank, AUDIO_HEADS), atol=1e-5, rtol=0)
        # an image given as (B, 3, H, W) is the clip of it repeated
        torch.testing.assert_close(vision(clips[:, :, 0]), vision(clips[:, :, :1].repeat(1, 1, 2, 1, 1)))
    assert v.shape == (3, 16) and a.shape == (2, 16)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(2))  # no x20 logit scale


def test_saved_folder_holds_only_the_encoders(release):
    from safetensors import safe_open

    state, cfg, folder = release
    raw = json.loads((folder / "config.json").read_text())
    assert raw["model_type"] == "imagebind" and raw["vision_width"] == 32 and raw["audio_stem_eps"] == 1e-5
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(encoder_state(state))
    assert "modality_preprocessors.vision.rgbt_stem.proj.1.weight" in keys
    assert "modality_trunks.audio.blocks.1.attn.bias_k" in keys
    assert not any(k.split(".")[1] in {"text", "depth", "thermal", "imu"} for k in keys)
    assert not any(k.startswith("modality_postprocessors") for k in keys)


# ---- (c) config inference and refusals ----------------------------------------------------------------------
def test_config_is_read_from_shapes(release):
    _, cfg, _ = release
    assert cfg == ImageBindConfig(
        vision_width=32,
        vision_layers=2,
        vision_heads=4,
        audio_width=24,
        audio_layers=2,
        audio_heads=3,
        embed_dim=16,
    )
    assert (cfg.vision_positions, cfg.audio_grid, cfg.audio_positions) == (257, (12, 19), 229)


def test_huge_widths_give_imagebind_huge():
    state = imagebind_state(
        vision_width=1280, vision_layers=1, audio_width=768, audio_layers=1, embed_dim=1024
    )
    assert config_from_state(state) == replace(IMAGEBIND_HUGE, vision_layers=1, audio_layers=1)


def _without(state: dict, key: str) -> dict:
    return {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda s: {"model.embed_tokens.weight": torch.zeros(4, 4)}, "not an ImageBind state dict"),
        (
            lambda s: _without(s, "modality_trunks.audio.blocks.1.attn.bias_v"),
            "lacks 'modality_trunks.audio.blocks.1",
        ),
        (
            lambda s: _without(s, "modality_trunks.vision.pre_transformer_layer.0.bias"),
            "pre_transformer_layer",
        ),
        (
            lambda s: {
                **s,
                "modality_preprocessors.vision.pos_embedding_helper.pos_embed": torch.zeros(1, 200, 32),
            },
            "square grid",
        ),
        (
            lambda s: {
                **s,
                "modality_preprocessors.audio.pos_embedding_helper.pos_embed": torch.zeros(1, 230, 24),
            },
            "pos_embed",
        ),
        (
            lambda s: {**s, "modality_heads.audio.2.weight": torch.zeros(8, 24)},
            "modality_heads.audio.2.weight",
        ),
        (
            lambda s: {**s, "modality_trunks.vision.blocks.0.layer_scale_gamma1": torch.ones(1, 1, 32)},
            "layer_scale",
        ),
        (
            lambda s: {**s, "modality_preprocessors.audio.rgbt_stem.proj.weight": torch.zeros(24, 1, 16, 8)},
            "audio stem",
        ),
    ],
)
def test_state_that_is_not_imagebind_is_refused(release, edit, match):
    state, _, _ = release
    with pytest.raises(ConfigError, match=match) as err:
        config_from_state(edit(state), VISION_HEADS, AUDIO_HEADS)
    assert str(err.value).count(". ") == 0  # one sentence


def test_heads_must_divide_widths(release):
    state, _, _ = release
    with pytest.raises(ConfigError, match="not divisible by its 5 heads"):
        config_from_state(state, vision_heads=5, audio_heads=AUDIO_HEADS)
    with pytest.raises(ConfigError, match="positive integer"):
        config_from_state(state, vision_heads=0)


def test_folders_that_are_not_imagebind_are_refused(release, tmp_path):
    state, cfg, folder = release
    with pytest.raises(ModelNotFoundError, match="not an ImageBind folder"):
        load_imagebind(tmp_path, "image")
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(ConfigError, match="does not describe ImageBind"):
        load_imagebind(tmp_path, "image")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "imagebind", "vision_width": 32}))
    with pytest.raises(ConfigError, match="not a complete ImageBind config"):
        load_imagebind(tmp_path, "audio")
    raw = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "audio_layers": 3}))
    with pytest.raises(ConfigError, match="lacks 'modality_trunks.audio.blocks.2"):
        load_imagebind(tmp_path, "audio")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        load_imagebind(tmp_path, "audio")
    with pytest.raises(ConfigError, match="'image' and 'audio'"):
        load_imagebind(folder, "depth")
    with pytest.raises(ConfigError, match="lacks"):
        save_imagebind(_without(state, "modality_heads.vision.2.weight"), cfg, tmp_path / "out")


# ---- (d) ONNX ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("modality", ["image", "audio"])
def test_stages_export_to_onnx_with_a_dynamic_batch(release, tmp_path, modality):
    import onnxruntime as ort

    _, _, folder = release
    module = load_imagebind(folder, modality)
    shape = (3, 2, 224, 224) if modality == "image" else (1, 128, 204)
    g = torch.Generator().manual_seed(2)
    path = tmp_path / f"{modality}.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.randn(2, *shape, generator=g),),
            str(path),
            input_names=["x"],
            output_names=["embedding"],
            dynamic_axes={"x": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=17,
            do_constant_folding=True,
            dynamo=False,
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, *shape, generator=g)
        with torch.no_grad():
            want = module(x).numpy()
        (got,) = session.run(None, {"x": x.numpy()})
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_modules_are_named_like_imagebind():
    """A fixed prefix mapping covers every tensor: the modules' names are ImageBind's below the prefix."""
    cfg = replace(IMAGEBIND_HUGE, vision_layers=1, audio_layers=1)
    with torch.device("meta"):
        v, a = ImageBindVision(cfg), ImageBindAudio(cfg)
    names = set(v.state_dict()) | {"audio:" + k for k in a.state_dict()}
    assert "preprocessor.rgbt_stem.proj.1.weight" in names
    assert "audio:preprocessor.rgbt_stem.norm_layer.weight" in names
    assert "audio:trunk.blocks.0.attn.bias_k" in names
    assert "trunk.pre_transformer_layer.0.weight" in names and "head.2.weight" in names
    assert not any("pre_transformer_layer" in n for n in names if n.startswith("audio:"))
