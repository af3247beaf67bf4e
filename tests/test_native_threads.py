# ruff: noqa: F811  (the native fixtures are imported from tests/test_native.py by name)
"""The native core shared by threads: one loaded build, one ``of_llm``, 8 threads running several
requests each (greedy and seeded sampling, each request in its own KV slot), every result equal to
the same request run alone; with a pool of one slot per thread and with fewer slots than threads
(requests wait for a slot). Run plain, under ThreadSanitizer, and under AddressSanitizer +
UndefinedBehaviorSanitizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.test_native import (  # noqa: F401  (fixtures)
    SANITIZER_ENV,
    _env,
    _run,
    native_build,
    native_cache,
    native_san_build,
    native_tsan_build,
    ort_headers,
    ort_library,
)


def _threads(native: Path, default_build: Path, env: dict) -> str:
    r = _run([str(native / "omniforge_threads"), str(default_build), "8", "3"], env=env, timeout=600)
    report = r.stdout + r.stderr
    assert r.returncode == 0, report[-6000:]
    assert "all thread checks passed" in r.stdout
    assert "0 mismatches, 0 errors" in r.stdout
    return r.stderr


def test_threads_share_one_llm(native_build: Path, default_build: Path, ort_library: str) -> None:
    _threads(native_build, default_build, _env(default_build, ort_library))


@pytest.mark.skipif(
    os.environ.get("OMNIFORGE_TSAN") != "1",
    reason="ThreadSanitizer build: set OMNIFORGE_TSAN=1 (about a minute more; the address-sanitizer run covers threads by default)",
)
def test_threads_under_thread_sanitizer(
    native_tsan_build: Path, default_build: Path, ort_library: str
) -> None:
    err = _threads(
        native_tsan_build, default_build, _env(default_build, ort_library, TSAN_OPTIONS="halt_on_error=1")
    )
    assert "ThreadSanitizer" not in err, err[-6000:]


def test_threads_under_address_sanitizer(
    native_san_build: Path, default_build: Path, ort_library: str
) -> None:
    err = _threads(native_san_build, default_build, _env(default_build, ort_library, **SANITIZER_ENV))
    assert "Sanitizer" not in err and "runtime error" not in err, err[-6000:]
