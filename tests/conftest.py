"""Shared fixtures, made once per test session: the tiny default model, its fp32 export, and its
``omniforge build`` at fp32, int8 and auto with the quick quantization options. Tests only read
them; a test that changes a build copies it first."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# the Python decode loop unless a test asks for the native one (a checkout with build/native/
# would otherwise switch every LlmRuntime to it; tests/test_native_backend.py covers both)
os.environ.setdefault("OMNIFORGE_LLM_BACKEND", "python")


QUIET_ENV = ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE", "TRANSFORMERS_VERBOSITY")


@pytest.fixture(scope="session")
def readme_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """README's first command as a new user runs it: ``omniforge export --out DIR`` with a fresh
    ``$OMNIFORGE_HOME``, so the embedded default is written first. Returns the default model
    folder, the build and the console output (for the quiet-output test)."""
    from omniforge.pipeline.model_config import DEFAULT_VERSION

    root = tmp_path_factory.mktemp("readme")
    env = {**os.environ, "OMNIFORGE_HOME": str(root / "home")}
    for k in QUIET_ENV:
        env.pop(k, None)  # the CLI must quieten the libraries itself
    res = subprocess.run(
        [sys.executable, "-m", "omniforge", "export", "--out", str(root / "default")],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return root / "home" / f"tiny-nextgpt-v{DEFAULT_VERSION}", root / "default", res


@pytest.fixture(scope="session")
def default_model(readme_export) -> Path:
    return readme_export[0]


@pytest.fixture(scope="session")
def default_build(readme_export) -> Path:
    return readme_export[1]


@pytest.fixture(scope="session")
def quick_quant():
    """Quantization options for tests: two calibration prompts, two denoising steps, no
    per-layer fallback search (tests of the fallback itself set their own budget)."""
    from omniforge.calibration.capture import CalibrationInputs
    from omniforge.calibration.quantize import QuantizeOptions

    inputs = CalibrationInputs.default(count=2)
    inputs.steps, inputs.max_per_stage = 2, 8
    return QuantizeOptions(max_fp32_layers=0, calibration=inputs)


@pytest.fixture(scope="session")
def default_builds(default_model, tmp_path_factory, quick_quant):
    """``omniforge build`` of the default model at fp32 (export, then the graph passes), int8 and
    auto, with the quick quantization options and trtexec lines, on one build cache. Returns
    ({precision: build folder}, the cache, {precision: seconds}); the build tests and the
    check-trt tests share them."""
    from omniforge.build import BuildOptions, build

    root = tmp_path_factory.mktemp("builds")
    cache = root / "cache"
    out = {}
    times = {}
    for precision in ("fp32", "int8", "auto"):
        t0 = time.perf_counter()
        build(
            default_model,
            root / precision,
            BuildOptions(precision=precision, cache=cache, emit_trtexec=True, quantize=quick_quant),
            log=lambda _m: None,
        )
        times[precision] = time.perf_counter() - t0
        out[precision] = root / precision
    return out, cache, times


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``slow`` tests (real-size checks) run only when ``-m`` selects them."""
    expr = config.getoption("markexpr") or ""
    if "slow" in expr and "not slow" not in expr:
        return
    skip = pytest.mark.skip(reason="a real-size check: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
