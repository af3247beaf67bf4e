"""Shared fixtures: the tiny default model and its fp32 build, made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def default_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from omniforge.model.tiny import create_default

    return create_default(tmp_path_factory.mktemp("model") / "tiny-nextgpt")


@pytest.fixture(scope="session")
def default_build(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from omniforge.export.exporter import export_pipeline

    out = tmp_path_factory.mktemp("builds") / "default"
    export_pipeline(default_model, out, log=lambda _msg: None)
    return out


@pytest.fixture(scope="session")
def quick_quant():
    """Quantization options for tests: two calibration prompts, two denoising steps, no
    per-layer fallback search (tests of the fallback itself set their own budget)."""
    from omniforge.calibration.capture import CalibrationInputs
    from omniforge.calibration.quantize import QuantizeOptions

    inputs = CalibrationInputs.default(count=2)
    inputs.steps, inputs.max_per_stage = 2, 8
    return QuantizeOptions(max_fp32_layers=0, calibration=inputs)
