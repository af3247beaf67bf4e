"""Property tests over media files, arrays, prompts and options (issue 20), beyond the header
sizes of tests/test_hostile_inputs.py: WAV files built chunk by chunk (odd chunk ids, sizes that lie,
fmt chunks of any length, thousands of chunks), real PNG/GIF/BMP/WAV files with bytes flipped or
cut, image headers of other formats with any size, arrays whose shapes claim terabytes (numpy
broadcast views, which cost nothing until copied), prompts mixing placeholders and signal tokens,
and diffusion and generation options. Each ends in a result or exactly one OmniforgeError
sentence, in bounded time and bounded memory."""

from __future__ import annotations

import io
import os
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from omniforge.errors import ConfigError, ContextLengthError, InputError, OmniforgeError
from omniforge.runtime import media as M
from omniforge.runtime.llm import GenerationResult
from omniforge.runtime.pipeline import DiffusionConfig, Pipeline, PipelineResult
from omniforge.runtime.sampling import GenerationConfig
from tests.test_hostile_inputs import bounded

PROPERTY = settings(
    max_examples=int(os.environ.get("OMNIFORGE_PROPERTY_EXAMPLES", 60)),
    deadline=None,  # `bounded` is the time limit: a slow CI machine must not make it flaky
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FEW = settings(PROPERTY, max_examples=max(15, PROPERTY.max_examples // 4))
SMALL_PEAK = 64 * 2**20  # what a small file or a refused array may cost


def outcome(fn, allowed=(InputError,), timeout: float = 60.0):
    """``fn()``'s result and the peak bytes numpy/Python held, or the one-line error of an
    ``allowed`` type it raised; any other exception fails the test."""
    tracemalloc.start()
    try:
        try:
            got = bounded(fn, timeout)
        except OmniforgeError as exc:
            assert isinstance(exc, allowed), f"{type(exc).__name__}: {exc}"
            assert "\n" not in str(exc) and len(str(exc)) < 600, str(exc)
            got = exc
        return got, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def pipe(default_build):
    return Pipeline(default_build)


# ---- WAV files, chunk by chunk ------------------------------------------------------------------
def fmt_body(tag: int, channels: int, rate: int, bits: int, align: int | None, extra: bytes) -> bytes:
    align = channels * (bits // 8) if align is None else align
    return (
        struct.pack(
            "<HHIIHH", tag & 0xFFFF, channels & 0xFFFF, rate, rate * align & 0xFFFFFFFF, align & 0xFFFF, bits
        )
        + extra
    )


FMT = st.builds(
    fmt_body,
    tag=st.sampled_from([0, 1, 2, 3, 0xFFFE]),
    channels=st.sampled_from([0, 1, 2, 6, 64, 65, 65535]),
    rate=st.sampled_from([0, 1, 999, 8000, 16000, 48000, 384_000, 384_001, 2**32 - 1]),
    bits=st.sampled_from([0, 1, 8, 16, 24, 32, 64, 65535]),
    align=st.one_of(st.none(), st.integers(0, 65535)),
    extra=st.one_of(
        st.just(b""),
        st.binary(max_size=30),
        # a WAVE_FORMAT_EXTENSIBLE tail naming PCM or float
        st.sampled_from([1, 3, 7]).map(
            lambda f: struct.pack("<HHI", 22, 16, 3) + struct.pack("<H", f) + M._GUID_TAIL
        ),
    ),
)
CHUNK_ID = st.sampled_from([b"fmt ", b"data", b"LIST", b"fact", b"JUNK", b"\x00\x00\x00\x00", b"data"])
SIZE_LIE = st.one_of(st.none(), st.sampled_from([0, 1, 3, 2**31 - 1, 2**32 - 1]), st.integers(0, 4096))


@st.composite
def wav_files(draw) -> bytes:
    chunks = []
    for _ in range(draw(st.integers(0, 5))):
        cid = draw(CHUNK_ID)
        body = draw(FMT) if cid == b"fmt " else draw(st.binary(max_size=2048))
        size = draw(SIZE_LIE)
        chunks.append(cid + struct.pack("<I", len(body) if size is None else size) + body)
    if draw(st.integers(0, 2)):  # a well-formed pair, somewhere (two times in three)
        pair = b"fmt " + struct.pack("<I", 16) + fmt_body(1, 1, 16000, 16, None, b"")
        data = draw(st.binary(min_size=2, max_size=4096))
        chunks.insert(draw(st.integers(0, len(chunks))), pair + b"data" + struct.pack("<I", len(data)) + data)
    body = b"WAVE" + b"".join(chunks)
    riff = draw(st.one_of(st.just(len(body)), SIZE_LIE.map(lambda s: s or 0)))
    head = draw(st.sampled_from([b"RIFF"] * 3 + [b"RIFX", b"RF64", b"\x00\x00\x00\x00"]))
    return head + struct.pack("<I", riff & 0xFFFFFFFF) + body


@PROPERTY
@given(raw=wav_files())
def test_any_wav_file_gives_samples_or_one_error(pipe, tmp_path, raw):
    f = tmp_path / "any.wav"
    f.write_bytes(raw)
    got, peak = outcome(lambda: M.load_wav(f))
    assert peak < SMALL_PEAK, peak
    event(type(got).__name__)
    if isinstance(got, OmniforgeError):
        return
    samples, sr = got
    assert M.MIN_SAMPLE_RATE <= sr <= M.MAX_SAMPLE_RATE and 0 < len(samples) <= len(raw)
    assert samples.dtype == np.float32 and np.isfinite(samples).all()
    emb, _ = outcome(lambda: pipe.encode_audio(f))
    assert not isinstance(emb, OmniforgeError) and np.isfinite(emb).all(), emb


def test_a_wav_of_many_chunks_is_walked_only_so_far(tmp_path):
    junk = (b"JUNK" + struct.pack("<I", 0)) * 100_000  # 800 KB of empty chunks before 'fmt '
    f = tmp_path / "many.wav"
    f.write_bytes(b"RIFF" + struct.pack("<I", 4 + len(junk)) + b"WAVE" + junk)
    got, peak = outcome(lambda: M.load_wav(f), timeout=10)
    assert isinstance(got, InputError) and f"first {M.MAX_WAV_CHUNKS} chunks" in str(got), got
    assert peak < SMALL_PEAK


# ---- real files with bytes flipped or cut -------------------------------------------------------
def _png(w=7, h=5, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), 128).save(buf, format="PNG")
    return buf.getvalue()


def _gif() -> bytes:
    buf = io.BytesIO()
    frames = [Image.new("P", (6, 4), i) for i in range(3)]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _bmp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (5, 3), (1, 2, 3)).save(buf, format="BMP")
    return buf.getvalue()


def _wav() -> bytes:
    pcm = (np.sin(np.arange(800) / 5) * 8000).astype("<i2").tobytes()
    fmt = fmt_body(1, 1, 16000, 16, None, b"")
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(pcm)) + pcm
    return b"RIFF" + struct.pack("<I", len(body)) + body


SEEDS = {"png": _png(), "png16": _png(mode="I;16"), "gif": _gif(), "bmp": _bmp(), "wav": _wav()}


@PROPERTY
@given(
    kind=st.sampled_from(sorted(SEEDS)),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_a_damaged_media_file_is_read_or_refused_in_one_sentence(pipe, tmp_path, kind, flips, cut):
    data = bytearray(SEEDS[kind])
    for pos, value in flips:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    f = tmp_path / f"damaged.{kind[:3]}"
    f.write_bytes(bytes(data))
    load = M.load_wav if kind == "wav" else M.load_image
    got, peak = outcome(lambda: load(f))
    assert peak < SMALL_PEAK, peak
    event(f"{kind}: {type(got).__name__}")
    if kind == "gif":  # also as a video: frames sampled one at a time
        frames, _ = outcome(lambda: M.load_video_frames(f, 4))
        assert isinstance(frames, InputError) or len(frames) == 4
    if isinstance(got, Image.Image):
        M.check_image_size(got.width, got.height, "decoded")
        emb, _ = outcome(lambda: pipe.encode_image(f))
        assert not isinstance(emb, OmniforgeError) and np.isfinite(emb).all(), emb


# ---- image headers of other formats, any size ---------------------------------------------------
def bmp_header(width: int, height: int, bpp: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bpp, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def gif_header(width: int, height: int) -> bytes:
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00;"
    return b"GIF89a" + screen + frame


def tiff_header(width: int, height: int) -> bytes:
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1)]
    tags += [(273, 4, 1, 8), (278, 4, 1, height), (279, 4, 1, 1)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", *t) for t in tags) + b"\0" * 4
    return b"II*\x00" + struct.pack("<I", 8) + ifd


@PROPERTY
@given(
    fmt=st.sampled_from(["bmp", "gif", "tiff"]),
    width=st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 1, 100, 101, 8000, 65535])),
    height=st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 1, 80, 8000, 65535])),
    bpp=st.sampled_from([0, 1, 8, 24, 32, 64]),
)
def test_any_image_header_size_gets_one_error(tmp_path, fmt, width, height, bpp):
    if fmt == "bmp":
        raw = bmp_header(width, height, bpp)
    elif fmt == "gif":
        raw = gif_header(width & 0xFFFF, height & 0xFFFF)
    else:
        raw = tiff_header(width & 0xFFFFFFFF, height & 0xFFFFFFFF)
    f = tmp_path / f"any.{fmt}"
    f.write_bytes(raw)
    got, peak = outcome(lambda: M.load_image(f))
    assert peak < SMALL_PEAK, peak
    if isinstance(got, Image.Image):  # a header with no pixel data may still decode as blank
        M.check_image_size(got.width, got.height, "decoded")
    event(type(got).__name__)


# ---- arrays whose shapes claim terabytes ----------------------------------------------------------
def huge(dtype, shape):
    """A read-only array of ``shape`` that holds one element: nothing is allocated until copied."""
    return np.broadcast_to(np.zeros((), dtype), shape)


@pytest.mark.parametrize(
    "call, allowed",
    [
        (lambda p: p.llm.prepare(huge(np.float32, (10**9, p.llm.geometry.hidden_size))), ContextLengthError),
        (lambda p: p.llm.prepare(huge(np.int64, (10**12,))), ContextLengthError),
        (lambda p: p.llm.prepare(huge(np.float16, (3, 10**12))), InputError),
        (lambda p: p.encode_image(huge(np.uint8, (10**6, 10**6, 3))), InputError),
        (lambda p: p.encode_image(huge(np.uint8, (2**31, 1, 3))), InputError),
        (lambda p: p.check_latents("image", huge(np.float32, (10**4,) * 4)), InputError),
        (
            lambda p: M.audio_features(huge(np.float32, (10**12,)), 16000, p.build.json("audio_frontend")),
            None,
        ),
        pytest.param(
            lambda p: p.llm.prepare(
                [p.llm.tokenizer.token_id("<image>"), 5],
                {"image": [huge(np.float32, (10**9, p.llm.geometry.hidden_size))]},
            ),
            ContextLengthError,
            id="media-rows",
        ),
    ],
)
def test_arrays_claiming_terabytes_are_refused_before_copying(pipe, call, allowed):
    got, peak = outcome(lambda: call(pipe), allowed=(InputError,), timeout=30)
    if allowed is None:
        assert not isinstance(got, OmniforgeError), got
    else:
        assert isinstance(got, allowed), got
    assert peak < SMALL_PEAK, f"{peak / 2**20:.0f} MiB held"


# ---- prompts mixing placeholders, signal tokens and odd text --------------------------------------
PIECES = st.sampled_from(
    ["A", " dog", "<image>", "<audio>", "<video>", "[IMG0]", "[AUD3]", "[VID23]", "<s>", "</s>", "\x00"]
    + ["\u202e", "\n", "😀", "e\u0301", " " * 50, "<Img>", "</Img>", "###", "\ufeff"]
)


@FEW
@given(
    pieces=st.lists(PIECES, min_size=1, max_size=40),
    image=st.booleans(),
    force=st.sets(st.sampled_from(["image", "audio"]), max_size=1),
)
def test_any_prompt_text_with_media_runs_or_gets_one_error(pipe, pieces, image, force):
    prompt = "".join(pieces)
    got, _ = outcome(
        lambda: pipe.run(
            prompt,
            image=np.full((8, 8, 3), 100, np.uint8) if image else None,
            generation=GenerationConfig(max_new_tokens=3),
            diffusion=DiffusionConfig(steps=1),
            force=sorted(force),
        )
    )
    event(type(got).__name__)
    if isinstance(got, PipelineResult):
        assert isinstance(got.text, str) and len(got.images) >= ("image" in force)
        for arr in (*got.images, *got.audios):
            assert np.isfinite(arr).all()


# ---- options ------------------------------------------------------------------------------------
ANY = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=4),
    st.lists(st.integers(-3, 600), max_size=3),
)  # fmt: skip


@st.composite
def options(draw, plausible: dict[str, st.SearchStrategy]) -> dict:
    """Every field plausible but for up to two drawn from ``ANY``: most sets of options get past
    the first check and reach the code that uses them."""
    odd = draw(st.sets(st.sampled_from(sorted(plausible)), max_size=2))
    return {k: draw(ANY if k in odd else s) for k, s in plausible.items()}


@PROPERTY
@given(
    options=options(
        {
            "steps": st.one_of(st.integers(1, 3), st.integers(-2, 1100)),
            "guidance_scale": st.one_of(st.floats(0, 20), st.sampled_from([0, 1, 1.0000001, 1e300, -1])),
            "seed": st.integers(0, 2**64 - 1),
            "scheduler": st.sampled_from(["ddim", "euler", "dpm", "pndm"]),
        }
    ),
    modality=st.sampled_from(["image", "video", "audio"]),
)
def test_any_diffusion_options_denoise_or_get_one_error(pipe, modality, options):
    try:
        cfg = DiffusionConfig(**options)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        event("refused by DiffusionConfig")
        return
    checked, _ = outcome(lambda: pipe.check_steps(modality, cfg), allowed=(ConfigError,))
    if isinstance(checked, OmniforgeError):
        event("refused by the scheduler")
        return
    if cfg.steps > 2:  # the whole range is tried at its ends in test_new_user_media.py
        return
    got, _ = outcome(
        lambda: pipe.run(
            "A dog", generation=GenerationConfig(max_new_tokens=1), diffusion=cfg, force=[modality]
        )
    )
    event(f"run: {type(got).__name__}")
    if isinstance(got, PipelineResult):
        assert all(np.isfinite(a).all() for a in (*got.images, *got.videos, *got.audios))


@pytest.mark.parametrize("guidance", [1e39, 1e300])
def test_a_guidance_scale_beyond_float32_is_refused_as_an_option(guidance):
    with pytest.raises(ConfigError, match="guidance scale"):
        DiffusionConfig(guidance_scale=guidance)


@PROPERTY
@given(
    options=options(
        {
            "stop_token_ids": st.one_of(st.none(), st.lists(st.integers(0, 600), max_size=4).map(tuple)),
            "stop_strings": st.lists(st.text(max_size=3), max_size=3).map(tuple),
            "top_k": st.integers(0, 10**6),
            "top_p": st.floats(0, 1),
            "collect_signal_hidden": st.booleans(),
            "temperature": st.sampled_from([0.0, 0.001, 0.7, 1000.0]),
        }
    )
)
def test_any_stop_and_sampling_options_generate_or_get_one_error(pipe, options):
    try:
        cfg = GenerationConfig(max_new_tokens=3, **options)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        event("refused")
        return
    got, _ = outcome(lambda: pipe.llm.generate("A dog runs", cfg))
    assert isinstance(got, GenerationResult), got
    assert got.new_tokens <= 3
    event("generated")
