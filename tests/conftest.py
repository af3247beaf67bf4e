"""Shared fixtures: the tiny default model and its fp32 build, made once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


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
