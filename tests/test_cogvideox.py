"""CogVideoX as the video decoder: numpy schedulers against diffusers' step by step, the exported
transformer and causal VAE against PyTorch, and the runtime's frames against ``CogVideoXPipeline``,
with a tiny seeded CogVideoX written by diffusers' ``save_pretrained``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from omniforge.errors import ConfigError
from omniforge.model.families import COGVIDEOX_LATENT as LATENT
from omniforge.model.families import write_cogvideox

TEXT_LENGTH, TEXT_DIM = 77, 32  # the tiny default's video output projector gives 77 x 32

SCHEDULER_CASES = [  # (class, options): CogVideoX-2b's and -5b's configs, then the other branches
    ("CogVideoXDDIMScheduler", {}),
    ("CogVideoXDPMScheduler", {}),
    (
        "CogVideoXDDIMScheduler",
        {
            "prediction_type": "epsilon",
            "rescale_betas_zero_snr": False,
            "timestep_spacing": "leading",
            "steps_offset": 1,
            "set_alpha_to_one": False,
        },
    ),
    (
        "CogVideoXDPMScheduler",
        {
            "beta_schedule": "linear",
            "beta_start": 0.0001,
            "beta_end": 0.02,
            "timestep_spacing": "linspace",
            "snr_shift_scale": 1.0,
            "rescale_betas_zero_snr": False,
        },
    ),
    ("CogVideoXDDIMScheduler", {"prediction_type": "sample", "timestep_spacing": "linspace"}),
]


def _scheduler_config(cls: str, options: dict) -> dict:
    import diffusers

    base = {
        "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
        "snr_shift_scale": 3.0,
    }
    return json.loads(getattr(diffusers, cls)(**{**base, **options}).to_json_string())


@pytest.mark.parametrize("cls,options", SCHEDULER_CASES)
@pytest.mark.parametrize("stored_table", [True, False])
def test_scheduler_matches_diffusers_step_by_step(cls: str, options: dict, stored_table: bool) -> None:
    import diffusers

    from omniforge.export.cogvideox import scheduler_table
    from omniforge.runtime.cogvideox import make_cogvideox_scheduler

    cfg = _scheduler_config(cls, options)
    ref = getattr(diffusers, cls).from_config(cfg)
    ours_cfg = dict(cfg)
    if stored_table:
        ours_cfg["alphas_cumprod"] = scheduler_table(ours_cfg)
    name = "dpm" if "DPM" in cls else "ddim"
    g_ref, g_ours = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    ours = make_cogvideox_scheduler(name, ours_cfg, noise=lambda s: torch.randn(s, generator=g_ours).numpy())
    steps = 7
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 4, 4, 4)).astype(np.float32)
    xt, old = torch.from_numpy(x.copy()), None
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        out = rng.standard_normal(x.shape).astype(np.float32)
        if name == "dpm":
            back = ref.timesteps[i - 1] if i > 0 else None
            xt, old = ref.step(torch.from_numpy(out), old, t, back, xt, generator=g_ref, return_dict=False)
        else:
            xt = ref.step(torch.from_numpy(out), t, xt, return_dict=False)[0]
        x = ours.step(out, i, x)
        scale = max(1.0, float(xt.abs().max()))
        worst = max(worst, float(np.abs(x - xt.numpy()).max()) / scale)
        assert x.dtype == np.float32
    assert worst <= 1e-5, worst


def test_scheduler_refuses_what_it_does_not_implement() -> None:
    from omniforge.runtime.cogvideox import make_cogvideox_scheduler

    cfg = _scheduler_config("CogVideoXDDIMScheduler", {})
    cases = [
        ("ddim", {**cfg, "beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"),
        ("ddim", {**cfg, "trained_betas": [0.1] * 1000}, "trained_betas"),
        ("ddim", {**cfg, "_class_name": "DDIMScheduler"}, "not a CogVideoX scheduler"),
        ("euler", cfg, "ddim or dpm"),
        ("dpm", {**cfg, "prediction_type": "epsilon"}, "zero terminal SNR"),
    ]
    for name, bad, words in cases:
        with pytest.raises(ConfigError, match=words) as info:
            make_cogvideox_scheduler(name, bad)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="usable trailing schedule"):
        make_cogvideox_scheduler("ddim", cfg).set_timesteps(1001)


@pytest.fixture(scope="module")
def tiny_default(tmp_path_factory) -> Path:
    from omniforge.model.tiny import create_default

    return create_default(tmp_path_factory.mktemp("tiny") / "default")


def _model_folder(root: Path, base: Path, **decoder: object) -> Path:
    """A NExT-GPT folder of the tiny default's LLM and video output projector, and a CogVideoX decoder."""
    folder = root / "model"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    desc = json.loads((base / "nextgpt.json").read_text())
    for part in ("llm", "output_projectors/video"):
        shutil.copytree(base / part, folder / part)
    write_cogvideox(folder / "video_decoder", **decoder)
    keep = {"format", "format_version", "name", "llm", "max_context", "signal_tokens", "placeholders"}
    desc = {k: v for k, v in desc.items() if k in keep}
    desc.update(
        output_projectors={"video": "output_projectors/video"},
        decoders={"video": "video_decoder"},
        signal_tokens={"video": desc["signal_tokens"]["video"]},
        placeholders={},
    )
    (folder / "nextgpt.json").write_text(json.dumps(desc))
    return folder


@pytest.fixture(scope="module")
def cog_builds(tmp_path_factory, quick_quant, tiny_default) -> dict[str, Path]:
    """``omniforge build`` of the model folder at fp32 and int8, on one cache."""
    from omniforge.build import BuildOptions, build

    root = tmp_path_factory.mktemp("cogvideox")
    model = _model_folder(root, tiny_default)
    out = {"model": model}
    for precision in ("fp32", "int8"):
        opts = BuildOptions(precision=precision, cache=root / "cache", quantize=quick_quant)
        build(model, root / precision, opts, log=lambda _m: None)
        out[precision] = root / precision
    return out


def test_stages_describe_the_fixed_shape(cog_builds) -> None:
    from omniforge.runtime.build import Build

    spec = Build(cog_builds["fp32"]).pipeline
    frames, c, h, w = LATENT
    den, vae = spec.stage("video_unet"), spec.stage("video_vae_decoder")
    assert den.component == "decoders.video.transformer"
    assert den.inputs[0].concrete_shape({"batch": 1, "frames": frames}) == (1, frames, c, h, w)
    assert den.inputs[2].shape == ("batch", TEXT_LENGTH, TEXT_DIM)
    assert vae.outputs[0].shape == ("batch", 3, (frames - 1) * 4 + 1, h * 4, w * 4)


def test_export_parity_at_two_shapes(cog_builds) -> None:
    report = {r["stage"]: r for r in json.loads((cog_builds["fp32"] / "parity.json").read_text())}
    for stage in ("video_unet", "video_vae_decoder"):
        checks = report[stage]["parity"]
        assert report[stage]["passed"] and len({json.dumps(p["point"]) for p in checks}) >= 2
        assert max(p["max_abs"] for p in checks) <= 1e-4


def test_sincos_transformer_exports(tmp_path: Path, tiny_default: Path) -> None:
    """CogVideoX-2b's layout: sin-cos positions instead of rotary tables."""
    from omniforge.export.exporter import ExportOptions, export_pipeline

    model = _model_folder(tmp_path, tiny_default, rotary=False)
    _, reports = export_pipeline(
        model, tmp_path / "b", ExportOptions(stages=["video_unet"]), log=lambda _m: None
    )
    assert reports[0].passed and len(reports[0].parity) >= 2
    assert max(p.max_abs for p in reports[0].parity) <= 1e-4


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_runtime_frames_equal_diffusers_pipeline(cog_builds, scheduler: str) -> None:
    """The runtime's frames equal ``CogVideoXPipeline``'s fed the same embeddings and latents (the
    DPM scheduler's injected noise drawn from the same torch generator as diffusers')."""
    import diffusers
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel

    from omniforge.runtime import cogvideox
    from omniforge.runtime.pipeline import DiffusionConfig, Pipeline

    folder = cog_builds["model"] / "video_decoder"
    pipe = Pipeline(cog_builds["fp32"])
    rng = np.random.default_rng(5)
    cond = rng.standard_normal((1, TEXT_LENGTH, TEXT_DIM)).astype(np.float32)
    latents = pipe.initial_latents("video", seed=11)
    cfg = DiffusionConfig(steps=4, guidance_scale=6.0, scheduler=scheduler)
    g_ours = torch.Generator().manual_seed(7)
    ours = cogvideox.decode_video(
        pipe, cond, cfg, latents, noise=lambda s: torch.randn(s, generator=g_ours).numpy()
    )
    cls = {"ddim": "CogVideoXDDIMScheduler", "dpm": "CogVideoXDPMScheduler"}[scheduler]
    ref_pipe = CogVideoXPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=AutoencoderKLCogVideoX.from_pretrained(folder / "vae"),
        transformer=CogVideoXTransformer3DModel.from_pretrained(folder / "transformer"),
        scheduler=getattr(diffusers, cls).from_pretrained(folder / "scheduler"),
    )
    ref_pipe.set_progress_bar_config(disable=True)
    frames, _, h, w = LATENT
    ref = ref_pipe(
        prompt_embeds=torch.from_numpy(cond),
        negative_prompt_embeds=torch.zeros_like(torch.from_numpy(cond)),
        latents=torch.from_numpy(latents),
        num_inference_steps=4,
        guidance_scale=6.0,
        height=h * 4,
        width=w * 4,
        num_frames=(frames - 1) * 4 + 1,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).frames[0]
    assert ours.shape == ref.shape == ((frames - 1) * 4 + 1, h * 4, w * 4, 3)
    assert float(np.abs(ours - ref).max()) <= 1e-3
    assert float(ref.std()) > 0.01  # the frames carry signal, not a constant
    if scheduler == "ddim":  # the deterministic scheduler: Pipeline.decode_video gives the same frames
        np.testing.assert_array_equal(pipe.decode_video(cond, cfg, latents), ours)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_build_runs_to_frames(cog_builds, precision: str, tmp_path: Path) -> None:
    from omniforge.runtime.pipeline import DiffusionConfig, Pipeline

    for scheduler in ("ddim", "dpm"):
        result = Pipeline(cog_builds[precision]).run(
            "A boat on a lake",
            force=["video"],
            diffusion=DiffusionConfig(steps=2, scheduler=scheduler),
        )
        frames, _, h, w = LATENT
        (video,) = result.videos
        assert video.shape == ((frames - 1) * 4 + 1, h * 4, w * 4, 3) and np.isfinite(video).all()
    written = result.save(tmp_path / "out")
    assert tmp_path / "out" / "video_0.gif" in written
    assert len(list((tmp_path / "out" / "video_0_frames").glob("*.png"))) == (frames - 1) * 4 + 1
    with pytest.raises(ConfigError, match="ddim or dpm"):
        Pipeline(cog_builds[precision]).run(
            "x", force=["video"], diffusion=DiffusionConfig(scheduler="euler")
        )


def test_projector_mismatch_is_refused(tmp_path: Path, tiny_default: Path) -> None:
    from omniforge.pipeline.describe import describe
    from omniforge.pipeline.model_config import load_model_config

    model = _model_folder(tmp_path, tiny_default, text_dim=48)
    with pytest.raises(
        ConfigError, match="77 x 32 conditioning but the CogVideoX transformer takes 77 x 48"
    ) as info:
        describe(load_model_config(model))
    assert "\n" not in str(info.value)


def test_runtime_needs_no_torch(cog_builds, tmp_path: Path) -> None:
    """The CogVideoX path (both schedulers) runs in a process where importing torch fails."""
    from tests.test_import_boundaries import run_blocked

    res = run_blocked(
        "from omniforge.runtime.pipeline import Pipeline, DiffusionConfig\n"
        f"p = Pipeline({str(cog_builds['fp32'])!r})\n"
        "for s in ('ddim', 'dpm'):\n"
        "    r = p.run('A boat', force=['video'], diffusion=DiffusionConfig(steps=2, scheduler=s))\n"
        f"r.save({str(tmp_path / 'out')!r})\n"
        "assert not any(m.split('.')[0] in {'torch', 'transformers', 'diffusers'} for m in sys.modules)\n"
        "print('frames', r.videos[0].shape[0])\n"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"frames {(LATENT[0] - 1) * 4 + 1}" in res.stdout


@pytest.mark.parametrize(
    "part,edit,words",
    [
        ("transformer", {"patch_size_t": 2}, "CogVideoX 1.5"),
        ("transformer", {"in_channels": 8}, "image-to-video"),
        ("transformer", {"sample_height": 7}, "multiple of its patch_size"),
        ("transformer", {"sample_frames": "49"}, "'sample_frames' must be a positive integer"),
        ("vae", {"_class_name": "AutoencoderKL"}, "AutoencoderKLCogVideoX VAE"),
        ("scheduler", {"_class_name": "DDIMScheduler"}, "scheduler must be one of"),
    ],
)
def test_unsupported_folders_are_refused(
    tmp_path: Path, tiny_default: Path, part: str, edit: dict, words: str
) -> None:
    from omniforge.pipeline.describe import describe
    from omniforge.pipeline.model_config import load_model_config

    model = _model_folder(tmp_path, tiny_default)
    name = "scheduler_config.json" if part == "scheduler" else "config.json"
    f = model / "video_decoder" / part / name
    f.write_text(json.dumps({**json.loads(f.read_text()), **edit}))
    with pytest.raises(ConfigError, match=words) as info:
        describe(load_model_config(model))
    assert "\n" not in str(info.value)
