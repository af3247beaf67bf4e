"""What a served model does with a request, without a server: parsing and the text service."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from omniforge.errors import ConfigError, InputError, QueueFullError
from omniforge.runtime.sampling import GenerationConfig
from omniforge.serving import requests as R


def s(*values: bytes) -> np.ndarray:
    return np.array(list(values), dtype=object)


def test_generation_options_are_read_and_checked():
    cfg = R.generation_config(
        {
            "max_new_tokens": np.array([5], np.int32),
            "temperature": np.array([0.5], np.float32),
            "seed": np.array([9], np.uint64),
            "stop": s(b"\n", b"###"),
        }
    )
    assert cfg == GenerationConfig(max_new_tokens=5, temperature=0.5, seed=9, stop_strings=("\n", "###"))
    assert R.generation_config({}) == GenerationConfig()
    with pytest.raises(ConfigError, match="temperature must be >= 0"):
        R.generation_config({"temperature": np.array([-1.0], np.float32)})
    with pytest.raises(InputError, match="must be an integer"):
        R.generation_config({"max_new_tokens": np.array([2.5], np.float32)})
    with pytest.raises(InputError, match="exactly one value"):
        R.generation_config({"seed": np.array([1, 2], np.uint64)})


def test_text_inputs_must_be_utf8_and_bounded():
    assert R.prompt({"prompt": s("héllo".encode())}) == "héllo"
    with pytest.raises(InputError, match="not valid UTF-8"):
        R.prompt({"prompt": s(b"\xff")})
    with pytest.raises(InputError, match="has no 'prompt'"):
        R.prompt({})
    with pytest.raises(InputError, match="at most"):
        R.prompt({"prompt": s(b"a" * (R.MAX_TEXT_BYTES + 1))})
    with pytest.raises(InputError, match="must be a string"):
        R.prompt({"prompt": np.array([3], np.int32)})


def test_pipeline_request_media_and_diffusion():
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 20
    wav = b"RIFF\x00\x00\x00\x00WAVEfmt "
    req = R.PipelineRequest.parse(
        {
            "prompt": s(b"hi"),
            "image": s(png),
            "audio": s(wav),
            "force": s(b"image", b"audio"),
            "steps": np.array([3], np.int32),
            "guidance_scale": np.array([2.0], np.float32),
            "seed": np.array([4], np.uint64),
        }
    )
    assert (req.diffusion.steps, req.diffusion.guidance_scale, req.diffusion.seed) == (3, 2.0, 4)
    assert req.generation.seed == 4 and req.force == ["image", "audio"]
    with req.files() as paths:
        assert paths["image"].suffix == ".png" and paths["image"].read_bytes() == png
        assert paths["audio"].suffix == ".wav"
        folder = paths["image"].parent
    assert not folder.exists()
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        R.PipelineRequest.parse({"prompt": s(b"x"), "steps": np.array([0], np.int32)})
    with (
        pytest.raises(InputError, match="not a file format it takes"),
        R.PipelineRequest.parse({"prompt": s(b"x"), "video": s(wav)}).files(),
    ):
        pass


def test_outputs_have_the_declared_ranks_when_empty():
    from omniforge.runtime.llm import GenerationResult
    from omniforge.runtime.pipeline import PipelineResult

    gen = GenerationResult("t", [1, 2], "length", 3, 0, 0.0, 0.0)
    out = R.pipeline_outputs(PipelineResult(text="t", generation=gen))
    assert out["images"].shape == (0, 0, 0, 3) and out["videos"].shape == (0, 0, 0, 0, 3)
    assert out["audios"].shape == (0, 0) and out["token_ids"].tolist() == [1, 2]
    assert out["text"].tolist() == [b"t"] and out["signals"].shape == (0,)


@pytest.fixture(scope="module")
def runtime(default_build):
    from omniforge.runtime.llm import LlmRuntime

    return LlmRuntime(default_build, num_slots=2)


def run(service, prompt, config, cancelled=lambda: False):
    pieces, done = [], threading.Event()
    outcome = {}

    def finish(result, error):
        outcome.update(result=result, error=error)
        done.set()

    service.submit(prompt, config, pieces.append, finish, cancelled)
    assert done.wait(60)
    return "".join(pieces), outcome["result"], outcome["error"]


def test_text_service_streams_what_generate_returns(runtime):
    from omniforge.serving.text_service import TextService

    service = TextService(runtime, max_queued=4)
    try:
        cfg = GenerationConfig(max_new_tokens=9)
        text, result, error = run(service, "A dog runs", cfg)
        assert error is None and text == result.text
        assert result.token_ids == runtime.generate("A dog runs", cfg).token_ids
        _, result, error = run(service, "\ud800", cfg)  # a lone surrogate: refused, as the runtime refuses it
        assert result is None and isinstance(error, InputError)
    finally:
        service.close()


def test_text_service_cancels_and_refuses_beyond_its_queue(runtime):
    from omniforge.serving.text_service import Cancelled, TextService

    service = TextService(runtime, max_queued=1)
    try:
        calls = []

        def cancel_after_two():
            calls.append(1)
            return len(calls) > 2

        _, result, error = run(service, "A dog runs", GenerationConfig(max_new_tokens=50), cancel_after_two)
        assert result is None and isinstance(error, Cancelled)
        assert runtime.pool.slots_in_use == len(runtime.prefix_cache)  # the request's slot came back
        gate = threading.Event()
        blocked = threading.Event()

        def hold(_delta):
            blocked.set()
            gate.wait(30)

        service.submit("A", GenerationConfig(max_new_tokens=3), hold, lambda r, e: None)
        assert blocked.wait(30)  # the scheduler is busy in the callback
        service.submit("B", GenerationConfig(max_new_tokens=3), lambda d: None, lambda r, e: None)  # waits
        with pytest.raises(QueueFullError, match="retry later"):
            service.submit("C", GenerationConfig(max_new_tokens=3), lambda d: None, lambda r, e: None)
        gate.set()
    finally:
        service.close()
