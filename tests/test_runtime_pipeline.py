"""The torch-free any-to-any pipeline: front ends, schedulers and decoders against their references."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from omniforge.errors import ConfigError, InputError
from omniforge.runtime import media as M
from omniforge.runtime.pipeline import DiffusionConfig, Pipeline
from omniforge.runtime.sampling import GenerationConfig
from omniforge.runtime.schedulers import make_scheduler


@pytest.fixture(scope="module")
def pipe(default_build):
    return Pipeline(default_build)


@pytest.fixture(scope="module")
def media_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 40, 3)) * 255).astype(np.uint8)).save(d / "photo.png")
    frames = [Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)) for _ in range(7)]
    frames[0].save(d / "clip.gif", save_all=True, append_images=frames[1:])
    (d / "frames").mkdir()
    for i, f in enumerate(frames):
        f.save(d / "frames" / f"{i:02d}.png")
    t = np.arange(12000) / 8000
    M.write_wav(d / "tone.wav", (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 8000)
    return d


# ---- front ends ---------------------------------------------------------------------------------
def test_image_preprocessing_matches_clip_image_processor(default_build, media_files):
    from transformers import CLIPImageProcessor

    cfg = json.loads((default_build / "configs" / "image_preprocessor.json").read_text())
    proc = CLIPImageProcessor(**{k: v for k, v in cfg.items() if k != "image_processor_type"})
    for size in ((48, 40), (40, 64), (17, 90)):
        pic = Image.open(media_files / "photo.png").resize(size)
        ref = proc(images=pic, return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(M.preprocess_image(pic, cfg), ref, atol=1e-5)


def test_log_mel_matches_transformers_audio_utils():
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    rng = np.random.default_rng(1)
    x = rng.standard_normal(4000).astype(np.float32) * 0.1
    sr, n_fft, hop, n_mels = 16000, 400, 160, 32
    ref = spectrogram(
        x.astype(np.float64),
        window_function(n_fft, "hann"),
        frame_length=n_fft,
        hop_length=hop,
        power=2.0,
        mel_filters=mel_filter_bank(
            num_frequency_bins=n_fft // 2 + 1,
            num_mel_filters=n_mels,
            min_frequency=0.0,
            max_frequency=sr / 2,
            sampling_rate=sr,
            norm=None,
            mel_scale="htk",
        ),
        log_mel="log",
        mel_floor=1e-10,
        center=True,
        pad_mode="reflect",
    )
    ours = M.log_mel(x, sr, n_fft, hop, n_mels)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_wav_roundtrip_and_resampling_keep_the_tone(media_files):
    x, sr = M.load_wav(media_files / "tone.wav")
    assert sr == 8000 and len(x) == 12000 and abs(np.abs(x).max() - 0.5) < 1e-3
    y = M.resample(x, 8000, 16000)
    assert len(y) == 24000
    peak_hz = np.argmax(np.abs(np.fft.rfft(y))) * 16000 / len(y)
    assert abs(peak_hz - 440) < 2


def test_video_frames_from_gif_and_folder_are_sampled_uniformly(media_files):
    gif = M.load_video_frames(media_files / "clip.gif", 4)
    folder = M.load_video_frames(media_files / "frames", 4)
    assert len(gif) == len(folder) == 4
    assert M.sample_indices(7, 4).tolist() == [0, 2, 4, 6]
    np.testing.assert_array_equal(
        np.asarray(folder[1]), np.asarray(Image.open(media_files / "frames" / "02.png").convert("RGB"))
    )


@pytest.mark.parametrize(
    "loader, content, needle",
    [
        (M.load_image, b"not an image", "not a readable image"),
        (M.load_wav, b"RIFF....WAVEjunk", "not a readable PCM WAV"),
        (lambda p: M.load_video_frames(p, 4), b"\x00\x01", "not a readable video"),
    ],
)
def test_corrupt_media_give_one_clear_error(tmp_path, loader, content, needle):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(content)
    with pytest.raises(InputError, match=needle):
        loader(bad)
    with pytest.raises(InputError, match="does not exist"):
        loader(tmp_path / "missing.png")


def test_mp4_without_a_decoder_says_what_to_install(tmp_path, monkeypatch):
    from omniforge.errors import MissingDependencyError
    from omniforge.runtime import video as V

    f = tmp_path / "clip.mp4"
    f.write_bytes(b"\x00" * 32)
    monkeypatch.setattr(V.av, "_module", None)
    monkeypatch.setitem(sys.modules, "av", None)  # as where PyAV is not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'omniforge\[video\]'"):
        M.load_video_frames(f, 4)


# ---- schedulers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ddim", "euler", "dpm"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_scheduler_steps_match_diffusers(default_build, name, spacing):
    import diffusers

    cfg = dict(
        json.loads((default_build / "configs" / "image_scheduler.json").read_text()), timestep_spacing=spacing
    )
    cls = {
        "ddim": diffusers.DDIMScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "dpm": diffusers.DPMSolverMultistepScheduler,
    }[name]
    ref = cls.from_config({k: v for k, v in cfg.items() if k != "alphas_cumprod"})
    ours = make_scheduler(name, cfg)
    for steps in (5, 20):
        ref.set_timesteps(steps)
        ours.set_timesteps(steps)
        np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy())
        assert abs(float(ref.init_noise_sigma) - ours.init_noise_sigma) <= 1e-5
        rng = np.random.default_rng(steps)
        x = (rng.standard_normal((1, 4, 8, 8)) * ours.init_noise_sigma).astype(np.float32)
        for i, t in enumerate(ref.timesteps):
            eps = rng.standard_normal(x.shape).astype(np.float32)
            scaled = ref.scale_model_input(torch.from_numpy(x), t).numpy()
            assert np.abs(ours.scale_model_input(x, i) - scaled).max() <= 1e-5
            want = ref.step(torch.from_numpy(eps), t, torch.from_numpy(x)).prev_sample.numpy()
            assert np.abs(ours.step(eps, i, x) - want).max() <= 1e-5, (i, t)
            x = want  # identical inputs at every step


def test_unsupported_scheduler_options_are_refused(default_build):
    cfg = json.loads((default_build / "configs" / "image_scheduler.json").read_text())
    with pytest.raises(ConfigError, match="use_karras_sigmas"):
        make_scheduler("euler", {**cfg, "use_karras_sigmas": True})
    with pytest.raises(ConfigError, match="unknown scheduler 'pndm'"):
        make_scheduler("pndm", cfg)


# ---- decoders against diffusers' pipelines ------------------------------------------------------
def _noise(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm"])
def test_image_matches_stable_diffusion_pipeline(pipe, default_model, scheduler):
    import diffusers

    folder = default_model / "image_decoder"
    cls = {
        "ddim": diffusers.DDIMScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "dpm": diffusers.DPMSolverMultistepScheduler,
    }[scheduler]
    ref_pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL.from_pretrained(folder / "vae"),
        text_encoder=None,
        tokenizer=None,
        unet=diffusers.UNet2DConditionModel.from_pretrained(folder / "unet"),
        scheduler=cls.from_pretrained(folder / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    ref_pipe.set_progress_bar_config(disable=True)
    cond = np.random.default_rng(5).standard_normal((1, 77, 32)).astype(np.float32)
    cfg = DiffusionConfig(steps=8, guidance_scale=7.5, seed=11, scheduler=scheduler)
    ours = pipe.decode_image(cond, cfg)
    with torch.no_grad():
        ref = ref_pipe(
            prompt_embeds=torch.from_numpy(cond),
            negative_prompt_embeds=torch.zeros(1, 77, 32),
            latents=torch.from_numpy(_noise((1, 4, 16, 16), 11)),
            num_inference_steps=8,
            guidance_scale=7.5,
            output_type="np",
        ).images[0]
    assert ours.shape == ref.shape == (32, 32, 3)
    assert np.abs(ours - ref).max() <= 1e-3


def test_video_matches_text_to_video_pipeline(pipe, default_model):
    import diffusers

    folder = default_model / "video_decoder"
    ref_pipe = diffusers.TextToVideoSDPipeline(
        vae=diffusers.AutoencoderKL.from_pretrained(folder / "vae"),
        text_encoder=None,
        tokenizer=None,
        unet=diffusers.UNet3DConditionModel.from_pretrained(folder / "unet"),
        scheduler=diffusers.DDIMScheduler.from_pretrained(folder / "scheduler"),
    )
    ref_pipe.set_progress_bar_config(disable=True)
    cond = np.random.default_rng(6).standard_normal((1, 77, 32)).astype(np.float32)
    cfg = DiffusionConfig(steps=6, guidance_scale=5.0, seed=3)
    ours = pipe.decode_video(cond, cfg)
    with torch.no_grad():
        ref = ref_pipe(
            prompt_embeds=torch.from_numpy(cond),
            negative_prompt_embeds=torch.zeros(1, 77, 32),
            latents=torch.from_numpy(_noise((1, 4, 4, 8, 8), 3)),
            num_frames=4,
            num_inference_steps=6,
            guidance_scale=5.0,
            output_type="np",
        ).frames[0]
    assert ours.shape == ref.shape == (4, 16, 16, 3)
    assert np.abs(ours - ref).max() <= 1e-3


def test_audio_matches_audioldm_pipeline(pipe, default_model):
    import diffusers
    from transformers import ClapTextConfig, ClapTextModelWithProjection, SpeechT5HifiGan

    folder = default_model / "audio_decoder"
    # the pipeline reads its text encoder's dtype even when embeddings are passed in; a tiny real one does
    text_encoder = ClapTextModelWithProjection(
        ClapTextConfig(
            vocab_size=16,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=1,
            intermediate_size=8,
            projection_dim=16,
        )
    )
    ref_pipe = diffusers.AudioLDMPipeline(
        vae=diffusers.AutoencoderKL.from_pretrained(folder / "vae"),
        text_encoder=text_encoder,
        tokenizer=None,
        unet=diffusers.UNet2DConditionModel.from_pretrained(folder / "unet"),
        scheduler=diffusers.DDIMScheduler.from_pretrained(folder / "scheduler"),
        vocoder=SpeechT5HifiGan.from_pretrained(folder / "vocoder"),
    )
    ref_pipe.set_progress_bar_config(disable=True)
    cond = np.random.default_rng(7).standard_normal((1, 1, 16)).astype(np.float32)
    cfg = DiffusionConfig(steps=6, guidance_scale=2.5, seed=4)
    ours = pipe.decode_audio(cond, cfg)
    with torch.no_grad():
        ref = ref_pipe(
            prompt_embeds=torch.from_numpy(cond[:, 0]),
            negative_prompt_embeds=torch.zeros(1, 16),
            latents=torch.from_numpy(_noise((1, 4, 16, 8), 4)),
            audio_length_in_s=512 / 16000,
            num_inference_steps=6,
            guidance_scale=2.5,
            output_type="np",
        ).audios[0]
    assert ours.shape == ref.shape == (512,)
    assert np.abs(ours - ref).max() <= 1e-3 * max(1.0, float(np.abs(ref).max()))


# ---- the one call ------------------------------------------------------------------------------
def test_run_with_media_in_and_every_medium_out(pipe, media_files, tmp_path):
    r = pipe.run(
        "What is in this photo?",
        image=media_files / "photo.png",
        audio=media_files / "tone.wav",
        video=media_files / "clip.gif",
        generation=GenerationConfig(max_new_tokens=8),
        diffusion=DiffusionConfig(steps=3),
        force=["image", "video", "audio"],
    )
    assert r.generation.prompt_tokens > 3 and r.generation.new_tokens == 8
    assert [i.shape for i in r.images] == [(32, 32, 3)]
    assert [v.shape for v in r.videos] == [(4, 16, 16, 3)]
    assert [a.shape for a in r.audios] == [(512,)]
    for stage in (
        "image_encoder",
        "audio_encoder",
        "input_projector",
        "llm",
        "image_unet",
        "video_unet",
        "vocoder",
    ):
        assert r.timings[stage] > 0, stage
    written = r.save(tmp_path / "out")
    names = sorted(p.relative_to(tmp_path / "out").as_posix() for p in written)
    assert names[:2] == ["audio_0.wav", "image_0.png"] and "video_0.gif" in names and len(names) == 7
    assert Image.open(tmp_path / "out" / "image_0.png").size == (32, 32)
    assert M.load_wav(tmp_path / "out" / "audio_0.wav")[1] == 16000


def test_forced_signal_hidden_equals_teacher_forcing_in_torch(pipe, default_model):
    """The hidden states that condition a forced decoder are those of HF's forward over the same tokens."""
    from omniforge.model.loader import load_llm
    from omniforge.pipeline.model_config import load_model_config

    rows, ids = pipe.llm.prepare("A picture of")
    hidden = pipe.signal_hidden(rows, "image", adapter="image")
    sig = [pipe.llm.tokenizer.token_id(f"[IMG{i}]") for i in range(4)]
    hf = load_llm(load_model_config(default_model), adapter="image")
    with torch.no_grad():
        ref = hf(torch.tensor([ids + sig]), output_hidden_states=True).hidden_states[-1][0, -4:].numpy()
    np.testing.assert_allclose(hidden, ref, atol=1e-4)


def test_low_memory_releases_decoders(default_build):
    p = Pipeline(default_build, low_memory=True)
    p.run(
        "hello",
        generation=GenerationConfig(max_new_tokens=2),
        diffusion=DiffusionConfig(steps=2),
        force=["image"],
    )
    loaded = p.build.loaded()
    assert (
        "image_unet" not in loaded
        and "image_vae_decoder" not in loaded
        and "image_output_projector" in loaded
    )


def test_bad_pipeline_requests(pipe, media_files):
    with pytest.raises(InputError, match="unknown modality"):
        pipe.run("x", force=["smell"])
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        DiffusionConfig(steps=0)
    with pytest.raises(InputError, match="not a readable image"):
        pipe.run("x", image=media_files / "tone.wav")
