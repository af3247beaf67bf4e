"""Hostile and careless inputs at every boundary of the runtime and of `omniforge run`: each ends in
one OmniforgeError sentence (or success) in bounded time and memory, never a hang, a traceback or a
huge allocation. Media files are real files (FIFOs, devices, hand-made headers, sparse WAVs)."""

import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import threading
import tracemalloc
import warnings
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omniforge.cli import main
from omniforge.errors import ConfigError, ContextLengthError, InputError, OmniforgeError
from omniforge.runtime import media as M
from omniforge.runtime.engine import SessionConfig
from omniforge.runtime.llm import GenerationResult
from omniforge.runtime.pipeline import DiffusionConfig, Pipeline
from omniforge.runtime.sampling import GenerationConfig

PROPERTY = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def bounded(fn, timeout: float = 60.0):
    """``fn()``'s result or exception, run in a daemon thread: a call that blocks fails the test
    after ``timeout`` seconds instead of hanging the suite."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller as it was raised
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"still running after {timeout} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def outcome(fn, timeout: float = 60.0):
    """``fn()``'s result, or the OmniforgeError it raised; any other exception fails the test."""
    try:
        return bounded(fn, timeout)
    except OmniforgeError as exc:
        assert "\n" not in str(exc), str(exc)
        return exc


@pytest.fixture(scope="module")
def pipe(default_build):
    return Pipeline(default_build)


@pytest.fixture(scope="module")
def special(tmp_path_factory):
    """A FIFO, a frame folder holding a FIFO, and a plain folder."""
    d = tmp_path_factory.mktemp("special")
    os.mkfifo(d / "pipe.png")
    (d / "frames").mkdir()
    os.mkfifo(d / "frames" / "000.png")
    (d / "folder.wav").mkdir()
    return d


# ---- hand-made files ------------------------------------------------------------------------------
def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR says ``width`` x ``height`` (8-bit grey) and that holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def wav_bytes(
    tag: int = 1,
    channels: int = 1,
    rate: int = 16000,
    bits: int = 16,
    data: bytes = b"\x00\x01" * 64,
    data_size: int | None = None,
    align: int | None = None,
) -> bytes:
    align = (channels * (bits // 8) if align is None else align) & 0xFFFF
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * align & 0xFFFFFFFF, align, bits)
    size = len(data) if data_size is None else data_size
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", size) + data
    return b"RIFF" + struct.pack("<I", len(body) & 0xFFFFFFFF) + body


def sparse_wav(path: Path, seconds: float, rate: int = 16000) -> Path:
    """A 16-bit mono WAV of ``seconds`` whose samples are a hole in the file (nothing written)."""
    nbytes = int(seconds * rate) * 2
    head = wav_bytes(rate=rate, data=b"", data_size=nbytes)
    with open(path, "wb") as f:
        f.write(head[:4] + struct.pack("<I", len(head) - 8 + nbytes) + head[8:])
        f.truncate(len(head) + nbytes)
    return path


# ---- 1. nothing blocks ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "load, name, needle",
    [
        (M.load_image, "pipe.png", "is a FIFO, not a regular file"),
        (M.load_wav, "pipe.png", "is a FIFO, not a regular file"),
        (lambda p: M.load_video_frames(p, 4), "pipe.png", "is a FIFO, not a regular file"),
        (lambda p: M.load_video_frames(p, 4), "frames", "is a FIFO, not a regular file"),
        (M.load_wav, "folder.wav", "is a folder"),
    ],
)
def test_special_files_are_refused_without_blocking(special, load, name, needle):
    with pytest.raises(InputError, match=needle):
        bounded(lambda: load(special / name), timeout=30)


def test_devices_are_refused_without_reading():
    for load in (M.load_image, M.load_wav):
        with pytest.raises(InputError, match="character device"):
            bounded(lambda load=load: load("/dev/zero"), timeout=30)


def test_paths_of_the_wrong_type_get_one_sentence():
    for bad in (None, 3, b"/tmp/x.png", ["x.png"]):
        with pytest.raises(InputError, match="must be given as a file path"):
            M.load_image(bad)
    with pytest.raises(InputError, match="cannot be reached"):
        M.load_wav("a\0b.wav")


def test_thread_counts_are_bounded_by_the_machine():
    most = 4 * (os.cpu_count() or 1)
    assert SessionConfig(threads=most).threads == most
    for bad in (most + 1, 10_000, -1, 1.5, True):
        with pytest.raises(ConfigError, match=rf"threads must be an integer in \[0, {most}\]"):
            SessionConfig(threads=bad)


# ---- 2. sizes are checked before anything is decoded or allocated ---------------------------------
@pytest.mark.parametrize(
    "size, needle",
    [
        ((1, 8_000_000), "aspect ratio beyond 100:1"),
        ((20_000, 20_000), "more than 64000000"),
        ((200_000, 200_000), "more than 64000000"),  # Pillow's own decompression-bomb error
        ((0, 10), "no pixels|not a readable image"),
    ],
)
def test_image_headers_are_checked_before_decoding(tmp_path, size, needle):
    f = tmp_path / "bomb.png"
    f.write_bytes(png_header(*size))
    assert f.stat().st_size < 100
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=needle):
            bounded(lambda: M.load_image(f))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20


def test_pillows_bomb_warning_does_not_reach_the_user(tmp_path):
    """An image between Pillow's warning and error thresholds (89M-179M pixels) is refused by the
    size check alone, with no DecompressionBombWarning printed first."""
    f = tmp_path / "big.png"
    f.write_bytes(png_header(12000, 10000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError, match="has 12000x10000 pixels, more than 64000000"):
            M.load_image(f)


@PROPERTY
@given(width=st.integers(0, 2**31 - 1), height=st.integers(0, 2**31 - 1))
def test_any_png_size_gets_one_error(tmp_path, width, height):
    f = tmp_path / "any.png"
    f.write_bytes(png_header(width, height))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one error, and no library warning before it
        err = outcome(lambda: M.load_image(f))
    assert isinstance(err, InputError)  # no pixel data: refused for its size or as unreadable
    over = width * height > M.MAX_PIXELS or max(width, height) > M.MAX_ASPECT * max(1, min(width, height))
    if min(width, height) >= 1 and over:
        assert "pixels" in str(err) or "aspect ratio" in str(err), str(err)


def test_image_arrays_are_checked(pipe):
    for arr, needle in (
        (np.zeros((0, 0, 3), np.uint8), "no pixels"),
        (np.zeros((1, 200, 3), np.uint8), "aspect ratio beyond"),
        (np.zeros((4, 4), np.uint8), r"must be \(H, W, 3\) uint8"),
    ):
        with pytest.raises(InputError, match=needle):
            pipe.run("x", image=arr, generation=GenerationConfig(max_new_tokens=1))
    with pytest.raises(InputError, match="a PIL image or an"):
        M.preprocess_image("photo.png", {})


@pytest.mark.parametrize(
    "cfg, needle",
    [
        ({"size": {"shortest_edge": 10**9}}, r"'shortest_edge' must be an integer in \[1, 4096\]"),
        ({"crop_size": {"height": 10**9, "width": 8}}, r"'height' must be an integer in \[1, 4096\]"),
        ({"size": {"shortest_edge": 0}}, r"in \[1, 4096\], got 0"),
        ({"size": 5}, "'size' must be an object"),
        ({"resample": 99}, "'resample' must be an integer"),
        ({"image_std": [1, 0, 1]}, "'image_std' must be one or three finite, non-zero numbers"),
        ({"rescale_factor": float("nan")}, "'rescale_factor' must be a finite number"),
    ],
)
def test_image_preprocessor_configs_are_bounded(cfg, needle):
    with pytest.raises(ConfigError, match=needle):
        M.preprocess_image(np.zeros((8, 8, 3), np.uint8), cfg)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"num_frames": 10**9}, r"'num_frames' must be an integer in \[1, 100000\]"),
        ({"n_fft": 10**9}, r"'n_fft' must be an integer in \[2, 65536\]"),
        ({"sample_rate": 0}, r"'sample_rate' must be an integer in \[1000, 384000\]"),
        ({"hop_length": 0}, r"'hop_length' must be an integer in \[1, "),
        ({"n_mels": 10**6}, r"'n_mels' must be an integer in \[1, 1024\]"),
        ({"std": 0}, "'std' must be a finite, non-zero number"),
    ],
)
def test_audio_front_end_configs_are_bounded(change, needle):
    fe = {"sample_rate": 16000, "n_fft": 400, "hop_length": 160, "n_mels": 32, "num_frames": 32}
    with pytest.raises(ConfigError, match=needle):
        M.audio_features(np.zeros(1600, np.float32), 16000, {**fe, **change})


def _hostile_build(default_build: Path, out: Path) -> Path:
    """A copy of the build whose front-end configs ask for 10^9-sized buffers, re-hashed so that it
    passes verification: the sizes themselves must be refused."""
    shutil.copytree(default_build, out)
    edits = {
        "configs/image_preprocessor.json": {"size": {"shortest_edge": 10**9}, "crop_size": {"height": 10**9}},
        "configs/audio_frontend.json": {"num_frames": 10**9},
    }
    manifest = json.loads((out / "manifest.json").read_text())
    for rel, change in edits.items():
        f = out / rel
        f.write_text(json.dumps({**json.loads(f.read_text()), **change}))
        for a in manifest["artifacts"]:
            if a["path"] == rel:
                a["sha256"], a["size"] = hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_size
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_sizes_from_a_builds_configs_are_refused_before_allocating(default_build, tmp_path):
    hostile = Pipeline(_hostile_build(default_build, tmp_path / "hostile"))
    with pytest.raises(
        ConfigError, match=r"'shortest_edge' must be an integer in \[1, 4096\], got 1000000000"
    ):
        bounded(lambda: hostile.encode_image(np.zeros((8, 8, 3), np.uint8)))
    wav = tmp_path / "a.wav"
    wav.write_bytes(wav_bytes())
    with pytest.raises(ConfigError, match=r"'num_frames' must be an integer in \[1, 100000\]"):
        bounded(lambda: hostile.encode_audio(wav))


@pytest.mark.parametrize("rate", [0, 1, 999, 384_001, 2**32 - 1])
def test_wav_sample_rates_are_bounded(tmp_path, rate):
    f = tmp_path / "r.wav"
    f.write_bytes(wav_bytes(rate=rate))
    with pytest.raises(InputError, match="1000 to 384000 Hz are supported"):
        M.load_wav(f)


def test_a_long_wav_is_read_only_as_far_as_the_encoder_uses_it(pipe, tmp_path):
    f = sparse_wav(tmp_path / "long.wav", seconds=30 * 60)  # 57.6 MB of samples, none on disk
    fe = M.AudioFrontEnd.from_config(pipe.build.json("audio_frontend"))
    samples, sr = M.load_wav(f, max_seconds=fe.read_seconds)
    assert sr == 16000 and len(samples) == math.ceil(fe.read_seconds * sr) < 16000
    assert len(M.load_wav(f)[0]) == M.MAX_AUDIO_SECONDS * sr  # the default reads 30 s, not 30 min
    tracemalloc.start()
    try:
        emb = bounded(lambda: pipe.encode_audio(f))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert emb.shape[0] == 1 and np.isfinite(emb).all()
    assert peak < 8 * 2**20, peak


def test_audio_features_use_the_same_window_however_the_file_is_read(pipe):
    fe = M.AudioFrontEnd.from_config(pipe.build.json("audio_frontend"))
    rng = np.random.default_rng(0)
    for sr in (16000, 44100):
        x = rng.standard_normal(sr * 5).astype(np.float32) * 0.1
        window = x[: math.ceil(fe.read_seconds * sr)]
        np.testing.assert_array_equal(M.audio_features(x, sr, fe), M.audio_features(window, sr, fe))


@PROPERTY
@given(
    tag=st.sampled_from([1, 3, 0xFFFE, 2, 0]),
    channels=st.integers(0, 70_000),
    rate=st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([8000, 16000, 44100, 384_000])),
    bits=st.sampled_from([0, 8, 16, 24, 32, 64, 12]),
    align=st.one_of(st.none(), st.integers(0, 65535)),
    data=st.binary(max_size=4096),
    data_size=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    cut=st.integers(0, 64),
)
def test_any_wav_header_gets_samples_or_one_error(
    pipe, tmp_path, tag, channels, rate, bits, align, data, data_size, cut
):
    raw = wav_bytes(tag, channels & 0xFFFF, rate, bits, data, data_size, None if align is None else align)
    f = tmp_path / "any.wav"
    f.write_bytes(raw[: len(raw) - cut] if cut else raw)
    got = outcome(lambda: M.load_wav(f))
    if isinstance(got, OmniforgeError):
        assert isinstance(got, InputError)
        return
    samples, sr = got
    assert M.MIN_SAMPLE_RATE <= sr <= M.MAX_SAMPLE_RATE
    assert samples.dtype == np.float32 and 0 < len(samples) <= len(data) and np.isfinite(samples).all()
    feats = outcome(lambda: M.audio_features(samples, sr, pipe.build.json("audio_frontend")))
    assert not isinstance(feats, OmniforgeError), feats
    assert feats.shape == (1, 32, 32) and np.isfinite(feats).all()


# ---- 3. one sentence where a traceback used to be -------------------------------------------------
@pytest.mark.parametrize(
    "options, needle",
    [
        ({"seed": -1}, "seed must be >= 0"),
        ({"seed": 2**70}, "seed must be < 2"),
        ({"temperature": float("nan")}, "temperature must be finite"),
        ({"temperature": float("inf")}, "temperature must be finite"),
        ({"temperature": 1e-300}, "temperature must be 0 \\(greedy\\) or lie in"),
        ({"top_p": float("nan")}, "top_p must be finite"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty must be finite"),
        ({"repetition_penalty": 1e-300}, "repetition_penalty must lie in"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
        ({"top_k": None}, "top_k must be an integer"),
        ({"stop_strings": ("",)}, "a stop string must be non-empty"),
        ({"stop_strings": "end"}, "stop_strings must be a tuple"),
        ({"stop_token_ids": (2**70, -1)}, "a stop token id must be >= 0"),
    ],
)
def test_generation_options_get_one_sentence(options, needle):
    with pytest.raises(ConfigError, match=needle):
        GenerationConfig(**options)


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"seed": -1}, r"seed must lie in \[0, 2\*\*64\)"),
        ({"steps": 2.0}, "steps must be an integer"),
        ({"guidance_scale": "high"}, "guidance scale must be a number"),
    ],
)
def test_diffusion_options_get_one_sentence(options, needle):
    with pytest.raises(ConfigError, match=needle):
        DiffusionConfig(**options)


@pytest.mark.parametrize(
    "prompt, needle",
    [
        (None, "got NoneType"),
        (b"hello", "got bytes: decode it first"),
        (bytearray(b"hello"), "got bytes: decode it first"),
        ("caf\udce9", "unpaired surrogate"),
        ([2**70], r"token ids must lie in \[0, "),
        ([1.0, 2.0], "token ids must be integers"),
        ([[1, 2]], "one-dimensional"),
        (np.array([1.5]), "prompt embeddings must have shape"),
        (np.array(["a"]), "token ids must be integers"),
        ({1, 2}, "got set"),
        ("", "the prompt is empty"),
    ],
)
def test_prompts_of_the_wrong_kind_get_one_sentence(pipe, prompt, needle):
    with pytest.raises(InputError, match=needle):
        pipe.llm.generate(prompt, GenerationConfig(max_new_tokens=1))


def test_overlong_text_is_refused_before_tokenizing(pipe):
    text = "word " * 10**6
    with pytest.raises(ContextLengthError, match="too many to fit however it is split"):
        bounded(lambda: pipe.llm.prepare(text), timeout=30)


PROMPTS = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=40),
    st.lists(st.integers(-(2**80), 2**80), max_size=12),
    st.lists(st.integers(0, 511), min_size=1, max_size=12),
    st.binary(max_size=12),
    st.none(),
    st.floats(),
    st.lists(st.one_of(st.floats(), st.text(max_size=2), st.booleans()), max_size=4),
)


@PROPERTY
@given(prompt=PROMPTS)
def test_any_prompt_generates_or_gets_one_error(pipe, prompt):
    got = outcome(lambda: pipe.llm.generate(prompt, GenerationConfig(max_new_tokens=2)))
    assert isinstance(got, (GenerationResult, InputError)), got


NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    st.booleans(),
    st.text(max_size=3),
)


@PROPERTY
@given(
    max_new_tokens=st.one_of(st.integers(-3, 2**70), NUMBERS),
    temperature=st.one_of(st.floats(0, 5), NUMBERS),
    top_k=st.one_of(st.integers(-3, 2**70), NUMBERS),
    top_p=st.one_of(st.floats(0, 1), NUMBERS),
    repetition_penalty=st.one_of(st.floats(0, 3), NUMBERS),
    seed=st.one_of(st.integers(-3, 2**66), NUMBERS),
)
def test_any_generation_options_generate_or_get_one_error(pipe, **options):
    try:
        cfg = GenerationConfig(**options)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    got = outcome(lambda: pipe.llm.generate("A dog", replace(cfg, max_new_tokens=min(cfg.max_new_tokens, 3))))
    assert isinstance(got, GenerationResult), got


def test_signal_tokens_appended_after_the_prompt_are_counted(pipe):
    ctx = pipe.llm.pool.max_context
    n = len(pipe.build.pipeline.signal_tokens["video"])
    quick = dict(generation=GenerationConfig(max_new_tokens=32), diffusion=DiffusionConfig(steps=1))
    fits = list(range(5, 5 + ctx - n - 2))  # leaves room for the signal tokens and one new token
    result = pipe.run(fits, force=["video"], **quick)
    assert len(result.videos) == 1 and result.generation.finish_reason == "length"
    assert result.generation.new_tokens == 1  # the text was capped so the signal tokens still fit
    over = list(range(5, 5 + ctx - n))
    with pytest.raises(
        ContextLengthError, match=rf"the prompt \({ctx - n} tokens\) followed by the {n} signal"
    ):
        pipe.run(over, force=["video"], **quick)
    pipe.llm.generate(over, GenerationConfig(max_new_tokens=1))  # alone, the same prompt fits


def test_media_rows_count_in_the_context_check(pipe):
    ctx, h = pipe.llm.pool.max_context, pipe.llm.geometry.hidden_size
    ids = [pipe.llm.tokenizer.token_id("<image>"), *range(5, ctx - 10)]
    fed = len(ids) - 1 + 20  # the placeholder is replaced by the image's 20 rows
    assert len(ids) < ctx <= fed
    with pytest.raises(ContextLengthError, match=rf"the prompt with its media is {fed} tokens fed"):
        pipe.llm.prepare(ids, {"image": [np.zeros((20, h), np.float32)]})


# ---- the command line -----------------------------------------------------------------------------
def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "omniforge", *args], capture_output=True, text=True, timeout=300, **kw
    )


def one_error_line(err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("omniforge: error:") and needle in lines[0], err


def test_a_closed_stdout_ends_quietly(default_build):
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first token
    try:
        res = subprocess.run(
            [sys.executable, "-m", "omniforge", "run", str(default_build), "--prompt", "A dog runs"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(write)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr, res.stderr


def test_usage_errors_are_one_line_and_exit_1(default_build, capsys):
    for args, needle in (
        (["run", str(default_build), "--prompt", "x", "--force", "smell"], "invalid choice: 'smell'"),
        (["run", str(default_build)], "the following arguments are required: --prompt"),
        (["run", str(default_build), "--prompt", "x", "--seed", "one"], "invalid int value: 'one'"),
        (["teleport"], "invalid choice: 'teleport'"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 1
        one_error_line(capsys.readouterr().err, needle)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--seed", "-1"], "seed must be >= 0"),
        (["--temperature", "nan"], "temperature must be finite"),
        (["--threads", "10000"], "threads must be an integer in [0, "),
        (["--out", "/proc"], "output folder '/proc' is not writable"),
        (["--out", "{file}"], "is not a folder"),
        (["--out", "{file}/sub"], "is not a folder"),
        (["--image", "/dev/null"], "character device, not a regular file"),
        (["--audio", "{fifo}"], "is a FIFO, not a regular file"),
    ],
)
def test_run_refuses_before_generating(default_build, special, tmp_path, capsys, args, needle):
    (tmp_path / "file").write_text("x")
    args = [a.format(file=tmp_path / "file", fifo=special / "pipe.png") for a in args]
    code = bounded(lambda: main(["run", str(default_build), "--prompt", "A dog", "--force", "image", *args]))
    assert code == 1
    captured = capsys.readouterr()
    one_error_line(captured.err, needle)
    assert captured.out == ""  # refused before a token was generated


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_run_refuses_a_read_only_out_folder(default_build, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    assert main(["run", str(default_build), "--prompt", "x", "--out", str(ro / "media")]) == 1
    one_error_line(capsys.readouterr().err, "is not writable")


def test_an_invalid_utf8_prompt_from_the_shell_gets_one_line(default_build):
    res = subprocess.run(
        [sys.executable, "-m", "omniforge", "run", str(default_build), "--prompt", b"caf\xe9 \xff"],
        capture_output=True,
        timeout=300,
    )
    assert res.returncode == 1
    one_error_line(res.stderr.decode(), "unpaired surrogate")
