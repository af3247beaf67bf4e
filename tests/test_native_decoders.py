# ruff: noqa: F811  (the native fixtures are imported from tests/test_native.py by name)
"""The native core's diffusion decoders: the C++ schedulers step by step against
``omniforge.runtime.schedulers`` (through ``omniforge_scheduler``, which compiles
``src/schedulers.cpp`` alone), their config refusals in the Python runtime's words, and
``of_decoder_run`` (through ctypes) against ``Pipeline.decode_image`` / ``decode_video`` /
``decode_audio`` with the same conditioning and initial latents, for each scheduler; the build's
unconditional embedding; builds the native core refuses (no decoder, CogVideoX, bad configs) and
bad requests, each a status and one sentence."""

from __future__ import annotations

import ctypes
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.test_native import (  # noqa: F401  (fixtures)
    _run,
    native_build,
    native_cache,
    ort_headers,
    ort_library,
)

SCHEDULERS = ("ddim", "euler", "dpm")
MODALITIES = ("image", "video", "audio")
P = ctypes.c_void_p
F = ctypes.POINTER(ctypes.c_float)


class _BuildOptions(ctypes.Structure):
    _fields_ = [
        ("ort_library", ctypes.c_char_p),
        ("threads", ctypes.c_int32),
        ("skip_verify", ctypes.c_int32),
    ]


class _DecoderOptions(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("steps", ctypes.c_int32),
        ("guidance_scale", ctypes.c_double),
        ("scheduler", ctypes.c_char_p),
        ("seed", ctypes.c_uint64),
    ]


def _library(native: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(native / "libomniforge.so"))
    i32, size = ctypes.c_int32, ctypes.c_size_t
    shape_fn = (i32, [P, ctypes.POINTER(ctypes.c_int64), size, ctypes.POINTER(size)])
    for name, (restype, argtypes) in {
        "of_build_open": (i32, [ctypes.c_char_p, ctypes.POINTER(_BuildOptions), ctypes.POINTER(P)]),
        "of_build_close": (None, [P]),
        "of_build_last_error": (ctypes.c_char_p, [P]),
        "of_status_name": (ctypes.c_char_p, [i32]),
        "of_decoder_open": (i32, [P, ctypes.c_char_p, ctypes.POINTER(P)]),
        "of_decoder_close": (None, [P]),
        "of_decoder_last_error": (ctypes.c_char_p, [P]),
        "of_decoder_latent_shape": shape_fn,
        "of_decoder_conditioning_shape": shape_fn,
        "of_decoder_options_init": (None, [ctypes.POINTER(_DecoderOptions)]),
        "of_decoder_run": (
            i32,
            [P, F, size, F, F, size, ctypes.POINTER(_DecoderOptions), ctypes.POINTER(P)],
        ),
        "of_media_data": (F, [P, ctypes.POINTER(size)]),
        "of_media_shape": (ctypes.POINTER(ctypes.c_int64), [P, ctypes.POINTER(size)]),
        "of_media_sample_rate": (i32, [P]),
        "of_media_free": (None, [P]),
    }.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


class NativeDecoders:
    """A build opened by libomniforge, its decoders opened on first use."""

    def __init__(self, lib: ctypes.CDLL, build: Path, ort_library: str) -> None:
        self.lib = lib
        self.build = P()
        opts = _BuildOptions(ort_library.encode(), 1, 0)
        st = lib.of_build_open(str(build).encode(), ctypes.byref(opts), ctypes.byref(self.build))
        assert st == 0, lib.of_build_last_error(self.build).decode()
        self.decoders: dict[str, P] = {}

    def open(self, modality: str) -> tuple[str, str]:
        """(status name, the build's sentence) of opening ``modality``'s decoder."""
        d = P()
        st = self.lib.of_decoder_open(self.build, modality.encode(), ctypes.byref(d))
        if st == 0:
            self.decoders[modality] = d
        return self.lib.of_status_name(st).decode(), self.lib.of_build_last_error(self.build).decode()

    def decoder(self, modality: str) -> P:
        if modality not in self.decoders:
            st, why = self.open(modality)
            assert st == "OF_OK", why
        return self.decoders[modality]

    def _shape(self, fn, modality: str) -> tuple[int, ...]:
        buf, rank = (ctypes.c_int64 * 16)(), ctypes.c_size_t()
        assert fn(self.decoder(modality), buf, 16, ctypes.byref(rank)) == 0
        return tuple(buf[: rank.value])

    def latent_shape(self, modality: str) -> tuple[int, ...]:
        return self._shape(self.lib.of_decoder_latent_shape, modality)

    def conditioning_shape(self, modality: str) -> tuple[int, ...]:
        return self._shape(self.lib.of_decoder_conditioning_shape, modality)

    def run(
        self,
        modality: str,
        cond: np.ndarray,
        latents: np.ndarray | None = None,
        uncond: np.ndarray | None = None,
        steps: int = 3,
        guidance: float = 7.5,
        scheduler: str = "ddim",
        seed: int = 0,
        n_cond: int | None = None,
    ) -> tuple[str, str, np.ndarray | None, int]:
        """(status name, the decoder's sentence, the medium, its sample rate)."""
        d = self.decoder(modality)
        o = _DecoderOptions()
        self.lib.of_decoder_options_init(ctypes.byref(o))
        o.steps, o.guidance_scale, o.scheduler, o.seed = steps, guidance, scheduler.encode(), seed
        arrays = [None if a is None else np.ascontiguousarray(a, np.float32) for a in (cond, uncond, latents)]
        c, u, x = (None if a is None else a.ctypes.data_as(F) for a in arrays)
        m = P()
        st = self.lib.of_decoder_run(
            d,
            c,
            arrays[0].size if n_cond is None else n_cond,
            u,
            x,
            0 if latents is None else arrays[2].size,
            ctypes.byref(o),
            ctypes.byref(m),
        )
        why = self.lib.of_decoder_last_error(d).decode()
        if st != 0:
            assert not m.value
            return self.lib.of_status_name(st).decode(), why, None, 0
        n, rank = ctypes.c_size_t(), ctypes.c_size_t()
        data = self.lib.of_media_data(m, ctypes.byref(n))
        shape = self.lib.of_media_shape(m, ctypes.byref(rank))
        out = np.ctypeslib.as_array(data, (n.value,)).reshape(tuple(shape[: rank.value])).copy()
        rate = self.lib.of_media_sample_rate(m)
        self.lib.of_media_free(m)
        return "OF_OK", why, out, rate

    def close(self) -> None:
        for d in self.decoders.values():
            self.lib.of_decoder_close(d)
        self.lib.of_build_close(self.build)


@pytest.fixture(scope="module")
def native(native_build: Path, default_build: Path, ort_library: str):
    n = NativeDecoders(_library(native_build), default_build, ort_library)
    yield n
    n.close()


@pytest.fixture(scope="module")
def pipe(default_build: Path):
    from omniforge.runtime.engine import SessionConfig
    from omniforge.runtime.pipeline import Pipeline

    return Pipeline(default_build, session=SessionConfig(threads=1))


def _one_sentence(why: str) -> None:
    assert why and "\n" not in why


# ---- the schedulers alone ----------------------------------------------------------------------


def _schedule_cases(default_build: Path) -> list[tuple[str, dict, int]]:
    base = json.loads((default_build / "configs" / "image_scheduler.json").read_text())
    cases = []
    for name in SCHEDULERS:
        for spacing in ("leading", "trailing", "linspace"):
            for pred in ("epsilon", "v_prediction"):
                for stored in (True, False):
                    c = {**base, "timestep_spacing": spacing, "prediction_type": pred}
                    if not stored:  # computed from the betas (the linear schedule for these)
                        c.pop("alphas_cumprod")
                        c["beta_schedule"] = "linear" if spacing == "trailing" else "scaled_linear"
                    if name == "ddim" and spacing == "trailing":
                        c.update(clip_sample=True, clip_sample_range=0.8, set_alpha_to_one=True)
                    for steps in (1, 2, 3, 8):
                        cases.append((name, c, steps))
    return cases


def test_schedulers_step_as_the_numpy_schedulers(native_build: Path, default_build: Path) -> None:
    """Timesteps, initial sigma, step range, scale_model_input and step: DDIM and Euler bit for bit;
    DPM-Solver++ within float32 rounding (numpy's float32 log and float64 exp are SIMD routines
    that differ from the C library's in the last bit for a few percent of arguments)."""
    from omniforge.runtime.schedulers import make_scheduler

    rs = np.random.default_rng(0)
    cases, wants = [], []
    for name, cfg, steps in _schedule_cases(default_build):
        x = (rs.normal(size=48) * 3).astype(np.float32)
        outs = [rs.normal(size=48).astype(np.float32) for _ in range(steps)]
        s = make_scheduler(name, cfg)
        s.set_timesteps(steps)
        y, scaled, samples = x.copy(), [], []
        for i in range(steps):
            scaled.append(s.scale_model_input(y, i))
            y = s.step(outs[i], i, y)
            samples.append(y)
        wants.append((s, scaled, samples))
        cases.append(
            {
                "config": cfg,
                "scheduler": name,
                "steps": steps,
                "sample": x.tolist(),
                "outputs": [o.tolist() for o in outs],
            }
        )
    r = _run([str(native_build / "omniforge_scheduler")], input=json.dumps(cases))
    assert r.returncode == 0, r.stderr[-3000:]
    worst = 0.0
    for case, (s, scaled, samples), got in zip(cases, wants, json.loads(r.stdout), strict=True):
        what = f"{case['scheduler']} {case['config']['timestep_spacing']} {case['config']['prediction_type']} {case['steps']}"
        assert "error" not in got, (what, got)
        assert got["timesteps"] == [float(t) for t in s.timesteps], what
        assert got["init_noise_sigma"] == s.init_noise_sigma and got["max_steps"] == s.max_steps, what
        for a, b in zip(got["scaled"] + got["samples"], scaled + samples, strict=True):
            a = np.asarray(a, np.float32)
            if case["scheduler"] == "dpm":
                err = float(np.abs(a - b).max() / max(1e-6, float(np.abs(b).max())))
                worst = max(worst, err)
                assert err < 2e-6, what
            else:
                assert np.array_equal(a, b), (what, float(np.abs(a - b).max()))
    assert worst < 2e-6


BAD_CONFIGS = [
    {"thresholding": True},
    {"use_karras_sigmas": True},
    {"trained_betas": [0.1, 0.2]},
    {"_class_name": "AutoencoderKL"},
    {"num_train_timesteps": 0},
    {"num_train_timesteps": 12.5},
    {"num_train_timesteps": True},
    {"beta_start": 0.5, "beta_end": 0.1},
    {"beta_end": "0.02"},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"prediction_type": "sample"},
    {"timestep_spacing": "karras"},
    {"steps_offset": 1000},
    {"set_alpha_to_one": 1},
    {"clip_sample_range": 0},
    {"alphas_cumprod": "0.9"},
    {"alphas_cumprod": [0.9, 0.8]},
    {"alphas_cumprod": [0.99] * 999 + [True]},
    {"alphas_cumprod": [0.99] * 1000},
    {"alphas_cumprod": [0.5] + [1e-30] * 999},
    {"beta_start": 0.9, "beta_end": 0.95, "alphas_cumprod": []},
]


def test_scheduler_config_refusals_are_the_python_runtimes(native_build: Path, default_build: Path) -> None:
    from omniforge.errors import ConfigError
    from omniforge.runtime.schedulers import make_scheduler

    base = json.loads((default_build / "configs" / "image_scheduler.json").read_text())
    cases, wants = [], []
    for change in BAD_CONFIGS:
        cfg = {**base, **change}
        with pytest.raises(ConfigError) as exc:
            make_scheduler("ddim", cfg)
        wants.append(str(exc.value).replace("the numpy schedulers", "the native schedulers"))
        cases.append({"config": cfg, "scheduler": "ddim", "steps": 2, "sample": [], "outputs": []})
    # step counts: beyond the range, and a config leaving DPM no usable count
    for name, cfg, steps in (
        ("ddim", base, 1000),
        ("euler", {**base, "timestep_spacing": "linspace"}, 1001),
        ("dpm", {**base, "steps_offset": 999}, 1),
    ):
        with pytest.raises(ConfigError) as exc:
            make_scheduler(name, cfg).set_timesteps(steps)
        wants.append(str(exc.value))
        cases.append({"config": cfg, "scheduler": name, "steps": steps, "sample": [], "outputs": []})
    r = _run([str(native_build / "omniforge_scheduler")], input=json.dumps(cases))
    assert r.returncode == 0, r.stderr[-3000:]
    for want, got in zip(wants, json.loads(r.stdout), strict=True):
        assert got.get("error") == want


# ---- the decoders against the Python runtime -----------------------------------------------------


def _inputs(native: NativeDecoders, pipe, modality: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rs = np.random.default_rng(seed)
    assert native.latent_shape(modality) == pipe.latent_shape(modality)
    cond = rs.normal(size=native.conditioning_shape(modality)).astype(np.float32)
    return cond, rs.normal(size=pipe.latent_shape(modality)).astype(np.float32)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("modality", MODALITIES)
def test_decoder_equals_the_python_runtime(
    native: NativeDecoders, pipe, modality: str, scheduler: str
) -> None:
    """The same conditioning and initial latents through of_decoder_run and Pipeline.decode_<m>:
    3 steps with classifier-free guidance (the default unconditional input: zeros here)."""
    from omniforge.runtime.pipeline import DiffusionConfig

    cond, latents = _inputs(
        native, pipe, modality, seed=MODALITIES.index(modality) * 10 + SCHEDULERS.index(scheduler)
    )
    if modality == "image":  # the image decoder's output is not saturated for this size of input
        cond, latents = cond * 0.3, latents * 0.5
    want = getattr(pipe, f"decode_{modality}")(cond, DiffusionConfig(steps=3, scheduler=scheduler), latents)
    st, why, got, rate = native.run(modality, cond, latents, steps=3, scheduler=scheduler)
    assert st == "OF_OK", why
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-4
    assert float(np.std(want)) > 1e-3  # a medium, not a constant
    assert rate == (pipe.sample_rate if modality == "audio" else 0)


def test_decoder_without_guidance_and_with_two_steps(native: NativeDecoders, pipe) -> None:
    from omniforge.runtime.pipeline import DiffusionConfig

    cond, latents = _inputs(native, pipe, "audio", seed=99)
    for g, steps, sched in ((1.0, 2, "euler"), (0.0, 2, "dpm"), (3.0, 1, "ddim")):
        want = pipe.decode_audio(
            cond, DiffusionConfig(steps=steps, guidance_scale=g, scheduler=sched), latents
        )
        st, why, got, _ = native.run("audio", cond, latents, steps=steps, guidance=g, scheduler=sched)
        assert st == "OF_OK", why
        assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("modality", MODALITIES)
def test_seeded_noise_is_the_python_runtimes(native: NativeDecoders, pipe, modality: str) -> None:
    """Without latents the noise comes from the seed as ``Pipeline.initial_latents`` draws it
    (numpy's PCG64 stream and its ziggurat normal): the medium equals the Python runtime's for that
    seed; the same seed gives the same medium, another seed another one."""
    from omniforge.runtime.pipeline import DiffusionConfig

    cond, _ = _inputs(native, pipe, modality, seed=5)
    if modality == "image":
        cond = cond * 0.3
    runs = [native.run(modality, cond, None, steps=2, seed=s)[2] for s in (11, 11, 12)]
    assert np.array_equal(runs[0], runs[1]) and not np.array_equal(runs[0], runs[2])
    for seed, got in ((11, runs[0]), (12, runs[2])):
        want = getattr(pipe, f"decode_{modality}")(
            cond, DiffusionConfig(steps=2, seed=seed), pipe.initial_latents(modality, seed)
        )
        assert np.abs(got - want).max() <= 1e-4


def _rewrite(build: Path, rel: str, data: bytes) -> None:
    """Replace an artifact of a build copy and its size and SHA-256 in the manifest."""
    (build / rel).write_bytes(data)
    manifest = json.loads((build / "manifest.json").read_text())
    for a in manifest["artifacts"]:
        if a["path"] == rel:
            a.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    (build / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _with_uncond(default_build: Path, out: Path, arr: np.ndarray) -> Path:
    import io

    shutil.copytree(default_build, out)
    buf = io.BytesIO()
    np.save(buf, arr)
    rel = "configs/image_uncond.npy"
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["image_uncond"] = rel
    manifest["artifacts"].append({"path": rel, "sha256": "0" * 64, "size": 0})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    _rewrite(out, rel, buf.getvalue())
    return out


def test_the_builds_unconditional_embedding(
    native_build: Path, default_build: Path, ort_library: str, tmp_path: Path
) -> None:
    """A build carrying image_uncond (float64 here, as a float16 or float32 one is read too): the
    native default is that embedding, as the Python runtime's; a caller's own unconditional
    input replaces it; one of the wrong size is refused at open in the Python runtime's words."""
    from omniforge.errors import ManifestError
    from omniforge.runtime.engine import SessionConfig
    from omniforge.runtime.pipeline import DiffusionConfig, Pipeline

    shape = (1, 77, 32)
    uncond = np.random.default_rng(1).normal(size=shape) * 0.5
    build = _with_uncond(default_build, tmp_path / "uncond", uncond)
    pipe = Pipeline(build, session=SessionConfig(threads=1))
    native = NativeDecoders(_library(native_build), build, ort_library)
    try:
        rs = np.random.default_rng(2)
        cond = (rs.normal(size=shape) * 0.3).astype(np.float32)
        latents = (rs.normal(size=pipe.latent_shape("image")) * 0.5).astype(np.float32)
        want = pipe.decode_image(cond, DiffusionConfig(steps=2, scheduler="euler"), latents)
        st, why, got, _ = native.run("image", cond, latents, steps=2, scheduler="euler")
        assert st == "OF_OK", why
        assert np.abs(got - want).max() <= 1e-4
        st, why, given, _ = native.run(
            "image", cond, latents, uncond.astype(np.float32), steps=2, scheduler="euler"
        )
        assert st == "OF_OK" and np.array_equal(given, got)
        _, _, zeros, _ = native.run(
            "image", cond, latents, np.zeros(shape, np.float32), steps=2, scheduler="euler"
        )
        assert np.abs(zeros - got).max() > 1e-3
    finally:
        native.close()
    bad = _with_uncond(default_build, tmp_path / "bad", np.zeros((1, 76, 32), np.float32))
    with pytest.raises(ManifestError) as exc:
        Pipeline(bad).unconditional("image", np.zeros(shape, np.float32))
    native = NativeDecoders(_library(native_build), bad, ort_library)
    try:
        assert native.open("image") == ("OF_ERR_MANIFEST", str(exc.value))
    finally:
        native.close()


def _edited(default_build: Path, out: Path, edit) -> Path:
    shutil.copytree(default_build, out)
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest, out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def _without_audio(m: dict, _out: Path) -> None:
    del m["stages"]["audio_unet"]
    m["pipeline"]["stages"] = [s for s in m["pipeline"]["stages"] if s["name"] != "audio_unet"]


def _cogvideox(m: dict, _out: Path) -> None:
    for s in m["pipeline"]["stages"]:
        if s["name"] == "video_unet":
            s["component"] = "decoders.video.transformer"


def test_builds_without_a_native_decoder_are_refused_in_one_sentence(
    native_build: Path, default_build: Path, ort_library: str, tmp_path: Path
) -> None:
    lib = _library(native_build)
    for name, edit, modality, want in (
        (
            "no-audio",
            _without_audio,
            "audio",
            "this build cannot generate 'audio': it has no 'audio_unet' stage",
        ),
        (
            "cogvideox",
            _cogvideox,
            "video",
            "the native core decodes UNet decoders; CogVideoX runs in the Python runtime",
        ),
    ):
        native = NativeDecoders(lib, _edited(default_build, tmp_path / name, edit), ort_library)
        try:
            assert native.open(modality) == ("OF_ERR_UNSUPPORTED", want)
            assert native.open("image")[0] == "OF_OK"  # the other decoders still open
        finally:
            native.close()


@pytest.mark.parametrize(
    "role, change",
    [
        ("image_scheduler", {"prediction_type": "sample"}),
        ("image_scheduler", {"thresholding": True}),
        ("image_vae", {"shift_factor": 0.5}),
        ("image_vae", {"scaling_factor": 0}),
    ],
)
def test_config_refusals_at_open_are_the_python_runtimes(
    native_build: Path, default_build: Path, ort_library: str, tmp_path: Path, role: str, change: dict
) -> None:
    from omniforge.errors import ConfigError
    from omniforge.runtime.pipeline import DiffusionConfig, Pipeline

    def edit(m: dict, out: Path) -> None:
        rel = m["files"][role]
        cfg = {**json.loads((out / rel).read_text()), **change}
        data = json.dumps(cfg).encode()
        (out / rel).write_bytes(data)
        for a in m["artifacts"]:
            if a["path"] == rel:
                a.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))

    build = _edited(default_build, tmp_path / "b", edit)
    with pytest.raises(ConfigError) as exc:
        Pipeline(build).check_steps("image", DiffusionConfig())
    want = str(exc.value).replace("the numpy schedulers", "the native schedulers")
    native = NativeDecoders(_library(native_build), build, ort_library)
    try:
        assert native.open("image") == ("OF_ERR_MANIFEST", want)
    finally:
        native.close()


def test_bad_requests_get_a_status_and_the_python_runtimes_sentence(native: NativeDecoders, pipe) -> None:
    from omniforge.errors import ConfigError
    from omniforge.runtime.pipeline import DiffusionConfig

    cond, latents = _inputs(native, pipe, "image", seed=3)
    for kw, options in (
        ({"steps": 1000}, {"steps": 1000}),
        ({"steps": 0}, {"steps": 0}),
        ({"scheduler": "heun"}, {"scheduler": "heun"}),
        ({"guidance_scale": -1.0}, {"guidance": -1.0}),
        ({"guidance_scale": 1001.0}, {"guidance": 1001.0}),
    ):
        with pytest.raises(ConfigError) as exc:
            pipe.check_steps("image", DiffusionConfig(**kw))
        st, why, _, _ = native.run("image", cond, latents, **options)
        assert (st, why) == ("OF_ERR_INVALID_ARGUMENT", str(exc.value))
    for what, run, status, part in (
        (
            "a short conditioning",
            dict(n_cond=cond.size - 1),
            "OF_ERR_INPUT",
            "the image conditioning must hold 2464 floats",
        ),
        (
            "NaN latents",
            dict(latents=np.full_like(latents, np.nan)),
            "OF_ERR_INPUT",
            "image latents hold NaN or infinite values",
        ),
        (
            "latents of another shape",
            dict(latents=latents[..., :8]),
            "OF_ERR_INPUT",
            "image latents must have shape (1, 4, 16, 16)",
        ),
        (
            "an infinite unconditional input",
            dict(uncond=np.full_like(cond, np.inf)),
            "OF_ERR_INPUT",
            "the image unconditional input holds NaN",
        ),
    ):
        args = {"latents": latents, **run}
        st, why, _, _ = native.run("image", cond, **args)
        assert st == status and why.startswith(part), what
        _one_sentence(why)
    for modality, status, part in (
        ("text", "OF_ERR_INVALID_ARGUMENT", "unknown modality 'text'"),
        ("", "OF_ERR_INVALID_ARGUMENT", "unknown modality ''"),
    ):
        st, why = native.open(modality)
        assert st == status and why.startswith(part)
        _one_sentence(why)
