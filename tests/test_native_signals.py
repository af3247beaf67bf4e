# ruff: noqa: F811  (the native fixtures are imported from tests/test_native.py by name)
"""Signal events through the C API (``of_generation_signal_count`` / ``of_generation_signal``,
``of_llm_signal_modality``): the native core reports the signal tokens a request generated (modality,
token, index among the generated tokens) as ``LlmRuntime.generate(...).signals`` does, for greedy
and seeded sampling requests on the default build."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from tests.test_native import (  # noqa: F401  (fixtures)
    BASE,
    native_build,
    native_cache,
    ort_headers,
)
from tests.test_native_backend import CONFIGS, PROMPTS  # the requests both backends are compared on


@pytest.fixture
def runtimes(native_build: Path, default_build: Path):
    from omniforge.runtime.llm import LlmRuntime
    from omniforge.runtime.native import NativeLlm

    py = LlmRuntime(default_build, backend="python")
    nat = NativeLlm(
        default_build, 1, 0, threads=1, library=native_build / "libomniforge.so", needs_tokenizer=True
    )
    yield py, nat
    nat.close()


def test_signal_events_equal_the_python_runtime(runtimes) -> None:
    from omniforge.runtime.sampling import GenerationConfig

    py, nat = runtimes
    total, modalities = 0, set()
    for prompt in PROMPTS:
        ids = py.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        for cfg in CONFIGS:
            config = GenerationConfig(**cfg)
            want = py.generate(prompt, config, adapter=BASE)
            streamed: list[tuple[str, int]] = []

            def on_token(token: int, _text: str, streamed: list = streamed) -> None:
                m = nat.lib.of_llm_signal_modality(nat._llm, token)
                if m is not None:
                    streamed.append((m.decode(), token))

            got = nat.generate(list(ids), config, on_token)
            assert got.token_ids == want.token_ids
            assert got.signals == want.signals, (prompt, cfg)
            assert [m for m, _ in streamed] == [e.modality for e in want.signals]
            assert [t for _, t in streamed] == [want.token_ids[e.index] for e in want.signals]
            total += len(want.signals)
            modalities |= {e.modality for e in want.signals}
    assert total > 0 and len(modalities) >= 2  # the default model does generate signal tokens


def test_signal_accessor_refusals_and_null_outputs(runtimes) -> None:
    from omniforge.runtime.sampling import GenerationConfig

    py, nat = runtimes
    lib = nat.lib
    config = GenerationConfig(max_new_tokens=48, temperature=0.9, top_k=40, top_p=0.9, seed=11)
    want = py.generate([1, 5, 9, 3, 7], config, adapter=BASE).signals
    assert want
    from omniforge.runtime.native import _GenerateOptions

    opts = _GenerateOptions()
    lib.of_generate_options_init(ctypes.byref(opts))
    opts.max_new_tokens, opts.temperature, opts.top_k, opts.top_p, opts.seed = 48, 0.9, 40, 0.9, 11
    prompt = (ctypes.c_int32 * 5)(1, 5, 9, 3, 7)
    out = ctypes.c_void_p()
    assert lib.of_llm_generate(nat._llm, prompt, 5, ctypes.byref(opts), ctypes.byref(out)) == 0
    try:
        assert lib.of_generation_signal_count(out) == len(want)
        tid, index = ctypes.c_int32(), ctypes.c_size_t()
        for i, e in enumerate(want):
            assert lib.of_generation_signal(out, i, None, None, ctypes.byref(tid), ctypes.byref(index)) == 0
            assert index.value == e.index and py.tokenizer.token(tid.value) == e.token
        assert (
            lib.of_generation_signal(out, len(want), None, None, None, None) == 1
        )  # OF_ERR_INVALID_ARGUMENT
    finally:
        lib.of_generation_free(out)
    assert lib.of_generation_signal_count(None) == 0
    assert lib.of_generation_signal(None, 0, None, None, None, None) == 1
    assert lib.of_llm_signal_modality(None, 0) is None
