"""Continuous batching over the default build's real LLM engine: requests joining and leaving the
running batch give exactly what each gives alone; queue bound, cancellation, failing callbacks."""

from __future__ import annotations

import threading
import time

import pytest

from omniforge.errors import QueueFullError
from omniforge.runtime.batching import ContinuousBatcher
from omniforge.runtime.llm import LlmRuntime
from omniforge.runtime.sampling import GenerationConfig

PROMPTS = [
    "the cat sat on the mat",
    "a picture of a dog",
    "hello",
    "once upon a time in a land far away there lived a small bird that sang every morning",
    "music",
    "what is in the image",
]


@pytest.fixture(scope="module")
def runtime(default_build):
    return LlmRuntime(default_build, num_slots=3, prefix_cache_entries=0)


@pytest.fixture(scope="module")
def alone(runtime):
    """Each prompt generated alone, with its own settings."""
    return {p: runtime.generate(p, _cfg(i)) for i, p in enumerate(PROMPTS)}


def _cfg(i: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=6 + 3 * i, repetition_penalty=1.0 + 0.1 * (i % 2))


def test_joining_and_leaving_requests_equal_their_alone_results(runtime, alone):
    with ContinuousBatcher(runtime, prefill_chunk=4) as batcher:  # long prompts prefill in chunks
        handles = []
        for i, p in enumerate(PROMPTS):  # staggered: later ones join a running batch
            handles.append(batcher.submit(p, _cfg(i)))
            time.sleep(0.005 * i)
        results = [h.result(timeout=60) for h in handles]
    for p, r in zip(PROMPTS, results, strict=True):
        assert r.token_ids == alone[p].token_ids, p
        assert r.text == alone[p].text and r.finish_reason == alone[p].finish_reason
    assert runtime.pool.slots_in_use == 0


def test_threads_stream_their_own_text(runtime, alone):
    out: dict[str, str] = {}
    with ContinuousBatcher(runtime) as batcher:

        def client(i: int, p: str) -> None:
            h = batcher.submit(p, _cfg(i))
            out[p] = "".join(h.stream())

        threads = [threading.Thread(target=client, args=(i, p)) for i, p in enumerate(PROMPTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert out == {p: alone[p].text for p in PROMPTS}


def test_full_queue_refuses_and_cancel_frees_the_slot(default_build):
    rt = LlmRuntime(default_build, num_slots=1, prefix_cache_entries=0)
    with ContinuousBatcher(rt, max_queue=1) as batcher:
        long = batcher.submit(PROMPTS[0], GenerationConfig(max_new_tokens=200))
        deadline = time.monotonic() + 10
        while batcher.running == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        waiting = batcher.submit(PROMPTS[1], GenerationConfig(max_new_tokens=3))
        with pytest.raises(QueueFullError, match="retry later"):
            batcher.submit(PROMPTS[2])
        long.cancel()
        assert long.result(timeout=30).finish_reason == "cancelled"
        assert waiting.result(timeout=30).new_tokens == 3
    assert rt.pool.slots_in_use == 0


def test_a_failing_callback_ends_only_its_request(runtime, alone):
    def boom(_piece: str) -> None:
        raise RuntimeError("client went away")

    with ContinuousBatcher(runtime) as batcher:
        bad = batcher.submit(PROMPTS[0], _cfg(0), on_text=boom)
        good = batcher.submit(PROMPTS[1], _cfg(1))
        with pytest.raises(RuntimeError, match="client went away"):
            bad.result(timeout=30)
        assert good.result(timeout=30).token_ids == alone[PROMPTS[1]].token_ids
    assert runtime.pool.slots_in_use == 0
