"""A video with its sound track: the frames through the image encoder, the WAV through the audio
encoder, fused as ``video_audio`` says (rows concatenated, or a weighted mean), in the Pipeline and
the CLI; a silent video as before; bad tracks and settings refused in one sentence."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from omniforge.errors import ConfigError, InputError
from omniforge.runtime.media import write_wav
from omniforge.runtime.video_audio import VideoAudio


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A folder of 3 frames and a 1 s WAV."""
    root = tmp_path_factory.mktemp("va")
    frames = root / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(frames / f"{i:02d}.png")
    t = np.arange(16000) / 16000
    wav = write_wav(root / "track.wav", (0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    return frames, wav


def _export(default_model, tmp, stages: str, video_audio: dict | None = None):
    model = tmp / "model"
    shutil.copytree(default_model, model)
    if video_audio is not None:
        desc = json.loads((model / "nextgpt.json").read_text())
        desc["video_audio"] = video_audio
        (model / "nextgpt.json").write_text(json.dumps(desc))
    build = tmp / "build"
    cmd = [sys.executable, "-m", "omniforge", "export", str(model), "--out", str(build), "--stages", stages]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return build


@pytest.fixture(scope="module")
def mean_build(default_model, tmp_path_factory):
    """The default model with ``video_audio: {fusion: mean, weight: 0.25}``, exported with the
    stages a text + video request needs."""
    stages = "token_embedding,llm,image_encoder,audio_encoder,input_projector"
    return _export(default_model, tmp_path_factory.mktemp("mean"), stages, {"fusion": "mean", "weight": 0.25})


def test_track_rows_follow_the_frame_rows(default_build, media):
    """No ``video_audio`` section: the track's rows are concatenated after the frames' rows."""
    from omniforge.runtime.pipeline import Pipeline

    frames, wav = media
    pipe = Pipeline(default_build)
    silent = pipe.encode_video(frames)
    heard = pipe.encode_video(frames, wav)
    np.testing.assert_array_equal(heard, np.concatenate([silent, pipe.encode_audio(wav)]))
    assert heard.shape[0] == silent.shape[0] + 1  # one pooled row from each encoder
    quiet = pipe.run("what happens in <video>", video=frames)
    loud = pipe.run("what happens in <video>", video=frames, video_audio=wav)
    assert loud.generation.prompt_tokens == quiet.generation.prompt_tokens + 1
    assert "video_audio" not in json.loads((default_build / "manifest.json").read_text())["files"]


def test_weighted_mean_of_frames_and_track(mean_build, media):
    from omniforge.runtime.pipeline import Pipeline

    frames, wav = media
    cfg = json.loads((mean_build / "configs" / "video_audio.json").read_text())
    assert cfg == {"fusion": "mean", "weight": 0.25}
    pipe = Pipeline(mean_build)
    want = 0.75 * pipe.encode_video(frames) + 0.25 * pipe.encode_audio(wav)
    np.testing.assert_allclose(pipe.encode_video(frames, wav), want, rtol=1e-6, atol=1e-7)
    quiet = pipe.run("what happens in <video>", video=frames)
    loud = pipe.run("what happens in <video>", video=frames, video_audio=wav)
    assert loud.generation.prompt_tokens == quiet.generation.prompt_tokens  # one fused row


def test_cli_runs_a_video_with_its_track_and_refuses_bad_ones(default_build, default_model, media, tmp_path):
    frames, wav = media
    base = [sys.executable, "-m", "omniforge", "run", str(default_build), "--prompt", "what is in <video>"]
    base += ["--video", str(frames), "--max-new-tokens", "2", "--out", str(tmp_path / "o")]

    def run(*extra):
        return subprocess.run([*base, *extra], capture_output=True, text=True)

    ok = run("--video-audio", str(wav))
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x04\x00\x00\x00WAVEjunk")
    for extra, says in (
        (("--video-audio", str(bad)), "'bad.wav' is not a readable PCM WAV file"),
        (("--video-audio", str(tmp_path / "none.wav")), "none.wav"),
    ):
        res = run(*extra)
        assert res.returncode == 1 and says in res.stderr, res.stderr
        assert res.stderr.strip().startswith("omniforge: error:") and res.stderr.strip().count("\n") == 0


def test_a_track_needs_a_video_and_an_audio_encoder(default_model, tmp_path, media):
    from omniforge.runtime.pipeline import Pipeline

    frames, wav = media
    build = _export(default_model, tmp_path, "token_embedding,llm,image_encoder,input_projector")
    pipe = Pipeline(build)
    with pytest.raises(InputError, match="cannot take a video's sound track: it has no 'audio_encoder'"):
        pipe.run("what is in <video>", video=frames, video_audio=wav)
    with pytest.raises(InputError, match="sound track was given without a video"):
        pipe.run("hello", video_audio=wav)
    res = subprocess.run(
        [sys.executable, "-m", "omniforge", "run", str(build), "--prompt", "x", "--video", str(frames)]
        + ["--video-audio", str(wav), "--max-new-tokens", "1"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1 and "has no 'audio_encoder' stage" in res.stderr
    assert pipe.run("what is in <video>", video=frames).generation.prompt_tokens > 1  # silent: as before


@pytest.mark.parametrize(
    ("section", "says"),
    [
        ({"fusion": "sum"}, "fusion must be one of concat, mean"),
        ({"fusion": "mean", "weight": 1.5}, r"weight must be a number in \[0, 1\]"),
        ({"fusion": "mean", "gain": 2}, "unknown keys"),
        ("concat", "must be an object"),
    ],
)
def test_bad_video_audio_sections_are_refused(default_model, tmp_path, section, says):
    from omniforge.pipeline.model_config import load_model_config

    model = tmp_path / "m"
    model.mkdir()
    desc = json.loads((default_model / "nextgpt.json").read_text())
    for key in ("llm", "input_projector"):
        desc[key] = str(default_model / desc[key])
    for group in ("adapters", "encoders", "output_projectors", "decoders"):
        desc[group] = {k: str(default_model / v) for k, v in desc[group].items()}
    desc["video_audio"] = section
    (model / "nextgpt.json").write_text(json.dumps(desc))
    with pytest.raises(ConfigError, match=says):
        load_model_config(model)
    del desc["encoders"]["audio"]
    desc["video_audio"] = {"fusion": "concat"}
    (model / "nextgpt.json").write_text(json.dumps(desc))
    with pytest.raises(ConfigError, match="needs an image encoder .* and an audio encoder"):
        load_model_config(model)


def test_mean_needs_as_many_rows_from_each_encoder():
    mean = VideoAudio("mean", 0.5)
    mean.check_rows(1, 1)
    with pytest.raises(ConfigError, match="image encoder gives 4 and the audio encoder 1"):
        mean.check_rows(4, 1)
    VideoAudio("concat").check_rows(4, 25)  # any sizes concatenate
    frames, track = np.ones((4, 8), np.float32), np.zeros((1, 8), np.float32)
    assert VideoAudio().fuse(frames, track).shape == (5, 8)
    with pytest.raises(InputError, match="as many rows from the frames"):
        mean.fuse(frames, track)
