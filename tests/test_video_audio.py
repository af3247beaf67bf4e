"""A video with its sound track: the frames through the image encoder, the track (a WAV, or the
audio stream of a video file, read with PyAV) through the audio encoder, fused as ``video_audio``
says (rows concatenated, or a weighted mean), in the Pipeline and the CLI; a silent video as
before; bad tracks and settings refused in one sentence."""

from __future__ import annotations

import fractions
import json
import shutil
import subprocess
import sys
import wave
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from omniforge.errors import ConfigError, InputError
from omniforge.runtime import media as M
from omniforge.runtime.media import write_wav
from omniforge.runtime.video_audio import VideoAudio

SR = 16000


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


def _stereo_pcm() -> np.ndarray:
    """(1 s, 2) int16: 440 Hz on the left, 660 Hz on the right."""
    t = np.arange(SR) / SR
    x = np.stack([0.4 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 660 * t)], axis=1)
    return (x * 32767).round().astype("<i2")


def _write_video(path, frames, vcodec, pix_fmt, opts, acodec=None, pcm=None, garble=False):
    """``frames`` (H, W, 3) uint8 at 8 fps and, with ``acodec``, the stereo ``pcm`` in 1024-sample
    frames with timestamps (so that an AAC encoder's priming is trimmed on decoding); ``garble``:
    the audio packets' bytes replaced by noise."""
    import av

    rng = np.random.default_rng(1)
    with av.open(str(path), "w") as c:
        v = c.add_stream(vcodec, rate=8, options=opts)
        v.width, v.height, v.pix_fmt = frames[0].shape[1], frames[0].shape[0], pix_fmt
        a = c.add_stream(acodec, rate=SR, layout="stereo") if acodec else None
        for f in frames:
            c.mux(v.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(v.encode())
        if a is None:
            return path
        packets = []
        for i in range(0, len(pcm), 1024):
            fr = av.AudioFrame.from_ndarray(pcm[i : i + 1024].reshape(1, -1), format="s16", layout="stereo")
            fr.sample_rate, fr.pts, fr.time_base = SR, i, fractions.Fraction(1, SR)
            packets += a.encode(fr)
        packets += a.encode()
        for pk in packets:
            if garble:
                bad = av.Packet(rng.integers(0, 256, max(pk.size, 64), dtype=np.uint8).tobytes())
                bad.stream, bad.pts, bad.dts, bad.time_base = a, pk.pts, pk.dts, pk.time_base
                pk = bad
            c.mux(pk)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Six 32x32 frames, their stereo 1 s track as a WAV, and video files made with PyAV: lossless
    (x264 RGB at qp 0 + ALAC in an MP4; PCM in an MKV), lossy (x264 4:2:0 + AAC), silent, and with
    a garbled AAC stream."""
    av = pytest.importorskip("av")
    if "libx264rgb" not in av.codecs_available:
        pytest.skip("this PyAV build has no x264 encoder")
    root = tmp_path_factory.mktemp("clips")
    yy, xx = np.mgrid[0:32, 0:32]
    frames = [
        np.stack([xx * 6 + 10 * i, yy * 6, np.full_like(xx, 30 * i)], -1).astype(np.uint8) for i in range(6)
    ]
    pcm = _stereo_pcm()
    with wave.open(str(root / "track.wav"), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(pcm.tobytes())
    folder = root / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i:02d}.png")
    lossless = ("libx264rgb", "rgb24", {"qp": "0"})
    lossy = ("libx264", "yuv420p", {})
    return SimpleNamespace(
        frames=frames,
        folder=folder,
        wav=root / "track.wav",
        alac=_write_video(root / "alac.mp4", frames, *lossless, "alac", pcm),
        pcm=_write_video(root / "pcm.mkv", frames, *lossless, "pcm_s16le", pcm),
        aac=_write_video(root / "aac.mp4", frames, *lossy, "aac", pcm),
        silent=_write_video(root / "silent.mp4", frames, *lossless),
        garbled=_write_video(root / "garbled.mp4", frames, *lossy, "aac", pcm, garble=True),
    )


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


def test_a_track_needs_a_video_and_an_audio_encoder(default_model, tmp_path, media, clips):
    """Asked for (a WAV or a video file's track), a track is refused by a build without an audio
    encoder; the sound inside a video file, not asked for, is left unread there."""
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
    with pytest.raises(InputError, match="has no 'audio_encoder' stage"):
        pipe.run("what is in <video>", video=clips.alac, video_audio=clips.alac)
    heard = pipe.run("what is in <video>", video=clips.alac, generation=_greedy(3))
    silent = pipe.run("what is in <video>", video=clips.silent, generation=_greedy(3))
    assert heard.generation.token_ids == silent.generation.token_ids  # the same frames, no track


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


def _greedy(n: int):
    from omniforge.runtime.sampling import GenerationConfig

    return GenerationConfig(max_new_tokens=n)


# ---- the sound track inside a video file (PyAV) -----------------------------------------------------
@pytest.mark.parametrize("kind", ["alac", "pcm"])
def test_lossless_video_files_give_back_their_frames_and_samples(clips, kind):
    """x264 RGB at qp 0 and ALAC (MP4) or PCM (MKV): frames and samples exactly as written, each
    channel rule (mean, first channel) as the WAV reader applies it."""
    from omniforge.runtime import video as V

    path = getattr(clips, kind)
    got = M.load_video_frames(path, 6)
    np.testing.assert_array_equal(np.stack([np.asarray(g) for g in got]), np.stack(clips.frames))
    for channel in (None, 0, 1):
        want, sr = M.load_wav(clips.wav, channel=channel)
        samples, rate = V.load_sound(path, channel=channel)
        assert rate == sr == SR
        np.testing.assert_array_equal(samples, want)
    assert len(V.load_sound(path, max_seconds=0.25)[0]) == SR // 4  # only the seconds asked for
    assert V.has_sound(path) and not V.has_sound(clips.silent) and not V.has_sound(clips.folder)


def test_lossy_video_file_is_close_to_its_sources(clips):
    from omniforge.runtime import video as V

    got = np.stack([np.asarray(g) for g in M.load_video_frames(clips.aac, 6)]).astype(np.float64)
    assert np.abs(got - np.stack(clips.frames)).mean() < 3  # x264 4:2:0 at its default quality
    want, _ = M.load_wav(clips.wav)
    samples, rate = V.load_sound(clips.aac)
    assert rate == SR and len(samples) >= len(want)  # AAC pads its last frame
    err = samples[: len(want)] - want  # the encoder's priming is trimmed: no offset
    assert np.sqrt(np.mean(err**2)) < 0.02 * np.sqrt(np.mean(want**2))


def test_a_video_files_track_gives_the_rows_of_its_samples_as_a_wav(default_build, clips, media, monkeypatch):
    """The track read from a video file encodes to the rows the same samples give as a WAV (exactly
    for ALAC, closely for AAC); ``run`` takes a video file's own track unless one is given, and a
    video file without sound runs as frames alone."""
    from omniforge.runtime.pipeline import Pipeline

    pipe = Pipeline(default_build)
    frames = pipe.encode_video(clips.folder)
    np.testing.assert_array_equal(pipe.encode_video(clips.alac), frames)  # lossless: the same frames
    wav_rows = pipe.encode_video(clips.alac, clips.wav)
    np.testing.assert_array_equal(pipe.encode_video(clips.alac, clips.alac), wav_rows)
    aac_rows = pipe.encode_video(clips.alac, clips.aac)[frames.shape[0] :]
    track = wav_rows[frames.shape[0] :]
    other = pipe.encode_video(clips.alac, media[1])[frames.shape[0] :]  # another sound: 440 Hz alone
    assert np.linalg.norm(aac_rows - track) < 0.06 * np.linalg.norm(track)  # 0.034 here
    assert np.linalg.norm(other - track) > 0.15 * np.linalg.norm(track)  # 0.25 here

    from omniforge.runtime import video as V

    tracks, load = [], V.load_sound
    monkeypatch.setattr(V, "load_sound", lambda path, *a: tracks.append(path) or load(path, *a))
    own = pipe.run("what is in <video>", video=clips.alac, generation=_greedy(3))
    as_wav = pipe.run("what is in <video>", video=clips.alac, video_audio=clips.wav, generation=_greedy(3))
    silent = pipe.run("what is in <video>", video=clips.silent, generation=_greedy(3))
    folder = pipe.run("what is in <video>", video=clips.folder, generation=_greedy(3))
    assert tracks == [clips.alac, clips.wav]  # the silent file and the folder: no track read
    assert own.generation.token_ids == as_wav.generation.token_ids
    assert own.generation.prompt_tokens == silent.generation.prompt_tokens + 1
    assert silent.generation.token_ids == folder.generation.token_ids


def test_cli_reads_a_video_files_track_and_refuses_a_garbled_one(default_build, clips, tmp_path):
    base = [sys.executable, "-m", "omniforge", "run", str(default_build), "--prompt", "what is in <video>"]
    base += ["--max-new-tokens", "2", "--out", str(tmp_path / "o")]
    ok = subprocess.run([*base, "--video", str(clips.alac)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([*base, "--video", str(clips.garbled)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.strip() == (
        "omniforge: error: 'garbled.mp4' has a sound track that cannot be decoded "
        "(Invalid data found when processing input)"
    )
    frames_only = subprocess.run(
        [*base, "--video", str(clips.garbled), "--video-audio", "none"], capture_output=True, text=True
    )
    assert frames_only.returncode == 0, frames_only.stderr  # its track is not read at all
    silent = subprocess.run([*base, "--video", str(clips.silent)], capture_output=True, text=True)
    assert frames_only.stderr.split(" prompt tokens")[0] == silent.stderr.split(" prompt tokens")[0]


def test_video_files_without_pyav_say_what_to_install(clips, monkeypatch):
    from omniforge.errors import MissingDependencyError
    from omniforge.runtime import video as V

    monkeypatch.setattr(V.av, "_module", None)
    monkeypatch.setitem(sys.modules, "av", None)  # as if it were not installed
    for read in (lambda p: M.load_video_frames(p, 4), V.load_sound, V.has_sound):
        with pytest.raises(MissingDependencyError, match=r"pip install 'omniforge\[video\]'"):
            read(clips.alac)
    assert len(M.load_video_frames(clips.folder, 2)) == 2  # frame folders need no PyAV
