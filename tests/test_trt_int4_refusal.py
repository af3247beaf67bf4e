"""``omniforge build`` refuses an INT4 LLM for a TensorRT before 10.6 before any export: one sentence,
exit 1, no build folder, no build cache."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from omniforge.build import BuildOptions
from omniforge.cli import main
from omniforge.errors import ConfigError

REFUSAL = "TensorRT {} cannot build the INT4 LLM: its weight-only form needs ONNX opset 21"


def one_error(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("omniforge: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_int4_for_tensorrt_10_3_is_refused_before_any_export(tmp_path):
    home, out = tmp_path / "home", tmp_path / "build"
    res = subprocess.run(
        [sys.executable, "-m", "omniforge", "build", "--precision", "int4", "--emit-trtexec"]
        + ["--trt-version", "10.3", "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMNIFORGE_HOME": str(home)},
        timeout=300,
    )
    assert res.returncode == 1, res.stderr
    error = one_error(res.stderr)
    assert REFUSAL.format("10.3") in error and error.endswith("(--stage-precision llm=int8)")
    assert not out.exists() and not home.exists()  # no default model, no build cache: nothing exported
    assert "export" not in res.stdout


def test_an_int4_llm_override_is_refused_too():
    with pytest.raises(ConfigError, match=REFUSAL.format("10.3")):
        BuildOptions(precision="int8", stage_precision={"llm": "int4"}, emit_trtexec=True, trt_version="10.3")


@pytest.mark.parametrize(
    "options",
    [
        {"precision": "int4", "stage_precision": {"llm": "int8"}, "trt_version": "10.3"},  # the advice
        {"precision": "int4", "trt_version": "10.12"},
        {"precision": "int8", "trt_version": "10.3"},
    ],
)
def test_what_the_tensorrt_can_build_is_not_refused(options):
    BuildOptions(emit_trtexec=True, **options)


def test_int4_for_an_installed_tensorrt_before_10_6_is_refused_before_any_export(
    tmp_path, monkeypatch, capsys
):
    import omniforge.engines.tensorrt as engines

    monkeypatch.setattr(engines, "require_tensorrt", lambda: None)
    monkeypatch.setattr(engines, "trt", SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setenv("OMNIFORGE_HOME", str(tmp_path / "home"))
    out = tmp_path / "build"
    assert main(["build", "--backend", "tensorrt", "--precision", "int4", "--out", str(out)]) == 1
    assert REFUSAL.format("10.3.0") in one_error(capsys.readouterr().err)
    assert not out.exists() and not (tmp_path / "home" / "build-cache").exists()  # nothing exported
