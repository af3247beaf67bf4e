"""What a new user meets first in media handling: WAV and 16-bit image inputs, the range of
``--steps``, initial latents, audible default audio, and the modes of written files."""

import json
import os
import re
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omniforge.cli import main
from omniforge.errors import ConfigError, InputError
from omniforge.runtime import media as M
from omniforge.runtime.pipeline import DiffusionConfig, Pipeline, PipelineResult
from omniforge.runtime.sampling import GenerationConfig
from omniforge.runtime.schedulers import SCHEDULERS, make_scheduler

SR = 8000
GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


@pytest.fixture(scope="module")
def pipe(default_build):
    return Pipeline(default_build)


@pytest.fixture(scope="module")
def scheduler_config(default_build):
    return json.loads((default_build / "configs" / "audio_scheduler.json").read_text())


# ---- 1. WAV input --------------------------------------------------------------------------------
def signal(channels: int = 1) -> np.ndarray:
    """(n, channels) test signal in [-0.9, 0.9]: a tone per channel plus a little noise."""
    t = np.arange(2000) / SR
    rng = np.random.default_rng(0)
    cols = [
        0.8 * np.sin(2 * np.pi * (220 * (c + 1)) * t) + 0.1 * rng.uniform(-1, 1, t.size)
        for c in range(channels)
    ]
    return np.stack(cols, axis=1)


def wav_bytes(tag: int, bits: int, payload: bytes, channels: int, extensible: bool = False) -> bytes:
    """A WAV file written field by field: ``fmt `` (plain or WAVE_FORMAT_EXTENSIBLE), then ``data``."""
    align = channels * bits // 8
    head = struct.pack("<HIIHH", channels, SR, SR * align, align, bits)
    if extensible:
        fmt = (
            struct.pack("<H", 0xFFFE)
            + head
            + struct.pack("<HHI", 22, bits, 0)
            + struct.pack("<H", tag)
            + GUID_TAIL
        )
    else:
        fmt = struct.pack("<H", tag) + head
    body = (
        b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", len(payload))
        + payload
    )
    if len(payload) % 2:
        body += b"\x00"
    return b"RIFF" + struct.pack("<I", len(body)) + body


def pcm24(x: np.ndarray) -> bytes:
    v = np.round(x * 2**23).astype(np.int64).clip(-(2**23), 2**23 - 1) & 0xFFFFFF
    return np.stack([v & 0xFF, (v >> 8) & 0xFF, v >> 16], axis=-1).astype(np.uint8).tobytes()


def pcm32(x: np.ndarray) -> bytes:
    return np.round(x * 2**31).clip(-(2**31), 2**31 - 1).astype("<i4").tobytes()


ENCODINGS = {  # name: (format tag, bits, encoder, decoding error allowed)
    "float32": (3, 32, lambda x: x.astype("<f4").tobytes(), 1e-7),
    "float64": (3, 64, lambda x: x.astype("<f8").tobytes(), 1e-7),
    "pcm24": (1, 24, pcm24, 2**-23),
    "pcm32": (1, 32, pcm32, 1e-7),
}


@pytest.mark.parametrize("extensible", [False, True], ids=["plain", "extensible"])
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("name", list(ENCODINGS))
def test_float_and_wide_pcm_wavs_decode_to_their_samples(tmp_path, name, channels, extensible):
    tag, bits, encode, tol = ENCODINGS[name]
    x = signal(channels)
    f = tmp_path / f"{name}.wav"
    f.write_bytes(wav_bytes(tag, bits, encode(x), channels, extensible))
    samples, sr = M.load_wav(f)
    assert sr == SR and samples.dtype == np.float32 and samples.shape == (len(x),)
    np.testing.assert_allclose(samples, x.mean(axis=1), rtol=0, atol=tol + 1e-7)


def test_16_bit_pcm_written_by_the_wave_module_still_reads(tmp_path):
    x = signal(1)[:, 0]
    M.write_wav(tmp_path / "a.wav", x, SR)
    samples, sr = M.load_wav(tmp_path / "a.wav")
    assert sr == SR
    np.testing.assert_allclose(samples, x, atol=2 / 32767)  # written over 32767, read over 32768


def test_a_float_wav_feeds_the_audio_encoder(pipe, tmp_path):
    x = signal(1)[:, 0]
    (tmp_path / "f.wav").write_bytes(wav_bytes(3, 32, x.astype("<f4").tobytes(), 1))
    M.write_wav(tmp_path / "i.wav", x, SR)
    emb_float, emb_int = pipe.encode_audio(tmp_path / "f.wav"), pipe.encode_audio(tmp_path / "i.wav")
    assert np.isfinite(emb_float).all()
    np.testing.assert_allclose(emb_float, emb_int, atol=1e-3)


@pytest.mark.parametrize(
    "tag, bits, needle", [(3, 16, "16-bit float samples"), (3, 24, "24-bit float"), (6, 8, "8-bit format 6")]
)
def test_unsupported_wav_encodings_are_named(tmp_path, tag, bits, needle):
    f = tmp_path / "x.wav"
    f.write_bytes(wav_bytes(tag, bits, bytes(48), 1))
    with pytest.raises(InputError, match=needle):
        M.load_wav(f)


def test_a_wav_with_non_finite_floats_is_refused(tmp_path):
    f = tmp_path / "nan.wav"
    f.write_bytes(wav_bytes(3, 32, np.array([0.0, np.nan, 0.5], "<f4").tobytes(), 1))
    with pytest.raises(InputError, match="NaN or infinite"):
        M.load_wav(f)


# ---- 2. 16- and 32-bit grey images --------------------------------------------------------------
@pytest.fixture(scope="module")
def grey8():
    yy, xx = np.mgrid[0:40, 0:48]
    return ((xx * 5 + yy * 3) % 256).astype(np.uint8)


@pytest.mark.parametrize(
    "suffix, make",
    [
        (".png", lambda g: Image.fromarray(g.astype(np.uint16) * 257)),  # mode I;16
        (".tif", lambda g: Image.fromarray(g.astype(np.uint16) * 257)),
        (
            ".tif",
            lambda g: Image.fromarray(np.round(g.astype(np.float64) * ((2**31 - 1) / 255)).astype(np.int32)),
        ),
    ],
    ids=["png-16", "tiff-16", "tiff-int32"],
)
def test_deep_grey_images_match_their_8_bit_version(tmp_path, grey8, suffix, make):
    deep = make(grey8)
    assert deep.mode in ("I;16", "I")
    deep.save(tmp_path / f"deep{suffix}")
    Image.fromarray(grey8).save(tmp_path / "eight.png")
    reread = Image.open(tmp_path / f"deep{suffix}")
    assert reread.mode.startswith("I")
    got = np.asarray(M.load_image(tmp_path / f"deep{suffix}"), dtype=np.int16)
    want = np.asarray(M.load_image(tmp_path / "eight.png"), dtype=np.int16)
    assert got.shape == want.shape == (40, 48, 3)
    assert np.abs(got - want).max() <= 1  # within 1/255
    assert got.mean() < 200  # not the near-white of a clipping conversion


def test_a_16_bit_png_encodes_like_its_8_bit_version(pipe, tmp_path, grey8):
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    Image.fromarray(grey8).save(tmp_path / "eight.png")
    np.testing.assert_allclose(
        pipe.encode_image(tmp_path / "deep.png"), pipe.encode_image(tmp_path / "eight.png"), atol=1e-4
    )


# ---- 3. the range of --steps and --guidance -----------------------------------------------------
EXPECTED_MAX = {"ddim": 999, "euler": 999, "dpm": 998}  # 1000 training timesteps, leading, offset 1


def test_the_builds_scheduler_ranges(scheduler_config):
    assert scheduler_config["num_train_timesteps"] == 1000
    assert scheduler_config["timestep_spacing"] == "leading" and scheduler_config["steps_offset"] == 1
    for name in SCHEDULERS:
        assert make_scheduler(name, scheduler_config).max_steps == EXPECTED_MAX[name], name


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize(
    "spacing, offset", [("leading", 0), ("leading", 1), ("trailing", 1), ("linspace", 0)]
)
def test_every_spacing_runs_at_its_top_and_bottom_and_refuses_past_it(
    scheduler_config, name, spacing, offset
):
    cfg = {**scheduler_config, "timestep_spacing": spacing, "steps_offset": offset}
    top = make_scheduler(name, cfg).max_steps
    assert top >= 998
    for steps in (1, top):
        sched = make_scheduler(name, cfg)
        sched.set_timesteps(steps)
        ts = sched.timesteps
        assert len(ts) == steps and 0 <= ts.min() and ts.max() <= 999 and np.all(np.diff(ts) < 0)
        x = np.full((1, 4, 2, 2), sched.init_noise_sigma, np.float32)
        with np.errstate(all="raise"):
            for i in range(steps):
                x = sched.step(np.full_like(x, 0.1), i, sched.scale_model_input(x, i))
        assert np.isfinite(x).all()
    with pytest.raises(ConfigError, match=rf"steps must lie in \[1, {top}\] for the {name} scheduler"):
        make_scheduler(name, cfg).set_timesteps(top + 1)


def test_trailing_spacing_gives_exactly_the_steps_asked_for(scheduler_config):
    cfg = {**scheduler_config, "timestep_spacing": "trailing"}
    for name in SCHEDULERS:
        sched = make_scheduler(name, cfg)
        sched.set_timesteps(61)  # np.arange(1000, 0, -1000 / 61) has 62 values
        assert len(sched.timesteps) == 61 and sched.timesteps[-1] >= 0, name


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_the_pipeline_runs_each_scheduler_and_refuses_past_its_range(pipe, name):
    """Through the UNet at the bottom of the range; the whole range is stepped on the schedulers
    alone (``test_every_spacing_runs_at_its_top_and_bottom_and_refuses_past_it``)."""
    top = EXPECTED_MAX[name]
    for steps in (1, 2):
        r = pipe.run(
            "A dog barks",
            generation=GenerationConfig(max_new_tokens=1),
            diffusion=DiffusionConfig(steps=steps, scheduler=name),
            force=["audio"],
        )
        wav = r.audios[0]
        assert wav.shape == (512,) and np.isfinite(wav).all(), (name, steps)
    with pytest.raises(ConfigError, match=rf"steps must lie in \[1, {top}\] for the {name} scheduler"):
        pipe.run("x", diffusion=DiffusionConfig(steps=top + 1, scheduler=name), force=["audio"])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_guidance_must_be_finite_and_non_negative(value):
    with pytest.raises(ConfigError, match="guidance scale must be >= 0 and finite"):
        DiffusionConfig(guidance_scale=value)


@pytest.mark.parametrize(
    "option, needle",
    [
        (["--steps", "1000"], r"steps must lie in \[1, 999\] for the ddim scheduler"),
        (["--steps", "999", "--scheduler", "dpm"], r"steps must lie in \[1, 998\] for the dpm scheduler"),
        (["--guidance", "nan"], "guidance scale must be >= 0 and finite"),
        (["--guidance", "inf"], "guidance scale must be >= 0 and finite"),
    ],
)
def test_cli_refuses_steps_and_guidance_out_of_range(default_build, tmp_path, capsys, option, needle):
    code = main(
        ["run", str(default_build), "--prompt", "x", "--force", "image", "--out", str(tmp_path), *option]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("omniforge: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(needle, err)
    assert not list(tmp_path.iterdir())


# ---- 4. initial latents -------------------------------------------------------------------------
def _image(pipe, seed, latents=None):
    return pipe.run(
        "A red boat",
        generation=GenerationConfig(max_new_tokens=2),
        diffusion=DiffusionConfig(steps=3, seed=seed),
        force=["image"],
        latents=latents,
    ).images[0]


def test_given_latents_fix_the_image_whatever_the_seed(pipe):
    latents = {
        "image": np.random.default_rng(42).standard_normal(pipe.latent_shape("image")).astype(np.float32)
    }
    a, b = _image(pipe, 1, latents), _image(pipe, 2, latents)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, _image(pipe, 1))  # the seed's own noise gives another picture


def test_a_seeds_own_latents_reproduce_the_seeded_run(pipe):
    assert pipe.latent_shape("image") == (1, 4, 16, 16)
    own = pipe.initial_latents("image", 5)
    np.testing.assert_array_equal(_image(pipe, 0, {"image": own}), _image(pipe, 5))
    # float64 noise is accepted and used as float32
    np.testing.assert_array_equal(_image(pipe, 0, {"image": own.astype(np.float64)}), _image(pipe, 5))


def test_video_and_audio_take_latents_too(pipe):
    for modality, attr in (("video", "videos"), ("audio", "audios")):
        own = pipe.initial_latents(modality, 3)
        runs = [
            getattr(
                pipe.run(
                    "x",
                    generation=GenerationConfig(max_new_tokens=1),
                    diffusion=DiffusionConfig(steps=2, seed=seed),
                    force=[modality],
                    latents={modality: own} if given else None,
                ),
                attr,
            )[0]
            for seed, given in ((9, True), (3, False))
        ]
        np.testing.assert_array_equal(runs[0], runs[1])


@pytest.mark.parametrize(
    "latents, needle",
    [
        ({"image": np.zeros((1, 4, 8, 8), np.float32)}, r"image latents must have shape \(1, 4, 16, 16\)"),
        ({"image": np.zeros((1, 4, 16, 16), np.int64)}, "must be a floating-point numpy array, got int64"),
        ({"image": [[0.0]]}, "must be a floating-point numpy array, got list"),
        ({"image": np.full((1, 4, 16, 16), np.nan, np.float32)}, "hold NaN or infinite values"),
        ({"smell": np.zeros(3, np.float32)}, "cannot generate 'smell'"),
    ],
)
def test_bad_latents_get_one_sentence(pipe, latents, needle):
    with pytest.raises(InputError, match=needle):
        pipe.run("x", generation=GenerationConfig(max_new_tokens=1), force=["image"], latents=latents)


# ---- 5. audible default audio -------------------------------------------------------------------
def test_forced_audio_from_the_cli_is_audible(default_build, tmp_path, capsys):
    code = main(
        ["run", str(default_build), "--prompt", "A dog barks", "--force", "audio", "--out", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    samples, sr = M.load_wav(tmp_path / "audio_0.wav")
    assert sr == 16000 and samples.shape == (512,)
    assert np.abs(samples).max() >= 0.05
    assert "warning" not in err


def test_a_silent_waveform_is_reported(pipe, default_build, tmp_path, capsys, monkeypatch):
    r = pipe.run("A dog barks", generation=GenerationConfig(max_new_tokens=1), force=["audio"])
    assert r.warnings == [] and np.abs(r.audios[0]).max() >= 0.05
    # the same waveform at -100 dB: every 16-bit sample of it is zero
    real = Pipeline.decode_audio
    monkeypatch.setattr(
        Pipeline, "decode_audio", lambda self, *a, **k: real(self, *a, **k) * np.float32(1e-5)
    )
    quiet = pipe.run("A dog barks", generation=GenerationConfig(max_new_tokens=1), force=["audio"])
    assert len(quiet.warnings) == 1 and "generated audio 0 is silent" in quiet.warnings[0]
    assert main(["run", str(default_build), "--prompt", "x", "--force", "audio", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert err.count("omniforge: warning: generated audio 0 is silent") == 1
    assert not M.load_wav(tmp_path / "audio_0.wav")[0].any()


# ---- 6. file modes follow the umask -------------------------------------------------------------
def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize(
    "umask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)], ids=["022", "077"]
)
def test_builds_manifests_and_media_follow_the_umask(default_model, tmp_path, umask, folder_mode, file_mode):
    from omniforge.export.exporter import ExportOptions, export_pipeline
    from omniforge.model.tiny import create_default

    old = os.umask(umask)
    try:
        out = tmp_path / "builds" / "small"
        export_pipeline(default_model, out, ExportOptions(stages=["input_projector"]), log=lambda _m: None)
        export_pipeline(default_model, out, ExportOptions(stages=["input_projector"]), log=lambda _m: None)
        model = create_default(tmp_path / "model")
        rng = np.random.default_rng(0)
        result = PipelineResult(
            text="",
            generation=None,
            images=[rng.random((8, 8, 3))],
            videos=[rng.random((2, 8, 8, 3))],
            audios=[rng.uniform(-0.5, 0.5, 400)],
        )
        written = result.save(tmp_path / "media")
    finally:
        os.umask(old)
    assert _mode(out) == folder_mode  # replaced by the second export: the swap keeps the mode too
    assert _mode(model) == folder_mode
    assert _mode(out / "manifest.json") == file_mode
    assert _mode(out / "parity.json") == file_mode
    assert {p.suffix for p in written} == {".png", ".gif", ".wav"}
    for p in written:
        assert _mode(p) == file_mode, p
    assert _mode(tmp_path / "media" / "video_0_frames") == folder_mode
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporaries left
