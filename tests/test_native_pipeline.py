# ruff: noqa: F811  (the native fixtures are imported from tests/test_native.py by name)
"""The whole any-to-any request in one C call (``of_pipeline_run``) against the Python runtime's
``Pipeline.run`` on the default build: an image's pixels in with image and audio forced out, a
recording's samples and a video's frames in, text alone; the same tokens and text, the same
signal events, and the media within 1e-4 from the same initial noise; streaming; and bad
requests, each a status and one sentence."""

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
from tests.test_native_media import OfImage, floats, of_images

P = ctypes.c_void_p
SIZE = ctypes.POINTER(ctypes.c_size_t)
F = ctypes.POINTER(ctypes.c_float)


class _Latents(ctypes.Structure):
    _fields_ = [("modality", ctypes.c_char_p), ("data", F), ("n", ctypes.c_size_t)]


class _Request(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("prompt", ctypes.c_char_p),
        ("prompt_len", ctypes.c_size_t),
        ("image", ctypes.POINTER(OfImage)),
        ("audio", F),
        ("n_audio", ctypes.c_size_t),
        ("audio_rate", ctypes.c_int32),
        ("video", ctypes.POINTER(OfImage)),
        ("n_video_frames", ctypes.c_size_t),
        ("video_audio", F),
        ("n_video_audio", ctypes.c_size_t),
        ("video_audio_rate", ctypes.c_int32),
        ("force", ctypes.c_char_p),
        ("latents", ctypes.POINTER(_Latents)),
        ("n_latents", ctypes.c_size_t),
    ]


def _library(native: Path) -> ctypes.CDLL:
    from omniforge.runtime.native import _GenerateOptions

    lib = ctypes.CDLL(str(native / "libomniforge.so"))
    i32 = ctypes.c_int32
    for name, (restype, argtypes) in {
        "of_build_open": (i32, [ctypes.c_char_p, ctypes.POINTER(_BuildOptions), ctypes.POINTER(P)]),
        "of_build_close": (None, [P]),
        "of_build_last_error": (ctypes.c_char_p, [P]),
        "of_pipeline_open": (i32, [P, i32, i32, ctypes.POINTER(P)]),
        "of_pipeline_close": (None, [P]),
        "of_pipeline_last_error": (ctypes.c_char_p, [P]),
        "of_request_init": (None, [ctypes.POINTER(_Request)]),
        "of_generate_options_init": (None, [ctypes.POINTER(_GenerateOptions)]),
        "of_decoder_options_init": (None, [ctypes.POINTER(_DecoderOptions)]),
        "of_pipeline_run": (
            i32,
            [P, ctypes.POINTER(_Request), ctypes.POINTER(_GenerateOptions)]
            + [ctypes.POINTER(_DecoderOptions), ctypes.POINTER(P)],
        ),
        "of_response_generation": (P, [P]),
        "of_response_media_count": (ctypes.c_size_t, [P]),
        "of_response_media": (P, [P, ctypes.c_size_t]),
        "of_response_free": (None, [P]),
        "of_generation_tokens": (ctypes.POINTER(i32), [P, SIZE]),
        "of_generation_text": (ctypes.c_void_p, [P, SIZE]),
        "of_generation_signal_count": (ctypes.c_size_t, [P]),
        "of_generation_prompt_tokens": (ctypes.c_size_t, [P]),
        "of_media_data": (F, [P, SIZE]),
        "of_media_shape": (ctypes.POINTER(ctypes.c_int64), [P, SIZE]),
        "of_media_kind": (ctypes.c_char_p, [P]),
    }.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


class NativePipeline:
    def __init__(self, native: Path, build: Path, ort_library: str) -> None:
        self.lib = _library(native)
        self.build = P()
        opts = _BuildOptions(ort_library.encode(), 1, 0)
        assert self.lib.of_build_open(str(build).encode(), ctypes.byref(opts), ctypes.byref(self.build)) == 0
        self.pipe = P()
        status = self.lib.of_pipeline_open(self.build, 2, 0, ctypes.byref(self.pipe))
        assert status == 0, self.lib.of_build_last_error(self.build)

    def run(self, prompt: str, max_new_tokens: int = 16, steps: int = 2, on_text=None, **media):
        """(status, {tokens, text, signals, media: [(kind, array)]} or the sentence)."""
        from omniforge.runtime.native import _TOKEN_CB, _GenerateOptions

        lib, keep = self.lib, []
        req = _Request()
        lib.of_request_init(ctypes.byref(req))
        text = prompt.encode()
        req.prompt, req.prompt_len = text, len(text)
        if "image" in media:
            req.image = of_images(media["image"])
            keep.append(req.image)
        for field in ("audio", "video_audio"):  # mono samples and their rate
            if field in media:
                samples, rate = media[field]
                keep.append(samples := np.ascontiguousarray(samples, np.float32))
                setattr(req, field, floats(samples))
                setattr(req, f"n_{field}", samples.size)
                setattr(req, f"{field}_rate", rate)
        if "video" in media:
            req.video = of_images(*media["video"])
            req.n_video_frames = len(media["video"])
            keep.append(req.video)
        if "force" in media:
            req.force = media["force"].encode()
        if "latents" in media:
            arrays = {m: np.ascontiguousarray(x, np.float32) for m, x in media["latents"].items()}
            keep.append(arrays)
            lat = (_Latents * len(arrays))(
                *[_Latents(m.encode(), floats(x), x.size) for m, x in arrays.items()]
            )
            req.latents, req.n_latents = lat, len(arrays)
        gen = _GenerateOptions()
        lib.of_generate_options_init(ctypes.byref(gen))
        gen.max_new_tokens = max_new_tokens
        if on_text is not None:
            cb = _TOKEN_CB(lambda _u, _id, s, n: on_text(ctypes.string_at(s, n).decode()) or 0)
            gen.on_token = cb
            keep.append(cb)
        dec = _DecoderOptions()
        lib.of_decoder_options_init(ctypes.byref(dec))
        dec.steps = steps
        resp = P()
        status = lib.of_pipeline_run(
            self.pipe, ctypes.byref(req), ctypes.byref(gen), ctypes.byref(dec), ctypes.byref(resp)
        )
        if status != 0:
            return status, lib.of_pipeline_last_error(self.pipe).decode()
        try:
            g = lib.of_response_generation(resp)
            n = ctypes.c_size_t()
            tokens = list(lib.of_generation_tokens(g, ctypes.byref(n))[: n.value])
            ptr = lib.of_generation_text(g, ctypes.byref(n))
            out = {"tokens": tokens, "text": ctypes.string_at(ptr, n.value).decode(), "media": []}
            out["signals"] = lib.of_generation_signal_count(g)
            out["prompt_tokens"] = lib.of_generation_prompt_tokens(g)
            for i in range(lib.of_response_media_count(resp)):
                m = lib.of_response_media(resp, i)
                rank = ctypes.c_size_t()
                shape = tuple(lib.of_media_shape(m, ctypes.byref(rank))[: rank.value])
                data = np.ctypeslib.as_array(lib.of_media_data(m, ctypes.byref(n)), (n.value,)).copy()
                out["media"].append((lib.of_media_kind(m).decode(), data.reshape(shape)))
            return 0, out
        finally:
            lib.of_response_free(resp)

    def close(self) -> None:
        self.lib.of_pipeline_close(self.pipe)
        self.lib.of_build_close(self.build)


@pytest.fixture(scope="module")
def native_pipe(native_build: Path, default_build: Path, ort_library: str):
    n = NativePipeline(native_build, default_build, ort_library)
    yield n
    n.close()


@pytest.fixture(scope="module")
def pipe(default_build: Path):
    from omniforge.runtime.pipeline import Pipeline

    return Pipeline(default_build)


def _picture(seed: int, w: int = 48, h: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _same(got: dict, want, pipe) -> None:
    assert got["prompt_tokens"] == want.generation.prompt_tokens
    assert got["tokens"] == want.generation.token_ids
    assert got["text"] == want.text
    assert got["signals"] == len(want.signals)
    expected = [("image", x) for x in want.images] + [("video", x) for x in want.videos]
    expected += [("audio", x) for x in want.audios]
    assert [k for k, _ in got["media"]] == [k for k, _ in expected]
    for (_, g), (_, w) in zip(got["media"], expected, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-4)


def test_an_image_in_with_image_and_audio_forced_out(native_pipe: NativePipeline, pipe) -> None:
    from omniforge.runtime.pipeline import DiffusionConfig
    from omniforge.runtime.sampling import GenerationConfig

    pic, prompt = _picture(4), "Describe it and draw it"
    want = pipe.run(
        prompt,
        image=pic,
        generation=GenerationConfig(max_new_tokens=16),
        diffusion=DiffusionConfig(steps=2, seed=0),
        force=["image", "audio"],
        adapter=BASE,
    )
    streamed: list[str] = []
    # no latents: the decoders draw seed 0's noise (the default), as the Python runtime does
    status, got = native_pipe.run(prompt, image=pic, force="audio, image", on_text=streamed.append)
    assert status == 0, got
    _same(got, want, pipe)
    assert "".join(streamed) == want.text


def test_samples_and_frames_in_and_text_alone(native_pipe: NativePipeline, pipe, tmp_path: Path) -> None:
    """A recording's samples and a video's frames (those the Python runtime samples from the GIF)
    in, the video forced out; the video with a sound track; then text alone, whose reply asks for
    audio."""
    from omniforge.runtime import media as M
    from omniforge.runtime.pipeline import DiffusionConfig
    from omniforge.runtime.sampling import GenerationConfig

    t = np.arange(22050) / 22050
    wave = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    wav = tmp_path / "a.wav"
    M.write_wav(wav, wave, 22050)
    samples, sr = M.load_wav(wav, 60.0, None)
    frames = np.stack([_picture(s, 40, 32) for s in range(pipe.video_frames)])
    gif = tmp_path / "v.gif"
    M.write_gif(gif, frames.astype(np.float32) / 255.0)
    picked = [np.asarray(f.convert("RGB")) for f in M.iter_video_frames(gif, pipe.video_frames)]
    gen, diff = GenerationConfig(max_new_tokens=12), DiffusionConfig(steps=2, seed=0)
    prompt = "Listen, watch, and show it"
    want = pipe.run(
        prompt, audio=wav, video=gif, generation=gen, diffusion=diff, force=["video"], adapter=BASE
    )
    latents = {m: pipe.initial_latents(m, 0) for m in ("image", "video", "audio")}
    status, got = native_pipe.run(
        prompt, max_new_tokens=12, audio=(samples, sr), video=picked, force="video", latents=latents
    )
    assert status == 0, got
    _same(got, want, pipe)

    # the video with its sound track: the track's rows after the frames' (the build has no
    # video_audio config: concatenated)
    one = GenerationConfig(max_new_tokens=1)
    silent = pipe.run(
        prompt, video=gif, video_audio=False, generation=one, adapter=BASE
    ).generation.prompt_tokens
    want = pipe.run(
        prompt, video=gif, video_audio=wav, generation=gen, diffusion=diff, force=["video"], adapter=BASE
    )
    status, got = native_pipe.run(
        prompt, max_new_tokens=12, video=picked, video_audio=(samples, sr), force="video", latents=latents
    )
    assert status == 0, got
    _same(got, want, pipe)
    assert got["prompt_tokens"] == silent + 1  # the track's row after the frames'

    assert native_pipe.run("x", video_audio=(samples, sr)) == (
        4,
        "a video's sound track was given without a video",
    )

    want = pipe.run("Tell me a story", generation=gen, diffusion=diff, adapter=BASE)
    status, got = native_pipe.run("Tell me a story", max_new_tokens=12, latents=latents)  # it asks for audio
    assert status == 0, got
    _same(got, want, pipe)


def test_bad_requests_get_a_status_and_one_sentence(native_pipe: NativePipeline) -> None:
    lib = native_pipe.lib
    assert native_pipe.run("x", force="smell") == (
        1,
        "unknown modality 'smell' (a request can force image, video or audio)",
    )
    status, why = native_pipe.run("x", image=np.zeros((2, 300, 3), np.uint8))
    assert status == 4 and why == "image 'image' is 300x2, an aspect ratio beyond 100:1"
    status, why = native_pipe.run("x", audio=(np.zeros(0, np.float32), 16000))
    assert status == 4 and why == "the audio has no samples"
    status, why = native_pipe.run("x", force="image", steps=0)
    assert status == 1 and why == "steps must be >= 1, got 0"
    status, why = native_pipe.run("x", latents={"image": np.zeros(3, np.float32)}, force="image")
    assert status == 4 and why.startswith("image latents must have shape")
    status, why = native_pipe.run("x" * 5000, force="image")
    assert status == 5 and "leaving no room for a new token" in why
    req = _Request()
    lib.of_request_init(ctypes.byref(req))
    req.struct_size = 3
    resp = P()
    assert lib.of_pipeline_run(native_pipe.pipe, ctypes.byref(req), None, None, ctypes.byref(resp)) == 1
    assert (
        lib.of_pipeline_last_error(native_pipe.pipe)
        .decode()
        .startswith("the request was not set up with of_request_init")
    )
    assert lib.of_pipeline_run(native_pipe.pipe, None, None, None, ctypes.byref(resp)) == 1
    assert lib.of_pipeline_run(None, None, None, None, ctypes.byref(resp)) == 1
    assert lib.of_pipeline_last_error(None) == b"the pipeline handle is a null pointer"
