# ruff: noqa: F811  (the native fixtures are imported from tests/test_native.py by name)
"""The native core's image front ends (``src/image_frontend.cpp``, through ``omniforge_frontend``,
which compiles it alone) against the Python runtime's: Pillow's resize with every filter, upscaling
and downscaling in either direction and both pass orders, byte for byte; CLIP's preprocessing with
its options (no resize, no crop, padding, no rescale, other filters), BLIP's exact-size resize and
ImageBind's image clip and video clips, value for value; and config refusals in the Python
runtime's words."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_native import (  # noqa: F401  (fixtures)
    _run,
    native_build,
    native_cache,
    ort_headers,
)

CLIP = {
    "size": {"shortest_edge": 32},
    "crop_size": {"height": 32, "width": 32},
    "resample": 3,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def picture(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Gradients and noise: every filter's negative lobes and clipping are exercised."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 7 + y * 3) % 256, (x * x + y) % 256, (y * 5) % 256], -1)
    return np.clip(base + rng.integers(-60, 60, (h, w, 3)), 0, 255).astype(np.uint8)


def frontend(native: Path, tmp: Path, cases: list[dict]) -> list[np.ndarray | dict]:
    """Runs ``omniforge_frontend``; each case's ``images`` (uint8 arrays) go in with padded rows."""
    blob = bytearray()
    for c in cases:
        specs = []
        for a in c.pop("arrays", []):
            h, w, _ = a.shape
            rows = np.zeros((h, w * 3 + 5), np.uint8)  # a stride beyond the row
            rows[:, : w * 3] = a.reshape(h, w * 3)
            specs.append([w, h, len(blob), w * 3 + 5])
            blob += rows.tobytes()
        c["images"] = specs
    (tmp / "pixels").write_bytes(bytes(blob))
    req = {"pixels": str(tmp / "pixels"), "out": str(tmp / "out"), "cases": cases}
    r = _run([str(native / "omniforge_frontend")], input=json.dumps(req))
    assert r.returncode == 0, r.stderr
    data = (tmp / "out").read_bytes()
    out: list[np.ndarray | dict] = []
    for c, res in zip(cases, json.loads(r.stdout), strict=True):
        if "error" in res:
            out.append(res)
            continue
        dtype = {"resize": np.uint8, "frames": np.int64}.get(c["mode"], np.float32)
        out.append(np.frombuffer(data, dtype, count=res["count"], offset=res["offset"]).reshape(res["shape"]))
    return out


SIZES = [(64, 48), (48, 64), (33, 17), (17, 33), (7, 300), (300, 7), (15, 15), (501, 333)]


def test_pillow_resize_byte_for_byte(native_build: Path, tmp_path: Path) -> None:
    cases, want = [], []
    for w, h in SIZES:
        a = picture(w, h, seed=w * h)
        # down, up, one side each way (both of Pillow 13's pass orders), odd sizes
        targets = [(32, 32), (2 * w + 1, h), (w, max(1, h // 3)), (101, 57), (max(1, w // 5), 3 * h)]
        for f in Image.Resampling:
            for ow, oh in targets:
                cases.append({"mode": "resize", "filter": int(f), "width": ow, "height": oh, "arrays": [a]})
                want.append(np.asarray(Image.fromarray(a).resize((ow, oh), resample=f)))
    got = frontend(native_build, tmp_path, cases)
    bad = [
        (c["filter"], c["width"], c["height"])
        for c, g, w in zip(cases, got, want, strict=True)
        if not np.array_equal(g, w)
    ]
    assert not bad, f"{len(bad)} of {len(want)} resizes differ from Pillow's, e.g. {bad[:3]}"


def _clip_variants() -> list[dict]:
    return [
        CLIP,
        {**CLIP, "resample": 2},
        {**CLIP, "resample": 0},
        {**CLIP, "resample": 1, "size": {"shortest_edge": 40}, "crop_size": {"height": 24, "width": 36}},
        {**CLIP, "do_center_crop": False, "size": {"shortest_edge": 20}},
        {**CLIP, "do_resize": False, "crop_size": {"height": 64, "width": 80}},  # padded with zeros
        {**CLIP, "do_rescale": False, "do_normalize": False},
        {**CLIP, "rescale_factor": 0.5, "image_mean": 0.25, "image_std": 2},
        {},  # every default: 224 short side and crop
    ]


def test_front_ends_equal_the_python_runtime(native_build: Path, tmp_path: Path) -> None:
    from omniforge.runtime import imagebind_media as IB
    from omniforge.runtime import media as M
    from omniforge.runtime.image_frontends import resize_normalize

    pics = [picture(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    cases, want = [], []
    for cfg in _clip_variants():
        for a in pics:
            cases.append({"mode": "image", "config": cfg, "arrays": [a]})
            want.append(M.preprocess_image(a, cfg))
    blip = {
        "kind": "resize",
        "height": 24,
        "width": 40,
        "resample": 3,
        "mean": [0.5, 0.4, 0.3],
        "std": [0.2, 0.3, 0.4],
    }
    for a in pics:
        cases.append({"mode": "image", "config": blip, "arrays": [a]})
        want.append(resize_normalize(a, blip))
        cases.append({"mode": "image", "config": {"kind": "imagebind", "size": 28}, "arrays": [a]})
        want.append(IB.image_clip(a, size=28))
    # a video: each frame as an image (CLIP), or ImageBind's clips of two frames, three crops each
    frames = [picture(50, 30, seed=s) for s in range(4)]
    cases.append({"mode": "video", "config": CLIP, "arrays": frames})
    want.append(np.stack([M.preprocess_image(f, CLIP) for f in frames]))
    for w, h in [(50, 30), (30, 50), (31, 31)]:
        clip_frames = [picture(w, h, seed=s) for s in range(6)]
        ib = {"kind": "imagebind", "size": 24, "frames_per_clip": 2}
        cases.append({"mode": "video", "config": ib, "arrays": clip_frames})
        want.append(IB.clips_from_frames([clip_frames[0:2], clip_frames[2:4], clip_frames[4:6]], size=24))
    got = frontend(native_build, tmp_path, cases)
    for c, g, w in zip(cases, got, want, strict=True):
        assert isinstance(g, np.ndarray), (c["config"], g)
        assert g.shape == w.shape, (c["config"], g.shape, w.shape)
        assert np.array_equal(g, w), (c["config"], float(np.abs(g - w).max()))


def test_front_end_refusals_are_the_python_runtimes_sentences(native_build: Path, tmp_path: Path) -> None:
    from omniforge.errors import ConfigError, InputError, ManifestError
    from omniforge.runtime import media as M
    from omniforge.runtime.image_frontends import resize_normalize

    a = picture(20, 10)
    configs = [
        {**CLIP, "resample": 9},
        {**CLIP, "size": []},
        {**CLIP, "size": {"shortest_edge": 0}},
        {**CLIP, "do_resize": "yes"},
        {**CLIP, "image_std": [1, 0, 1]},
        {**CLIP, "image_mean": [1, 2]},
        {**CLIP, "rescale_factor": 1e7},
        {"kind": "resize", "height": 0, "width": 8, "resample": 3, "mean": [0, 0, 0], "std": [1, 1, 1]},
        {"kind": "resize", "height": 8, "width": 8, "resample": 3, "mean": [0, 0, 0], "std": [1, -1, 1]},
        {"kind": "imagebind", "size": 9999},
    ]
    cases = [{"mode": "image", "config": c, "arrays": [a]} for c in configs]
    # sizes the Python runtime refuses: an aspect beyond 100:1, a resize beyond the pixel bound
    cases.append({"mode": "image", "config": CLIP, "arrays": [picture(202, 2)]})
    huge = {**CLIP, "size": {"shortest_edge": 4096}}
    cases.append({"mode": "image", "config": huge, "arrays": [picture(100, 1)]})
    got = frontend(native_build, tmp_path, cases)
    for c, g in zip(cases, got, strict=True):
        assert isinstance(g, dict), c["config"]
        cfg, arr = c["config"], picture(c["images"][0][0], c["images"][0][1])
        with pytest.raises((ConfigError, InputError, ManifestError)) as err:
            if cfg.get("kind") == "resize":
                resize_normalize(arr, cfg)
            elif cfg.get("kind") == "imagebind":
                from omniforge.runtime.pipeline import _size

                _size(cfg, "size")
            else:
                M.preprocess_image(arr, cfg)
        # the Python runtime names an array "array"; the C API's images are "image"
        assert g["error"] == str(err.value).replace("'array'", "'image'"), (g, str(err.value))


def _tone(seconds: float, rate: int, seed: int) -> np.ndarray:
    """A chirp, a tone and noise: energy across the mel range."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * (200 + 900 * t) * t) + 0.2 * np.sin(2 * np.pi * 3000 * t)
    return (x + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def _audio_cases(
    cases: list[dict], blob: bytearray, config: dict, seconds: float, rate: int, seed: int
) -> np.ndarray:
    x = _tone(seconds, rate, seed)
    cases.append({"mode": "audio", "config": config, "samples": [len(blob), x.size], "rate": rate})
    blob += x.tobytes()
    return x


def test_audio_front_ends_equal_the_python_runtime(native_build: Path, tmp_path: Path) -> None:
    """The default log-mel, ImageBind's fbank clips, Whisper's log-mel and CLAP's features (both
    routes, every padding) from samples at several rates and lengths (shorter than a frame's half,
    than a clip, than the window; longer than what is read), within 1e-5 of the Python runtime's (FFTW's transforms and BLAS's sums differ from
    numpy's in the last bits). ImageBind's within 5e-5: its mel triangles are float32 (as
    torchaudio's), and numpy's float32 log differs from the C library's by an ulp, which moves the
    small weights at a triangle's edge and so the weakest bins (1.7e-5 measured)."""
    from omniforge.runtime import clap_media as CL
    from omniforge.runtime import imagebind_media as IB
    from omniforge.runtime import media as M
    from omniforge.runtime import whisper_media as W

    default = {"sample_rate": 16000, "n_fft": 400, "hop_length": 160, "n_mels": 32, "num_frames": 32}
    default |= {"mean": -4.268, "std": 4.569}
    ib = {"kind": "imagebind", "clips": 3, "n_mels": 128, "target_frames": 204}
    whisper = {"kind": "whisper", "window_s": 2, "n_mels": 80}
    cases: list[dict] = []
    blob = bytearray()
    want = []
    for seconds, rate in [(0.3, 16000), (0.011, 16000), (1.7, 44100), (0.5, 8000), (2.0, 22050)]:
        x = _audio_cases(cases, blob, default, seconds, rate, len(cases))
        want.append(M.audio_features(x, rate, default)[None])
    for seconds, rate in [(5.0, 16000), (1.2, 16000), (3.3, 44100), (2.5, 48000), (4.0, 8000)]:
        x = _audio_cases(cases, blob, ib, seconds, rate, len(cases))
        want.append(IB.audio_clips(x, rate, clips=3, n_mels=128, target_frames=204))
    for seconds, rate in [(1.0, 16000), (3.0, 16000), (1.5, 44100)]:
        x = _audio_cases(cases, blob, whisper, seconds, rate, len(cases))
        read = x[: int(np.ceil(2 * rate))]  # load_wav reads the window
        want.append(W.log_mel(M.resample(read, rate, W.SAMPLE_RATE), 80, 2)[None])
    clap = {"kind": "clap", "sample_rate": 16000, "n_fft": 400, "hop_length": 160, "n_mels": 64}
    clap |= {"f_min": 50, "f_max": 8000.0, "max_length_s": 2.0}
    for seconds, rate, extra in [
        (1.0, 16000, {}),  # shorter than the window: padded (repeatpad), repeated to 4 channels
        (0.7, 44100, {"padding": "repeat"}),
        (0.7, 16000, {"padding": "pad"}),
        (2.005, 16000, {}),  # longer by less than a hop
        (5.0, 22050, {}),  # fusion: the whole clip shrunk, and three crops
        (5.0, 16000, {"truncation": "rand_trunc", "n_mels": 48}),  # cut to the window, Slaney's filters
        (1.3, 16000, {"truncation": "rand_trunc", "n_mels": 48, "padding": "repeat"}),
    ]:
        fe = CL.ClapFrontEnd.from_config(clap | extra)
        x = _audio_cases(cases, blob, clap | extra, seconds, rate, len(cases))
        read = x[: int(np.ceil(fe.read_seconds * rate))]
        want.append(CL.features(M.resample(read, rate, fe.sample_rate), fe)[None])
    (tmp_path / "pixels").write_bytes(bytes(blob))
    req = {"pixels": str(tmp_path / "pixels"), "out": str(tmp_path / "out"), "cases": cases}
    r = _run([str(native_build / "omniforge_frontend")], input=json.dumps(req))
    assert r.returncode == 0, r.stderr
    data = (tmp_path / "out").read_bytes()
    for c, res, w in zip(cases, json.loads(r.stdout), want, strict=True):
        assert "error" not in res, (c["config"], res)
        got = np.frombuffer(data, np.float32, count=res["count"], offset=res["offset"]).reshape(res["shape"])
        assert got.shape == w.shape, (c["config"], got.shape, w.shape)
        atol = 5e-5 if c["config"].get("kind") == "imagebind" else 1e-5
        np.testing.assert_allclose(got, w, rtol=0, atol=atol, err_msg=str((c["config"], c["rate"])))


def test_video_frame_picking_equals_the_python_runtime(native_build: Path, tmp_path: Path) -> None:
    """The frames a decoded video gives: evenly spaced (``media.sample_indices``), and ImageBind's
    clips' frames (``imagebind_media.video_frame_indices``, exact fractions and torch's float32
    subsampling) over frame counts from 1 to 100,000 and rates from 0.05 to 240 fps; and the
    refusal of a clip that holds no frame."""
    from omniforge.errors import InputError
    from omniforge.runtime import imagebind_media as IB
    from omniforge.runtime import media as M

    rng = np.random.default_rng(0)
    counts = [1, 2, 3, 7, 24, 59, 60, 61, 150, 1001, 29970, 100000, *rng.integers(1, 5000, 40).tolist()]
    rates = [
        0.05,
        0.1,
        0.5,
        1.0,
        7.5,
        23.976,
        24.0,
        25.0,
        29.97,
        30.0,
        59.94,
        240.0,
        *rng.uniform(1, 120, 10).tolist(),
    ]
    cases, want = [], []
    for n in counts:
        for k in (1, 4, 16):
            cases.append({"mode": "frames", "config": {}, "n": int(n), "fps": 30.0, "k": k})
            want.append(M.sample_indices(int(n), k))
        for fps in rates:
            for per in (2, 3, 8):
                cfg = {"kind": "imagebind", "size": 224, "frames_per_clip": per, "video_clips": 5}
                try:
                    w = IB.video_frame_indices(int(n), float(fps), clips=5, frames_per_clip=per).reshape(-1)
                except InputError as exc:
                    w = str(exc)
                cases.append({"mode": "frames", "config": cfg, "n": int(n), "fps": float(fps), "k": 0})
                want.append(w)
    got = frontend(native_build, tmp_path, cases)
    refused = 0
    for c, g, w in zip(cases, got, want, strict=True):
        if isinstance(w, str):
            refused += 1
            assert isinstance(g, dict) and g["error"] == w, (c, g, w)
        else:
            assert isinstance(g, np.ndarray) and g.tolist() == w.tolist(), (c, g, w)
    assert refused > 0  # short videos at low rates have clips without a frame
