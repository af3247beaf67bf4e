"""Shared fixtures, made once per test session: the tiny default model, its fp32 export, and its
``omniforge build`` at fp32, int8 and auto with the quick quantization options. Tests only read
them; a test that changes a build copies it first. Under pytest-xdist (the README's ``-n 2``) the
workers share them: the first to need one makes it, the others wait for it."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# the Python decode loop unless a test asks for the native one (a checkout with build/native/
# would otherwise switch every LlmRuntime to it; tests/test_native_backend.py covers both)
os.environ.setdefault("OMNIFORGE_LLM_BACKEND", "python")


QUIET_ENV = ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE", "TRANSFORMERS_VERBOSITY")


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path``, across processes (pytest-xdist workers, parallel runs)."""
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def shared(
    tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], dict]
) -> tuple[Path, dict]:
    """``make(folder)`` run once per test session, also across pytest-xdist workers (they share the
    session's base folder; a lock lets one make it while the others wait). Returns the folder and
    what ``make`` returned (JSON)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the controller's folder, above each worker's own
    folder, done = base / name, base / f"{name}.json"
    with locked(base / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            done.write_text(json.dumps(make(folder)))
        return folder, json.loads(done.read_text())


@pytest.fixture(scope="session")
def readme_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """README's first command as a new user runs it: ``omniforge export --out DIR`` with a fresh
    ``$OMNIFORGE_HOME``, so the embedded default is written first. Returns the default model
    folder, the build and the console output (for the quiet-output test)."""
    from omniforge.pipeline.model_config import DEFAULT_VERSION

    def make(root: Path) -> dict:
        env = {**os.environ, "OMNIFORGE_HOME": str(root / "home")}
        for k in QUIET_ENV:
            env.pop(k, None)  # the CLI must quieten the libraries itself
        args = [sys.executable, "-m", "omniforge", "export", "--out", str(root / "default")]
        res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=1200)
        assert res.returncode == 0, res.stderr[-3000:]
        return {"args": args, "returncode": res.returncode, "stdout": res.stdout, "stderr": res.stderr}

    root, r = shared(tmp_path_factory, "readme", make)
    res = subprocess.CompletedProcess(r["args"], r["returncode"], r["stdout"], r["stderr"])
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

    precisions = ("fp32", "int8", "auto")

    def make(root: Path) -> dict:
        times = {}
        for precision in precisions:
            t0 = time.perf_counter()
            build(
                default_model,
                root / precision,
                BuildOptions(
                    precision=precision, cache=root / "cache", emit_trtexec=True, quantize=quick_quant
                ),
                log=lambda _m: None,
            )
            times[precision] = time.perf_counter() - t0
        return times

    root, times = shared(tmp_path_factory, "builds", make)
    return {p: root / p for p in precisions}, root / "cache", times


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``slow`` tests (real-size checks) run only when ``-m`` selects them."""
    expr = config.getoption("markexpr") or ""
    if "slow" in expr and "not slow" not in expr:
        return
    skip = pytest.mark.skip(reason="a real-size check: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
