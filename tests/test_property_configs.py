"""Property tests over a build's config files (issue 20): scheduler, VAE, vocoder, image
preprocessor and audio front-end configs, generated whole or as mutations of the default build's,
and cut-off JSON. Each config is either accepted, and then used in bounded time and memory with
finite results, or refused with exactly one ConfigError/ManifestError sentence; the files are
also put inside a copy of the build with their hashes recomputed, so that it is the values, not
the integrity check, that are refused, and nothing is written into that build folder."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from omniforge.errors import ConfigError, InputError, ManifestError, OmniforgeError
from omniforge.runtime import media as M
from omniforge.runtime.build import Build
from omniforge.runtime.pipeline import DiffusionConfig, Pipeline
from omniforge.runtime.sampling import GenerationConfig
from omniforge.runtime.schedulers import MAX_TRAIN_TIMESTEPS, SCHEDULERS, make_scheduler
from tests.test_hostile_inputs import bounded

PROPERTY = settings(
    max_examples=int(os.environ.get("OMNIFORGE_PROPERTY_EXAMPLES", 60)),  # more for a longer hunt
    deadline=None,  # `bounded` below is the time limit: one slow CI machine must not make it flaky
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FEW = settings(PROPERTY, max_examples=max(12, PROPERTY.max_examples // 5))
MEMORY_BUDGET = 512 * 2**20  # bytes numpy may hold at once while one config is used


# ---- helpers ------------------------------------------------------------------------------------
def outcome(fn, allowed=(ConfigError, ManifestError), timeout: float = 30.0):
    """``fn()``'s result, or the one-line error of an ``allowed`` type it raised."""
    try:
        return bounded(fn, timeout)
    except OmniforgeError as exc:
        assert isinstance(exc, allowed), f"{type(exc).__name__}: {exc}"
        assert "\n" not in str(exc) and len(str(exc)) < 400, str(exc)
        return exc


def peak_bytes(fn, allowed=(ConfigError, InputError)):
    """``fn()``'s result (or OmniforgeError) and the most bytes numpy and Python held during it."""
    tracemalloc.start()
    try:
        got = outcome(fn, allowed)
        return got, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` (hidden ones too) with its size and modification time."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root, name)
            st_ = p.lstat()
            out[str(p.relative_to(folder))] = (st_.st_size, st_.st_mtime_ns)
    return out


def rehash(build: Path, rel: str) -> None:
    """Record ``rel``'s new SHA-256 and size in the build's manifest, so that it verifies."""
    f = build / rel
    manifest = json.loads((build / "manifest.json").read_text())
    for a in manifest["artifacts"]:
        if a["path"] == rel:
            a["sha256"], a["size"] = hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_size
    (build / "manifest.json").write_text(json.dumps(manifest, indent=1))


def put(build: Path, rel: str, content: object | bytes) -> None:
    """Write ``content`` (JSON, NaN allowed, or raw bytes) as ``rel`` and re-hash it."""
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    (build / rel).write_bytes(data)
    rehash(build, rel)


@pytest.fixture(scope="module")
def configs(default_build) -> dict[str, dict]:
    """The default build's own config files by role."""
    m = json.loads((default_build / "manifest.json").read_text())
    return {
        role: json.loads((default_build / rel).read_text())
        for role, rel in m["files"].items()
        if rel.endswith(".json") and role != "parity_report"
    }


@pytest.fixture(scope="module")
def build_copy(default_build, tmp_path_factory) -> Path:
    """One copy of the default build per module; each test puts back what it changed."""
    dst = tmp_path_factory.mktemp("configs") / "build"
    shutil.copytree(default_build, dst)
    return dst


@pytest.fixture()
def hostile(build_copy, default_build):
    """The module's build copy, restored (files and manifest) after the test."""
    yield build_copy
    for p in build_copy.rglob("*"):
        if p.is_file():
            orig = default_build / p.relative_to(build_copy)
            if not orig.exists():
                p.unlink()
            elif p.read_bytes() != orig.read_bytes():
                shutil.copy2(orig, p)


# values a careless exporter or an attacker may put anywhere in a config
ODD = st.one_of(
    st.sampled_from(
        [0, -5, -1, 1, 2**31, 10**9, 10**30, 0.5, -0.0, 1e-300, 1e308, math.nan, math.inf, -math.inf]
        + [True, False, None, "", "a\x00b", "x" * 10_000, [], {}, [0], [1.5, "a"], {"a": 1}]
    ),
    st.integers(-(2**64), 2**64),
    st.floats(),
    st.text(max_size=6),
)


def mutated(base: dict, plausible: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """``base`` with a key or so dropped and up to four set to a value: plausible three times in
    four (so that many configs are accepted and then used), odd otherwise."""
    keys = sorted(set(base) | set(plausible))
    change = st.sampled_from(keys).flatmap(
        lambda k: st.tuples(st.just(k), st.one_of(*[plausible.get(k, ODD)] * 3, ODD))
    )
    return st.tuples(st.sets(st.sampled_from(keys), max_size=1), st.lists(change, max_size=4)).map(
        lambda t: {**{k: v for k, v in base.items() if k not in t[0]}, **dict(t[1])}
    )


# ---- schedulers ---------------------------------------------------------------------------------
SCHEDULER_VALUES = {
    "num_train_timesteps": st.one_of(st.integers(1, 1200), st.integers(-5, MAX_TRAIN_TIMESTEPS + 5)),
    "beta_start": st.floats(0, 0.05),
    "beta_end": st.floats(0, 1.0),
    "beta_schedule": st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2", "LINEAR"]),
    "prediction_type": st.sampled_from(["epsilon", "v_prediction", "sample"]),
    "timestep_spacing": st.sampled_from(["leading", "trailing", "linspace", "karras"]),
    "steps_offset": st.integers(-3, 1200),
    "set_alpha_to_one": st.booleans(),
    "clip_sample": st.booleans(),
    "clip_sample_range": st.floats(-1, 10),
    "thresholding": st.booleans(),
    "trained_betas": st.one_of(st.none(), st.lists(st.floats(0, 1), max_size=3)),
    "alphas_cumprod": st.one_of(
        st.lists(st.floats(0, 1), max_size=8),
        st.integers(1, 1200).map(lambda n: list(np.linspace(0.999, 0.01, n))),
        st.integers(1, 1200).map(lambda n: list(np.linspace(0.01, 0.999, n))),  # increasing
    ),
}


def _steps_through(name: str, cfg: dict) -> None:
    """Accepted configs step to finite latents at both ends of the step range; refused ones are
    one ConfigError."""
    sched = outcome(lambda: make_scheduler(name, cfg))
    event("refused" if isinstance(sched, OmniforgeError) else "accepted")
    if isinstance(sched, OmniforgeError):
        return
    top = sched.max_steps
    assert 0 <= top <= sched.config.num_train_timesteps
    for steps in sorted({1, 2, top}):
        s = make_scheduler(name, cfg)
        got = outcome(lambda s=s, steps=steps: s.set_timesteps(steps))
        if isinstance(got, OmniforgeError):
            assert "steps" in str(got) and steps > top or top == 0, str(got)
            continue
        assert len(s.timesteps) == steps
        rng = np.random.default_rng(steps)
        x = (rng.standard_normal((1, 2, 2, 2)) * s.init_noise_sigma).astype(np.float32)
        with np.errstate(all="ignore"):
            for i in range(steps):
                x = s.step(rng.standard_normal(x.shape).astype(np.float32), i, s.scale_model_input(x, i))
        assert x.dtype == np.float32 and np.isfinite(x).all(), (name, steps, cfg)


@PROPERTY
@given(data=st.data(), name=st.sampled_from(sorted(SCHEDULERS)))
def test_any_scheduler_config_steps_or_gets_one_error(configs, data, name):
    base = configs["image_scheduler"]
    cfg = data.draw(mutated(base, SCHEDULER_VALUES))
    _steps_through(name, cfg)


@FEW
@given(cfg=st.one_of(ODD, st.dictionaries(st.text(max_size=20), ODD, max_size=6)))
def test_a_scheduler_config_of_any_shape_gets_one_error(cfg):
    for name in SCHEDULERS:
        _steps_through(name, cfg)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"num_train_timesteps": 0}, r"'num_train_timesteps' must be an integer in \[1, 10000\], got 0"),
        ({"num_train_timesteps": -5}, r"'num_train_timesteps' must be an integer in \[1, 10000\], got -5"),
        ({"num_train_timesteps": 10**9}, r"'num_train_timesteps' must be an integer in \[1, 10000\]"),
        ({"num_train_timesteps": "1000"}, r"'num_train_timesteps' must be an integer"),
        ({"beta_start": 0.02, "beta_end": 0.001}, "0 < beta_start <= beta_end < 1"),
        ({"beta_start": math.nan}, "'beta_start' must be a finite number, got nan"),
        ({"beta_end": math.inf}, "'beta_end' must be a finite number, got inf"),
        ({"beta_schedule": "cosine"}, "beta_schedule 'cosine' is not supported"),
        ({"steps_offset": -5}, r"'steps_offset' must be an integer in \[0, 999\], got -5"),
        ({"prediction_type": "sample"}, "prediction_type 'sample' is not supported"),
        ({"clip_sample": "false"}, "'clip_sample' must be true or false"),
        ({"alphas_cumprod": [0.5] * 10}, "alphas_cumprod table has 10 entries, not num_train_timesteps"),
        ({"alphas_cumprod": [math.nan] * 1000}, r"must hold numbers in \[1e-20, 1\)"),
        ({"alphas_cumprod": list(np.linspace(0.01, 0.9, 1000))}, "must decrease strictly"),
        ({"beta_end": 0.9999, "num_train_timesteps": 10_000}, r"\(computed from its betas\)"),
        ({"trained_betas": [0.1]}, "trained_betas=.* is not supported"),
    ],
)
def test_a_hostile_scheduler_config_in_a_build_is_refused_before_generating(
    hostile, configs, change, needle, capsys
):
    base = dict(configs["image_scheduler"])
    if "num_train_timesteps" in change:  # the stored table is for 1000
        base.pop("alphas_cumprod")
    put(hostile, "configs/image_scheduler.json", {**base, **change})
    before = snapshot(hostile)
    pipe = Pipeline(hostile)
    tokens: list[str] = []
    with pytest.raises(ConfigError, match=needle):
        bounded(
            lambda: pipe.run(
                "A dog",
                generation=GenerationConfig(max_new_tokens=2),
                diffusion=DiffusionConfig(steps=2),
                force=["image"],
                on_text=tokens.append,
            )
        )
    assert tokens == []  # refused before the LLM ran
    assert snapshot(hostile) == before


def test_a_hostile_scheduler_config_is_one_line_from_the_command_line(hostile, configs, tmp_path, capsys):
    from omniforge.cli import main

    put(hostile, "configs/image_scheduler.json", {**configs["image_scheduler"], "steps_offset": -5})
    argv = ["run", str(hostile), "--prompt", "A dog", "--force", "image", "--out", str(tmp_path / "out")]
    assert bounded(lambda: main(argv)) == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("omniforge: error: the scheduler config's 'steps_offset'")
    assert captured.out == "" and not (tmp_path / "out").exists()


# ---- VAE and vocoder ----------------------------------------------------------------------------
VAE_VALUES = {
    "scaling_factor": st.one_of(st.floats(-1, 2), st.just(0.18215)),
    "block_out_channels": st.lists(st.integers(-1, 70_000), max_size=5),
    "shift_factor": st.one_of(st.none(), st.floats(-1, 1)),
    "latents_mean": st.one_of(st.none(), st.lists(st.floats(), max_size=4)),
}


@PROPERTY
@given(data=st.data(), modality=st.sampled_from(["image", "video", "audio"]))
def test_any_vae_config_gives_a_positive_scale_or_one_error(configs, data, modality):
    cfg = data.draw(mutated(configs[f"{modality}_vae"], VAE_VALUES))
    got = outcome(lambda: M.vae_scaling(cfg))
    if not isinstance(got, OmniforgeError):
        assert isinstance(got, float) and math.isfinite(got) and got > 0
        latents = np.full((1, 4, 2, 2), 1e4, np.float32)  # far beyond unit-variance latents
        assert np.isfinite(latents / np.float32(got)).all()  # what the decoder is fed


VOCODER_VALUES = {
    "sampling_rate": st.one_of(st.integers(-1, 500_000), st.just(16000)),
    "upsample_rates": st.lists(st.integers(-1, 2000), max_size=6),
    "model_in_dim": st.integers(-1, 2000),
}


@PROPERTY
@given(data=st.data())
def test_any_vocoder_config_gives_a_writable_rate_or_one_error(configs, data, tmp_path):
    cfg = data.draw(mutated(configs["vocoder"], VOCODER_VALUES))
    got = outcome(lambda: M.check_vocoder_config(cfg))
    if not isinstance(got, OmniforgeError):
        assert M.MIN_SAMPLE_RATE <= got <= M.MAX_SAMPLE_RATE
        wav = M.write_wav(tmp_path / "a.wav", np.zeros(8, np.float32), got)  # what PipelineResult.save does
        assert M.load_wav(wav)[1] == got


@pytest.mark.parametrize(
    "role, change, needle",
    [
        (
            "image_vae",
            {"scaling_factor": 0},
            r"'scaling_factor' must be a number in \[1e-06, 1e\+06\], got 0\b",
        ),
        ("image_vae", {"scaling_factor": -0.18}, "'scaling_factor' must be a number in"),
        ("image_vae", {"scaling_factor": 1e-300}, "'scaling_factor' must be a number in"),
        (
            "image_vae",
            {"scaling_factor": math.nan},
            r"'scaling_factor' must be a number in .*, got nan",
        ),
        ("image_vae", {"scaling_factor": "0.18"}, "'scaling_factor' must be a number in"),
        ("image_vae", {"block_out_channels": []}, "'block_out_channels' must be a list of 1 to 64 integers"),
        ("image_vae", {"block_out_channels": [0, 32]}, r"'block_out_channels' must be an integer in \[1, "),
        ("image_vae", {"shift_factor": 0.06}, "'shift_factor' is not supported"),
        ("vocoder", {"sampling_rate": 0}, r"'sampling_rate' must be an integer in \[1000, 384000\], got 0"),
        ("vocoder", {"sampling_rate": 10**9}, r"'sampling_rate' must be an integer in \[1000, 384000\]"),
        ("vocoder", {"upsample_rates": []}, "'upsample_rates' must be a list of 1 to 64 integers"),
        ("vocoder", {"upsample_rates": [4, 0]}, r"'upsample_rates' must be an integer in \[1, 1024\], got 0"),
    ],
)
def test_hostile_decoder_configs_in_a_build_get_one_sentence(hostile, configs, role, change, needle):
    rel = f"configs/{role}.json"
    put(hostile, rel, {**configs[role], **change})
    before = snapshot(hostile)
    read = M.check_vocoder_config if role == "vocoder" else M.vae_scaling
    with pytest.raises(ConfigError, match=needle):
        read(Build(hostile).json(role))
    assert snapshot(hostile) == before


@pytest.mark.parametrize(
    "role, change, modality",
    [
        ("image_vae", {"scaling_factor": 0}, "image"),
        ("image_vae", {"scaling_factor": math.nan}, "image"),
        ("vocoder", {"sampling_rate": 0}, "audio"),
    ],
)
def test_the_pipeline_refuses_hostile_decoder_configs(hostile, configs, role, change, modality, tmp_path):
    put(hostile, f"configs/{role}.json", {**configs[role], **change})
    pipe = Pipeline(hostile)
    with pytest.raises(ConfigError, match=f"the {'vocoder' if role == 'vocoder' else 'VAE'} config"):
        result = bounded(
            lambda: pipe.run(
                "A dog",
                generation=GenerationConfig(max_new_tokens=1),
                diffusion=DiffusionConfig(steps=1),
                force=[modality],
            )
        )
        result.save(tmp_path / "out")


# ---- image preprocessor -------------------------------------------------------------------------
SIDE = st.one_of(st.integers(-2, 80), st.sampled_from([4096, 4097, 10**9]), ODD)
PREPROCESSOR_VALUES = {
    "size": st.one_of(st.fixed_dictionaries({"shortest_edge": SIDE}), ODD),
    "crop_size": st.one_of(st.fixed_dictionaries({"height": SIDE, "width": SIDE}), ODD),
    "resample": st.integers(-1, 7),
    "do_resize": st.booleans(),
    "do_center_crop": st.booleans(),
    "do_rescale": st.booleans(),
    "do_normalize": st.booleans(),
    "rescale_factor": st.floats(),
    "image_mean": st.lists(st.floats(), max_size=4),
    "image_std": st.lists(st.floats(), max_size=4),
}


@PROPERTY
@given(data=st.data(), w=st.integers(1, 64), h=st.integers(1, 64))
def test_any_image_preprocessor_config_gives_finite_pixels_or_one_error(configs, data, w, h):
    cfg = data.draw(mutated(configs["image_preprocessor"], PREPROCESSOR_VALUES))
    image = np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    prep = outcome(lambda: M.ImagePreprocessing.from_config(cfg))
    event("refused" if isinstance(prep, OmniforgeError) else "accepted")
    if isinstance(prep, OmniforgeError):
        return
    x, peak = peak_bytes(lambda: M.preprocess_image(image, prep))
    assert peak < MEMORY_BUDGET, peak
    if isinstance(x, OmniforgeError):
        assert max(w, h) > M.MAX_ASPECT * min(w, h) or "pixels" in str(x), str(x)
        return
    assert x.dtype == np.float32 and x.shape[0] == 3 and np.isfinite(x).all()
    if prep.do_center_crop:
        assert x.shape[1:] == prep.crop


# ---- audio front end ----------------------------------------------------------------------------
FRONT_END_VALUES = {
    "sample_rate": st.one_of(st.sampled_from([0, 999, 1000, 16000, 384_000, 384_001]), ODD),
    "n_fft": st.one_of(st.integers(0, 4096), st.sampled_from([2**16, 2**16 + 1, 10**9])),
    "hop_length": st.one_of(st.integers(0, 4096), st.sampled_from([2**16, 10**9])),
    "n_mels": st.one_of(st.integers(0, 256), st.sampled_from([1024, 1025, 10**9])),
    "num_frames": st.one_of(st.integers(0, 2048), st.sampled_from([100_000, 100_001, 10**9])),
    "mean": st.floats(),
    "std": st.floats(),
}


@PROPERTY
@given(data=st.data(), sr=st.sampled_from([1000, 16000, 44100, 384_000]))
def test_any_audio_front_end_config_gives_features_or_one_error_in_bounded_memory(configs, data, sr):
    cfg = data.draw(mutated(configs["audio_frontend"], FRONT_END_VALUES))
    fe = outcome(lambda: M.AudioFrontEnd.from_config(cfg))
    event("refused" if isinstance(fe, OmniforgeError) else "accepted")
    if isinstance(fe, OmniforgeError):
        return
    # the longest recording the pipeline hands over: the window the front end reads
    n = min(math.ceil(fe.read_seconds * sr), M.MAX_AUDIO_SAMPLES)
    wave = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1
    t0 = time.perf_counter()
    feats, peak = peak_bytes(lambda: M.audio_features(wave, sr, fe))
    assert time.perf_counter() - t0 < 20
    assert peak < MEMORY_BUDGET, (peak, cfg)
    assert not isinstance(feats, OmniforgeError), feats
    assert feats.shape == (1, fe.n_mels, fe.num_frames) and np.isfinite(feats).all()


def test_the_largest_front_end_the_limits_allow_stays_in_bounds():
    """Each size at its own limit is refused when their product is beyond ``MAX_MEL_WORK``; the
    largest accepted front end, fed the longest recording, stays within the memory budget."""
    for fe in (
        {"sample_rate": 16000, "n_fft": 65536, "hop_length": 65536, "n_mels": 64, "num_frames": 100_000},
        {"sample_rate": 16000, "n_fft": 65536, "hop_length": 160, "n_mels": 1024, "num_frames": 8},
    ):
        with pytest.raises(ConfigError, match=rf"more than {M.MAX_MEL_WORK}"):
            M.AudioFrontEnd.from_config(fe)
    fe = M.AudioFrontEnd.from_config(
        {"sample_rate": 1000, "n_fft": 65536, "hop_length": 65536, "n_mels": 64, "num_frames": 64}
    )
    wave = np.zeros(M.MAX_AUDIO_SAMPLES, np.float32)  # 2^24 samples at 384 kHz: what load_wav allows
    feats, peak = peak_bytes(lambda: M.audio_features(wave, 384_000, fe))
    assert feats.shape == (1, 64, 64) and peak < MEMORY_BUDGET, peak


# ---- the configs inside a build, cut off or swapped ---------------------------------------------
CONFIG_USES = {
    "image_scheduler": lambda cfg: make_scheduler("ddim", cfg),
    "image_vae": M.vae_scaling,
    "vocoder": M.check_vocoder_config,
    "image_preprocessor": M.ImagePreprocessing.from_config,
    "audio_frontend": M.AudioFrontEnd.from_config,
}


@FEW
@given(role=st.sampled_from(sorted(CONFIG_USES)), cut=st.floats(0, 0.999))
def test_a_cut_off_config_in_a_build_gets_one_sentence(hostile, role, cut):
    rel = f"configs/{role}.json"
    data = (hostile / rel).read_bytes()
    put(hostile, rel, data[: int(len(data) * cut)])
    before = snapshot(hostile)
    got = outcome(lambda: CONFIG_USES[role](Build(hostile).json(role)))
    assert isinstance(got, ManifestError) and "is not valid JSON" in str(got), got
    assert snapshot(hostile) == before
    put(hostile, rel, data)


@pytest.mark.parametrize(
    "content",
    [b"[" * 100_000 + b"]" * 100_000, b'{"scaling_factor": 1' + b"0" * 5000 + b"}"],
    ids=["deep", "digits"],
)
def test_a_config_json_cannot_parse_gets_one_sentence(hostile, content):
    """Nesting beyond the parser's recursion and numbers beyond int()'s 4,300 digits."""
    put(hostile, "configs/image_vae.json", content)
    got = outcome(lambda: M.vae_scaling(Build(hostile).json("image_vae")))
    assert isinstance(got, ManifestError) and "is not valid JSON" in str(got), got


@pytest.mark.parametrize("role", sorted(CONFIG_USES))
@pytest.mark.parametrize("other", sorted(CONFIG_USES))
def test_a_config_of_another_kind_is_used_or_refused_in_one_sentence(hostile, configs, role, other):
    """A build whose scheduler config is its vocoder's (and so on): a config that names its class
    must name a scheduler's; otherwise what the foreign config lacks takes its default, or it is
    refused."""
    rel = f"configs/{role}.json"
    put(hostile, rel, configs[other])
    got = outcome(lambda: CONFIG_USES[role](Build(hostile).json(role)))
    if role == "image_scheduler" and "_class_name" in configs[other] and other != role:
        assert isinstance(got, ConfigError) and "is not a scheduler's" in str(got), got


@pytest.mark.parametrize("rel", ["llm/tokenizer.json", "llm/tokenizer_config.json"])
@pytest.mark.parametrize("cut", [0, 0.5, "nested"])
def test_a_cut_off_tokenizer_file_gets_one_sentence(hostile, rel, cut):
    data = (hostile / rel).read_bytes()
    put(hostile, rel, b"[" * 100_000 if cut == "nested" else data[: int(len(data) * cut)])
    before = snapshot(hostile)
    got = outcome(lambda: Pipeline(hostile).llm.generate("A dog", GenerationConfig(max_new_tokens=1)))
    assert isinstance(got, ManifestError), got
    assert snapshot(hostile) == before
