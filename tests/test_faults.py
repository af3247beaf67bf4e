"""Faults in a running service: failing callbacks, pools held by the prefix cache, oversized pools."""

from __future__ import annotations

import gc
import threading

import pytest

from omniforge.errors import CachePoolExhaustedError, ConfigError
from omniforge.runtime.llm import LlmRuntime
from omniforge.runtime.sampling import GenerationConfig


@pytest.fixture(scope="module")
def runtime(default_build):
    return LlmRuntime(default_build, num_slots=2, prefix_cache_entries=0)


def test_a_failing_callback_releases_its_slot_at_once(runtime):
    kept = []

    def boom(_text: str) -> None:
        raise RuntimeError("callback failed")

    gc.disable()  # the failed requests' frames stay alive, as in a service that logs exceptions
    try:
        for _ in range(3):  # more failures than the pool has slots
            with pytest.raises(RuntimeError) as info:
                runtime.generate("A dog runs", GenerationConfig(max_new_tokens=8), on_text=boom)
            kept.append(info.value)
            assert runtime.pool.slots_in_use == 0
    finally:
        gc.enable()
    assert runtime.generate("A dog runs", GenerationConfig(max_new_tokens=4)).new_tokens == 4


def test_a_waiting_request_takes_slots_the_prefix_cache_adopts(default_build):
    rt = LlmRuntime(default_build, num_slots=2, prefix_cache_entries=1, slot_wait_s=5.0)
    rows, _ = rt.prepare("A dog runs across the green field while the sun sets behind the hills " * 2)
    running = rt.pool.allocate(1)  # a request in flight holds one slot
    done: dict = {}

    def batch() -> None:  # needs both slots
        try:
            done["results"] = rt.generate_batch(["one", "two"], GenerationConfig(max_new_tokens=2))
        except Exception as exc:  # pragma: no cover - reported below
            done["error"] = exc

    t = threading.Thread(target=batch)
    t.start()
    t.join(0.3)
    assert t.is_alive()  # waiting for the slot in use
    assert rt.prefix_cache.add(running.start, rows)  # the running request ends; the cache adopts its slot
    t.join(10)
    assert "error" not in done and len(done["results"]) == 2


def test_a_request_that_can_never_fit_is_refused_at_once(default_build):
    rt = LlmRuntime(default_build, num_slots=1, slot_wait_s=30.0)
    with pytest.raises(CachePoolExhaustedError, match="never fit"):
        rt.generate_batch(["one", "two"])


def test_a_pool_larger_than_the_machine_is_refused_before_allocating(default_build):
    with pytest.raises(ConfigError, match="GiB"):
        LlmRuntime(default_build, num_slots=10**9)
