# ruff: noqa: F811  (the native fixtures are imported from tests/test_native.py by name)
"""Media in and out through the C API: ``of_encoder_run`` (the encoder and its input projector on the
front end's output) against ``Pipeline.encode_image`` / ``encode_audio`` and the video path's mean
over frames, ``of_llm_embed_tokens`` against ``LlmRuntime.embed_ids``, ``of_decoder_conditioning``
(the output projector) against ``Pipeline.conditioning``; then one any-to-any request composed in C
(prompt rows with an image spliced in, the signal tokens' hidden states, the conditioning, the
decoder) against ``Pipeline.run``; and bad calls, each a status and one sentence."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from tests.test_native import (  # noqa: F401  (fixtures)
    BASE,
    native_build,
    native_cache,
    ort_headers,
    ort_library,
)
from tests.test_native_decoders import _BuildOptions, _DecoderOptions

P = ctypes.c_void_p
F = ctypes.POINTER(ctypes.c_float)
I32 = ctypes.POINTER(ctypes.c_int32)
SIZE = ctypes.POINTER(ctypes.c_size_t)


class OfImage(ctypes.Structure):
    _fields_ = [
        ("pixels", ctypes.POINTER(ctypes.c_uint8)),
        ("width", ctypes.c_int64),
        ("height", ctypes.c_int64),
        ("stride", ctypes.c_size_t),
    ]


def of_images(*arrays: np.ndarray):
    """(H, W, 3) uint8 arrays as an ``of_image`` array (the arrays must outlive it)."""
    u8 = ctypes.POINTER(ctypes.c_uint8)
    return (OfImage * len(arrays))(
        *[OfImage(a.ctypes.data_as(u8), a.shape[1], a.shape[0], a.strides[0]) for a in arrays]
    )


def media_library(native: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(native / "libomniforge.so"))
    i32, size = ctypes.c_int32, ctypes.c_size_t
    for name, (restype, argtypes) in {
        "of_build_open": (i32, [ctypes.c_char_p, ctypes.POINTER(_BuildOptions), ctypes.POINTER(P)]),
        "of_build_close": (None, [P]),
        "of_build_last_error": (ctypes.c_char_p, [P]),
        "of_status_name": (ctypes.c_char_p, [i32]),
        "of_encoder_open": (i32, [P, ctypes.c_char_p, ctypes.POINTER(P)]),
        "of_encoder_close": (None, [P]),
        "of_encoder_last_error": (ctypes.c_char_p, [P]),
        "of_encoder_input_name": (ctypes.c_char_p, [P]),
        "of_encoder_input_shape": (i32, [P, ctypes.POINTER(ctypes.c_int64), size, SIZE]),
        "of_encoder_rows": (i32, [P, SIZE, SIZE]),
        "of_encoder_run": (i32, [P, F, size, ctypes.c_int64, F, size]),
        "of_encoder_image_input": (i32, [P, ctypes.POINTER(OfImage), F, size]),
        "of_encoder_run_images": (i32, [P, ctypes.POINTER(OfImage), size, F, size]),
        "of_encoder_audio_input": (i32, [P, F, size, i32, F, size, ctypes.POINTER(ctypes.c_int64)]),
        "of_encoder_video_frames": (
            i32,
            [P, ctypes.c_int64, ctypes.c_double, ctypes.POINTER(ctypes.c_int64), size, SIZE],
        ),
        "of_encoder_run_audio": (i32, [P, F, size, i32, F, size]),
        "of_llm_open": (i32, [P, i32, i32, ctypes.POINTER(P)]),
        "of_llm_close": (None, [P]),
        "of_llm_last_error": (ctypes.c_char_p, [P]),
        "of_llm_embed_tokens": (i32, [P, I32, size, F, size]),
        "of_decoder_open": (i32, [P, ctypes.c_char_p, ctypes.POINTER(P)]),
        "of_decoder_close": (None, [P]),
        "of_decoder_last_error": (ctypes.c_char_p, [P]),
        "of_decoder_conditioning": (i32, [P, P, F, size, F, size]),
        "of_decoder_conditioning_input": (i32, [P, SIZE, SIZE]),
        "of_decoder_options_init": (None, [ctypes.POINTER(_DecoderOptions)]),
        "of_decoder_run": (i32, [P, F, size, F, F, size, ctypes.POINTER(_DecoderOptions), ctypes.POINTER(P)]),
        "of_llm_signal_hidden": (i32, [P, P, ctypes.c_char_p, F, size]),
        "of_generation_tokens": (I32, [P, SIZE]),
        "of_generation_free": (None, [P]),
        "of_media_data": (F, [P, SIZE]),
        "of_media_free": (None, [P]),
    }.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def floats(a: np.ndarray):
    return np.ascontiguousarray(a, np.float32).ctypes.data_as(F)


class Native:
    """One opened build with the handles a test asks for, closed at the end."""

    def __init__(self, native: Path, build: Path, ort_library: str) -> None:
        self.lib = media_library(native)
        opts = _BuildOptions(ort_library.encode(), 1, 0)
        self.build = P()
        status = self.lib.of_build_open(str(build).encode(), ctypes.byref(opts), ctypes.byref(self.build))
        assert status == 0, self.lib.of_build_last_error(self.build)
        self.handles: list[tuple[str, P]] = []

    def open(self, kind: str, modality: str) -> P:
        h = P()
        status = getattr(self.lib, f"of_{kind}_open")(self.build, modality.encode(), ctypes.byref(h))
        assert status == 0, self.lib.of_build_last_error(self.build).decode()
        self.handles.append((kind, h))
        return h

    def llm(self) -> P:
        h = P()
        assert self.lib.of_llm_open(self.build, 1, 0, ctypes.byref(h)) == 0, self.lib.of_build_last_error(
            self.build
        )
        self.handles.append(("llm", h))
        return h

    def input_shape(self, enc: P) -> tuple[int, ...]:
        rank = ctypes.c_size_t()
        shape = (ctypes.c_int64 * 8)()
        assert self.lib.of_encoder_input_shape(enc, shape, 8, ctypes.byref(rank)) == 0
        return tuple(shape[: rank.value])

    def encode(self, enc: P, x: np.ndarray) -> tuple[int, np.ndarray | str]:
        n, width = ctypes.c_size_t(), ctypes.c_size_t()
        assert self.lib.of_encoder_rows(enc, ctypes.byref(n), ctypes.byref(width)) == 0
        out = np.zeros((n.value, width.value), np.float32)
        x = np.ascontiguousarray(x, np.float32)
        status = self.lib.of_encoder_run(enc, floats(x), x.size, x.shape[0], floats(out), out.size)
        return status, out if status == 0 else self.lib.of_encoder_last_error(enc).decode()

    def encode_images(self, enc: P, *arrays: np.ndarray) -> tuple[int, np.ndarray | str]:
        """``of_encoder_run_images`` on (H, W, 3) uint8 arrays: (status, rows or the sentence)."""
        n, width = ctypes.c_size_t(), ctypes.c_size_t()
        assert self.lib.of_encoder_rows(enc, ctypes.byref(n), ctypes.byref(width)) == 0
        out = np.zeros((n.value, width.value), np.float32)
        status = self.lib.of_encoder_run_images(enc, of_images(*arrays), len(arrays), floats(out), out.size)
        return status, out if status == 0 else self.lib.of_encoder_last_error(enc).decode()

    def video_frames(self, enc: P, n_frames: int, fps: float) -> tuple[int, list[int] | str]:
        """``of_encoder_video_frames``: (status, the frame indices or the sentence)."""
        n = ctypes.c_size_t()
        status = self.lib.of_encoder_video_frames(enc, n_frames, fps, None, 0, ctypes.byref(n))
        if status != 0:
            return status, self.lib.of_encoder_last_error(enc).decode()
        out = (ctypes.c_int64 * n.value)()
        assert self.lib.of_encoder_video_frames(enc, n_frames, fps, out, n.value, ctypes.byref(n)) == 0
        return 0, list(out)

    def encode_audio(self, enc: P, samples: np.ndarray, rate: int) -> tuple[int, np.ndarray | str]:
        """``of_encoder_run_audio`` on mono float samples: (status, rows or the sentence)."""
        n, width = ctypes.c_size_t(), ctypes.c_size_t()
        assert self.lib.of_encoder_rows(enc, ctypes.byref(n), ctypes.byref(width)) == 0
        out = np.zeros((n.value, width.value), np.float32)
        x = np.ascontiguousarray(samples, np.float32)
        status = self.lib.of_encoder_run_audio(enc, floats(x), x.size, rate, floats(out), out.size)
        return status, out if status == 0 else self.lib.of_encoder_last_error(enc).decode()

    def conditioning(
        self, dec: P, llm: P | None, hidden: np.ndarray, n_cond: int
    ) -> tuple[int, np.ndarray | str]:
        cond = np.zeros(n_cond, np.float32)
        hidden = np.ascontiguousarray(hidden, np.float32)
        status = self.lib.of_decoder_conditioning(
            dec, llm, floats(hidden), hidden.size, floats(cond), cond.size
        )
        return status, cond if status == 0 else self.lib.of_decoder_last_error(dec).decode()

    def decode(self, dec: P, cond: np.ndarray, latents: np.ndarray, steps: int) -> np.ndarray:
        """``of_decoder_run`` from the given latents: the medium's floats."""
        opts = _DecoderOptions()
        self.lib.of_decoder_options_init(ctypes.byref(opts))
        opts.steps = steps
        media = P()
        status = self.lib.of_decoder_run(
            dec,
            floats(cond),
            cond.size,
            None,
            floats(latents),
            latents.size,
            ctypes.byref(opts),
            ctypes.byref(media),
        )
        assert status == 0, self.lib.of_decoder_last_error(dec)
        n = ctypes.c_size_t()
        out = np.ctypeslib.as_array(self.lib.of_media_data(media, ctypes.byref(n)), (n.value,)).copy()
        self.lib.of_media_free(media)
        return out

    def close(self) -> None:
        for kind, h in reversed(self.handles):
            getattr(self.lib, f"of_{kind}_close")(h)
        self.lib.of_build_close(self.build)


@pytest.fixture
def native(native_build: Path, default_build: Path, ort_library: str):
    n = Native(native_build, default_build, ort_library)
    yield n
    n.close()


@pytest.fixture(scope="module")
def pipe(default_build: Path):
    from omniforge.runtime.pipeline import Pipeline

    return Pipeline(default_build)


def _picture(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)


def test_encoder_rows_equal_the_python_runtime(native: Native, pipe, tmp_path: Path) -> None:
    from omniforge.runtime import media as M
    from omniforge.runtime.pipeline import _rows

    # an image: the front end's pixels in, the projected rows out
    enc = native.open("encoder", "image")
    assert native.lib.of_encoder_input_name(enc) == b"pixel_values"
    pic = _picture()
    x = pipe._image_pixels(pic, pipe.build.json("image_preprocessor"))[None]
    assert native.input_shape(enc) == x.shape
    status, rows = native.encode(enc, x)
    assert status == 0, rows
    np.testing.assert_allclose(rows, pipe.encode_image(pic), rtol=0, atol=1e-5)

    # a video's frames as a batch: their embeddings averaged, then projected
    vid = native.open("encoder", "video")
    frames = np.stack(
        [pipe._image_pixels(_picture(s), pipe.build.json("image_preprocessor")) for s in range(3)]
    )
    status, rows = native.encode(vid, frames)
    assert status == 0, rows
    emb = pipe._run("image_encoder", {"pixel_values": frames})["embeds"]
    want = pipe._project(_rows(emb.mean(axis=0, keepdims=True)))
    np.testing.assert_allclose(rows, want, rtol=0, atol=1e-5)
    assert np.abs(want - pipe.encode_image(_picture(0))).max() > 1e-3  # the mean is not one frame's

    # an audio clip: the front end's log-mel features in
    aud = native.open("encoder", "audio")
    wav = tmp_path / "tone.wav"
    t = np.arange(16000) / 16000
    M.write_wav(wav, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    fe = M.AudioFrontEnd.from_config(pipe.build.json("audio_frontend"))
    samples, sr = M.load_wav(wav, fe.read_seconds, None)
    feats = M.audio_features(samples, sr, fe)[None]
    assert native.lib.of_encoder_input_name(aud) == b"log_mel" and native.input_shape(aud) == feats.shape
    status, rows = native.encode(aud, feats)
    assert status == 0, rows
    np.testing.assert_allclose(rows, pipe.encode_audio(wav), rtol=0, atol=1e-5)


def test_pixels_in_equal_the_python_runtime(native: Native, pipe) -> None:
    """``of_encoder_image_input`` is the Python front end's output value for value, and
    ``of_encoder_run_images`` gives ``encode_image``'s rows and the video path's mean over frames,
    from pixels in rows with padding (a stride beyond width x 3)."""
    from omniforge.runtime import media as M
    from omniforge.runtime.pipeline import _rows

    cfg = pipe.build.json("image_preprocessor")
    enc = native.open("encoder", "image")
    for w, h in [(48, 40), (40, 48), (32, 32), (300, 7), (13, 19)]:
        wide = np.random.default_rng(w * h).integers(0, 256, (h, w + 3, 3), dtype=np.uint8)
        pic = wide[:, :w]  # rows (w + 3) x 3 bytes apart
        x = np.zeros(native.input_shape(enc)[1:], np.float32)
        status = native.lib.of_encoder_image_input(enc, of_images(pic), floats(x), x.size)
        assert status == 0, native.lib.of_encoder_last_error(enc)
        np.testing.assert_array_equal(x, pipe._image_pixels(np.ascontiguousarray(pic), cfg))
        status, rows = native.encode_images(enc, pic)
        assert status == 0, rows
        np.testing.assert_allclose(rows, pipe.encode_image(np.ascontiguousarray(pic)), rtol=0, atol=1e-5)

    vid = native.open("encoder", "video")
    frames = [_picture(s) for s in range(3)]
    status, rows = native.encode_images(vid, *frames)
    assert status == 0, rows
    emb = pipe._run("image_encoder", {"pixel_values": np.stack([pipe._image_pixels(f, cfg) for f in frames])})
    want = pipe._project(_rows(emb["embeds"].mean(axis=0, keepdims=True)))
    np.testing.assert_allclose(rows, want, rtol=0, atol=1e-5)

    # the frames a decoded video gives: the video decoder's count, evenly spaced
    for n_frames in (1, 5, 24, 1000):
        assert native.video_frames(vid, n_frames, 30.0) == (
            0,
            M.sample_indices(n_frames, pipe.video_frames).tolist(),
        )
    assert native.video_frames(enc, 10, 30.0) == (7, "the image encoder takes no video frames")
    status, why = native.video_frames(vid, 0, 30.0)
    assert status == 4 and why.startswith("the number of video frames must be an integer in [1, ")
    n = ctypes.c_size_t()
    small = (ctypes.c_int64 * 1)()
    assert native.lib.of_encoder_video_frames(vid, 100, 30.0, small, 1, ctypes.byref(n)) == 1
    assert native.lib.of_encoder_video_frames(vid, 100, 30.0, None, 0, None) == 1

    # bad pixels: each a status and one sentence
    lib, pic = native.lib, _picture()
    x = np.zeros(native.input_shape(enc)[1:], np.float32)
    assert native.encode_images(enc, pic, pic) == (1, "the image encoder takes one image per call, got 2")
    status, why = native.encode_images(enc, np.zeros((2, 202, 3), np.uint8))
    assert status == 4 and why == "image 'image' is 202x2, an aspect ratio beyond 100:1"
    img = of_images(pic)
    img[0].stride = 10
    assert lib.of_encoder_image_input(enc, img, floats(x), x.size) == 1
    assert "row stride 10 is below its 48 pixels x 3 bytes" in lib.of_encoder_last_error(enc).decode()
    img = of_images(pic)
    img[0].pixels = None
    assert lib.of_encoder_image_input(enc, img, floats(x), x.size) == 1
    img[0].width = 0
    assert lib.of_encoder_image_input(enc, img, floats(x), x.size) == 4
    assert lib.of_encoder_image_input(enc, None, floats(x), x.size) == 1
    assert lib.of_encoder_image_input(enc, of_images(pic), floats(x), x.size - 1) == 1
    assert lib.of_encoder_last_error(enc).decode().startswith("the input buffer must hold")
    assert lib.of_encoder_run_images(enc, of_images(pic), 0, floats(x), x.size) == 1
    status, why = native.encode_images(native.open("encoder", "audio"), pic)
    assert status == 7 and why == "the audio encoder takes audio features, not pixels"


def test_samples_in_equal_the_python_runtime(native: Native, pipe, tmp_path: Path) -> None:
    """``of_encoder_audio_input`` is the Python front end's log-mel (resampled from 44.1 kHz, and
    cut to the seconds it reads), and ``of_encoder_run_audio`` gives ``encode_audio``'s rows for
    the same WAV file's samples."""
    from omniforge.runtime import media as M

    enc = native.open("encoder", "audio")
    fe = M.AudioFrontEnd.from_config(pipe.build.json("audio_frontend"))
    t = np.arange(int(44100 * 2.5)) / 44100  # longer than the front end reads
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 2500 * t)).astype(np.float32)
    wav = tmp_path / "two.wav"
    M.write_wav(wav, x, 44100)
    samples, sr = M.load_wav(wav, 60.0, None)  # the whole file: the C call cuts what it reads
    batch = ctypes.c_int64()
    lib = native.lib
    assert (
        lib.of_encoder_audio_input(enc, floats(samples), samples.size, sr, None, 0, ctypes.byref(batch)) == 0
    )
    assert batch.value == 1
    want = M.audio_features(samples, sr, fe)[None]
    got = np.zeros(want.shape, np.float32)
    status = lib.of_encoder_audio_input(
        enc, floats(samples), samples.size, sr, floats(got), got.size, ctypes.byref(batch)
    )
    assert status == 0, lib.of_encoder_last_error(enc)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    status, rows = native.encode_audio(enc, samples, sr)
    assert status == 0, rows
    np.testing.assert_allclose(rows, pipe.encode_audio(wav), rtol=0, atol=1e-5)

    # bad samples: each a status and one sentence
    assert native.encode_audio(enc, samples[:0], sr) == (4, "the audio has no samples")
    bad = samples.copy()
    bad[7] = np.nan
    assert native.encode_audio(enc, bad, sr) == (4, "the audio holds NaN or infinite samples")
    assert native.encode_audio(enc, samples, 500) == (
        4,
        "the audio's sample rate 500 Hz is outside 1000 to 384000 Hz",
    )
    assert lib.of_encoder_run_audio(enc, None, 10, sr, floats(got), got.size) == 1
    status = lib.of_encoder_audio_input(
        enc, floats(samples), samples.size, sr, floats(got), got.size - 1, ctypes.byref(batch)
    )
    assert status == 1 and lib.of_encoder_last_error(enc).decode().startswith("the input buffer must hold")
    assert (
        lib.of_encoder_audio_input(enc, floats(samples), samples.size, sr, floats(got), got.size, None) == 1
    )
    status, why = native.encode_audio(native.open("encoder", "image"), samples, sr)
    assert status == 7 and why == "the image encoder takes pixels, not audio samples"


def test_token_embeddings_and_conditioning_equal_the_python_runtime(native: Native, pipe) -> None:
    llm = native.llm()
    ids = np.array([1, 5, 17, 300, 511], np.int32)
    h = pipe.llm.embed_ids(ids).shape[1]
    rows = np.zeros((len(ids), h), np.float32)
    status = native.lib.of_llm_embed_tokens(llm, ids.ctypes.data_as(I32), len(ids), floats(rows), rows.size)
    assert status == 0, native.lib.of_llm_last_error(llm)
    np.testing.assert_array_equal(rows, pipe.llm.embed_ids(ids))
    for modality in ("image", "video", "audio"):
        dec = native.open("decoder", modality)
        n, width = ctypes.c_size_t(), ctypes.c_size_t()
        assert native.lib.of_decoder_conditioning_input(dec, ctypes.byref(n), ctypes.byref(width)) == 0
        hidden = np.random.default_rng(1).standard_normal((n.value, width.value)).astype(np.float32)
        want = pipe.conditioning(modality, hidden)
        status, cond = native.conditioning(dec, None, hidden, want.size)
        assert status == 0, cond
        np.testing.assert_allclose(cond, want.reshape(-1), rtol=0, atol=1e-5)


def test_media_in_and_out_composed_in_c_equal_the_python_pipeline(native: Native, pipe) -> None:
    """An image-in, image-out request's C half: the prompt rows (token embeddings with the image's
    rows at its placeholder) equal ``LlmRuntime.prepare``'s, and from the signal tokens' hidden states
    the conditioning and the decoded image equal ``Pipeline.conditioning`` / ``decode_image``'s."""
    from omniforge.runtime.pipeline import DiffusionConfig

    pic = _picture(3)
    prompt = "<image> Describe it and draw it"
    enc = native.open("encoder", "image")
    x = pipe._image_pixels(pic, pipe.build.json("image_preprocessor"))[None]
    _, media_rows = native.encode(enc, x)
    ids = pipe.llm.tokenizer.encode(prompt)
    at = ids.index(pipe.llm.tokenizer.token_id("<image>"))
    llm = native.llm()
    text = np.zeros((len(ids), media_rows.shape[1]), np.float32)
    arr = np.asarray(ids, np.int32)
    assert (
        native.lib.of_llm_embed_tokens(llm, arr.ctypes.data_as(I32), len(ids), floats(text), text.size) == 0
    )
    rows = np.concatenate([text[:at], media_rows, text[at + 1 :]])
    want_rows, _ = pipe.llm.prepare(prompt, {"image": [pipe.encode_image(pic)]})
    np.testing.assert_allclose(rows, want_rows, rtol=0, atol=1e-5)

    hidden = pipe.signal_hidden(want_rows, "image")
    want_cond = pipe.conditioning("image", hidden)
    dec = native.open("decoder", "image")
    status, cond = native.conditioning(dec, llm, hidden, want_cond.size)
    assert status == 0, cond
    np.testing.assert_allclose(cond, want_cond.reshape(-1), rtol=0, atol=1e-5)
    diff = DiffusionConfig(steps=3, seed=0)
    latents = pipe.initial_latents("image", diff.seed)
    want = pipe.decode_image(want_cond, diff, latents)
    image = native.decode(dec, cond, latents, diff.steps)
    np.testing.assert_allclose(image.reshape(want.shape), want, rtol=0, atol=1e-4)


def test_bad_media_calls_get_a_status_and_one_sentence(native: Native, pipe) -> None:
    lib = native.lib
    h = P()
    assert lib.of_encoder_open(native.build, b"smell", ctypes.byref(h)) == 1
    assert "unknown modality 'smell'" in lib.of_build_last_error(native.build).decode()
    assert lib.of_encoder_open(native.build, None, ctypes.byref(h)) == 1
    enc = native.open("encoder", "image")
    shape = native.input_shape(enc)
    x = np.zeros(shape, np.float32)
    status, why = native.encode(enc, x[..., :-1])
    assert status == 4 and why.startswith("the image encoder's 'pixel_values' must hold") and "got" in why
    bad = x.copy()
    bad.flat[3] = np.nan
    assert native.encode(enc, bad) == (4, "the image encoder's input holds NaN or infinite values")
    out = np.zeros(3, np.float32)
    assert lib.of_encoder_run(enc, floats(x), x.size, 1, floats(out), out.size) == 1
    assert "the rows buffer must hold" in lib.of_encoder_last_error(enc).decode()
    assert lib.of_encoder_run(enc, None, x.size, 1, floats(out), out.size) == 1
    assert lib.of_encoder_run(enc, floats(x), x.size, 0, floats(out), out.size) == 1
    assert lib.of_encoder_run(None, floats(x), x.size, 1, floats(out), out.size) == 1
    assert lib.of_encoder_last_error(None) == b"the encoder handle is a null pointer"

    llm = native.llm()
    ids = np.array([1, 99999], np.int32)
    rows = np.zeros((2, 64), np.float32)
    assert lib.of_llm_embed_tokens(llm, ids.ctypes.data_as(I32), 2, floats(rows), rows.size) == 4
    assert "token ids must lie in [0, " in lib.of_llm_last_error(llm).decode()
    assert lib.of_llm_embed_tokens(llm, ids.ctypes.data_as(I32), 2, floats(rows), 5) == 1

    dec = native.open("decoder", "image")
    n, width = ctypes.c_size_t(), ctypes.c_size_t()
    assert lib.of_decoder_conditioning_input(dec, ctypes.byref(n), ctypes.byref(width)) == 0
    hidden = np.zeros((n.value, width.value), np.float32)
    size = int(np.prod(pipe.conditioning("image", hidden).shape))
    status, why = native.conditioning(dec, None, hidden[:-1], size)
    assert status == 4 and why.startswith(f"the image output projector takes {n.value} signal hidden states")
    hidden[0, 0] = np.inf
    assert native.conditioning(dec, None, hidden, size) == (
        4,
        "the image signal hidden states hold NaN or infinite values",
    )
    status, why = native.conditioning(dec, None, hidden, size + 1)
    assert status == 1 and why.startswith("the conditioning buffer must hold")


class _MediaRows(ctypes.Structure):
    _fields_ = [("modality", ctypes.c_char_p), ("rows", F), ("n_rows", ctypes.c_size_t)]


def generate_media(nat, prompt: str, media: list[tuple[str, np.ndarray]], config):
    """``of_llm_generate_media`` through the Python wrapper's request plumbing: (status, result or
    the sentence)."""
    from omniforge.errors import OmniforgeError
    from omniforge.runtime.native import _GenerateOptions

    fn = nat.lib.of_llm_generate_media
    fn.restype = ctypes.c_int32
    fn.argtypes = [P, ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(_MediaRows), ctypes.c_size_t]
    fn.argtypes += [ctypes.POINTER(_GenerateOptions), ctypes.POINTER(P)]
    arrays = [np.ascontiguousarray(r, np.float32) for _, r in media]
    items = (_MediaRows * max(1, len(media)))(
        *[_MediaRows(m.encode(), floats(a), len(a)) for (m, _), a in zip(media, arrays, strict=True)]
    )
    text = prompt.encode()
    try:
        return 0, nat._call(
            lambda opts, out: fn(nat._llm, text, len(text), items, len(media), opts, out), config, None, 0.0
        )
    except OmniforgeError as exc:
        return 1, str(exc)


def test_a_prompt_with_media_is_laid_out_as_pipeline_run_does(
    native_build: Path, default_build: Path, pipe
) -> None:
    """``of_llm_generate_media`` on the default build (placeholders): the tokens of the Python loop
    fed ``LlmRuntime.prepare``'s rows for the same text (with the placeholders ``Pipeline.run`` puts
    in front) and media rows, greedy and sampled; its refusals in the Python runtime's words."""
    from omniforge.runtime.native import NativeLlm
    from omniforge.runtime.sampling import GenerationConfig

    image = pipe.encode_image(_picture(1))
    rng = np.random.default_rng(5)
    h = image.shape[1]
    sound = rng.standard_normal((1, h)).astype(np.float32)
    nat = NativeLlm(
        default_build, 1, 0, threads=1, library=native_build / "libomniforge.so", needs_tokenizer=True
    )
    try:
        cases = [
            ("<image> What is this?", [("image", image)], "<image> What is this?"),
            ("What is this?", [("image", image)], "<image> What is this?"),
            ("Compare", [("image", image), ("audio", sound)], "<audio> <image> Compare"),
            (
                "<audio> then <image> and <image>",
                [("image", image), ("audio", sound), ("image", 2 * image)],
                None,
            ),
            ("Just text", [], "Just text"),
        ]
        for prompt, media, laid_out in cases:
            text = laid_out or prompt
            grouped: dict[str, list[np.ndarray]] = {}
            for m, r in media:
                grouped.setdefault(m, []).append(r)
            rows, ids = pipe.llm.prepare(text, grouped or None)
            for cfg in (
                GenerationConfig(max_new_tokens=12),
                GenerationConfig(max_new_tokens=12, temperature=0.8, seed=3),
            ):
                want = pipe.llm.generate_rows([rows], [ids], cfg, adapters=[None])[0]
                status, got = generate_media(nat, prompt, media, cfg)
                assert status == 0, got
                assert got.token_ids == want.token_ids, (prompt, cfg)
                assert got.text == want.text

        two = [("image", image), ("image", image)]
        status, why = generate_media(nat, "<image> once", two, GenerationConfig(max_new_tokens=2))
        with pytest.raises(Exception) as exc:
            pipe.llm.prepare("<image> once", {"image": [image, image]})
        assert (status, why) == (1, str(exc.value))
        bad = image.copy()
        bad[0, 0] = np.nan
        assert generate_media(nat, "<image> x", [("image", bad)], GenerationConfig(max_new_tokens=2)) == (
            1,
            "image embeddings contain NaN or Inf",
        )
        status, why = generate_media(nat, "x", [("smell", image)], GenerationConfig(max_new_tokens=2))
        assert status == 1 and why.startswith("unknown modality 'smell'")
        long = np.zeros((pipe.llm.pool.max_context - 2, h), np.float32)
        status, why = generate_media(
            nat, "<image> a long caption", [("image", long)], GenerationConfig(max_new_tokens=2)
        )
        assert status == 1 and why.startswith("the prompt with its media is ") and "leaving no room" in why
    finally:
        nat.close()


def test_a_forced_image_composed_in_c_equals_pipeline_run(native: Native, pipe) -> None:
    """Pipeline.run(..., force=["image"]) in C calls: the encoder, ``of_llm_generate_media`` with the
    signal tokens' hidden states kept, ``of_llm_signal_hidden`` (the model generated no whole set of
    image signal tokens, so they are teacher-forced after the reply, as the Python pipeline does),
    the conditioning and the decoder: the same tokens and the same image."""
    from omniforge.runtime.native import _GenerateOptions
    from omniforge.runtime.pipeline import DiffusionConfig
    from omniforge.runtime.sampling import GenerationConfig

    pic, prompt = _picture(4), "Describe it and draw it"
    gen, diff = GenerationConfig(max_new_tokens=16), DiffusionConfig(steps=3, seed=0)
    want = pipe.run(prompt, image=pic, generation=gen, diffusion=diff, force=["image"], adapter=BASE)
    assert pipe._generated_signal_rows(want.generation, "image") is None  # forced, not generated

    enc, llm, dec = native.open("encoder", "image"), native.llm(), native.open("decoder", "image")
    _, rows = native.encode(enc, pipe._image_pixels(pic, pipe.build.json("image_preprocessor"))[None])
    lib = native.lib
    fn = lib.of_llm_generate_media
    fn.restype, fn.argtypes = (
        ctypes.c_int32,
        [P, ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(_MediaRows)],
    )
    fn.argtypes += [ctypes.c_size_t, ctypes.POINTER(_GenerateOptions), ctypes.POINTER(P)]
    init = lib.of_generate_options_init
    init.restype, init.argtypes = None, [ctypes.POINTER(_GenerateOptions)]
    opts = _GenerateOptions()
    init(ctypes.byref(opts))
    opts.max_new_tokens, opts.collect_signal_hidden = gen.max_new_tokens, 1
    item = (_MediaRows * 1)(_MediaRows(b"image", floats(rows), len(rows)))
    g = P()
    text = prompt.encode()
    assert fn(llm, text, len(text), item, 1, ctypes.byref(opts), ctypes.byref(g)) == 0, lib.of_llm_last_error(
        llm
    )
    try:
        n = ctypes.c_size_t()
        ids = lib.of_generation_tokens(g, ctypes.byref(n))
        assert list(ids[: n.value]) == want.generation.token_ids
        n_signal, width = ctypes.c_size_t(), ctypes.c_size_t()
        assert lib.of_decoder_conditioning_input(dec, ctypes.byref(n_signal), ctypes.byref(width)) == 0
        hidden = np.zeros((n_signal.value, width.value), np.float32)
        status = lib.of_llm_signal_hidden(llm, g, b"image", floats(hidden), hidden.size)
        assert status == 0, lib.of_llm_last_error(llm)
        assert lib.of_llm_signal_hidden(llm, g, b"image", floats(hidden), hidden.size - 1) == 1
        assert lib.of_llm_signal_hidden(llm, g, b"smell", floats(hidden), hidden.size) == 4
        assert lib.of_llm_last_error(llm) == b"this build has no signal tokens for 'smell'"
    finally:
        lib.of_generation_free(g)
    cond_size = int(np.prod(pipe.conditioning("image", hidden).shape))
    status, cond = native.conditioning(dec, llm, hidden, cond_size)
    assert status == 0, cond
    image = native.decode(dec, cond, pipe.initial_latents("image", diff.seed), diff.steps)
    np.testing.assert_allclose(image.reshape(want.images[0].shape), want.images[0], rtol=0, atol=1e-4)
