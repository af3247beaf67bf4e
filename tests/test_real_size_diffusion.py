"""The real-size diffusion benchmark's tiny mode, end to end: a model folder with FP16 decoders,
one stage exported, optimized and quantized (each in its own process), timed in ONNX Runtime and
PyTorch, results written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "real_size_diffusion.py"


@pytest.mark.slow  # ~20 s: four processes that import torch
def test_tiny_mode_exports_quantizes_and_times_a_decoder_stage(default_model: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPT), "--size", "tiny", "--base", str(default_model)]
    cmd += ["--stages", "vocoder", "--variants", "ort_fp32,ort_int8_static,torch_fp32", "--runs", "1"]
    cmd += ["--work", str(tmp_path / "work"), "--results", str(tmp_path / "results")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "results" / "real_size_diffusion-tiny.json").read_text())
    stage = data["stages"]["vocoder"]
    assert stage["export"]["returncode"] == 0 and stage["export"]["peak_rss_bytes"] > 0
    assert all(p["passed"] for p in stage["export"]["parity"])
    assert stage["optimize"]["report"][0]["passed"] and stage["graphs"]["ort_fp32"].endswith(".ort.onnx")
    assert stage["quantize"]["ort_int8_static"]["report"]["metrics"]["cosine_min"] > 0.9
    for variant in ("ort_fp32", "ort_int8_static", "torch_fp32"):
        t = stage["latency"][variant]
        assert t["median_ms"] > 0 and t["peak_rss_bytes"] > 0 and t["profile_ms"]
    assert data["cpu"] and "ZeroScope" in data["zeroscope"]["note"]
    md = (tmp_path / "results" / "real_size_diffusion-tiny.md").read_text()
    assert "| vocoder | PyTorch eager FP32 |" in md
