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


AUTO_NOTE = (
    "auto: the LLM is chosen from int8 weight-only and fp32 (an FP16 engine in TensorRT {0}), not int4"
)


def test_auto_leaves_int4_out_for_a_tensorrt_before_10_6():
    from omniforge.build import auto_candidates

    assert auto_candidates([]) == (("fp16", "int8", "int4"), "")
    assert auto_candidates(["10.12", "11"]) == (("fp16", "int8", "int4"), "")
    precisions, note = auto_candidates(["11", "10.3.0"])
    assert precisions == ("fp16", "int8") and note.startswith(AUTO_NOTE.format("10.3.0"))
    assert "\n" not in note and note.endswith("(ONNX opset 21; TensorRT 10.6 and later)")


def test_auto_for_an_installed_tensorrt_before_10_6_leaves_int4_out(tmp_path, monkeypatch):
    """``--backend tensorrt --precision auto`` takes the installed version into the plan's choice."""
    import omniforge.build as build_module
    import omniforge.engines.tensorrt as engines

    monkeypatch.setattr(engines, "require_tensorrt", lambda: None)
    monkeypatch.setattr(engines, "trt", SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setenv("OMNIFORGE_HOME", str(tmp_path / "home"))
    seen = []

    def steps(model, root, opts, log, auto):
        seen.append(auto)
        raise ConfigError("stopped before any export")

    monkeypatch.setattr(build_module, "_steps", steps)
    assert main(["build", "--backend", "tensorrt", "--precision", "auto", "--out", str(tmp_path / "b")]) == 1
    assert seen[0][0] == ("fp16", "int8") and seen[0][1].startswith(AUTO_NOTE.format("10.3.0"))


def test_auto_for_tensorrt_10_3_builds_the_llm_at_int8_or_fp32(
    default_builds, default_model, tmp_path, quick_quant
):
    """``--precision auto --emit-trtexec --trt-version 10.3`` (the fp16 and int8 candidates come from
    the shared build cache): no INT4 LLM, whatever the latencies say; the one line in the log and in
    the LLM's report; trtexec lines for 10.3 written, not refused."""
    import json

    from omniforge.build import build
    from omniforge.pipeline.manifest import load_manifest

    _, cache, _ = default_builds
    logs: list[str] = []
    out = tmp_path / "auto-10.3"
    opts = BuildOptions(
        precision="auto", cache=cache, emit_trtexec=True, trt_version="10.3", quantize=quick_quant
    )
    build(default_model, out, opts, log=logs.append)
    plan = load_manifest(out).source["precision_plan"]
    assert plan["llm"] in ("int8", "fp32")
    note = AUTO_NOTE.format("10.3")
    assert sum(line.startswith(note) for line in logs) == 1
    report = {r["stage"]: r for r in json.loads((out / "quantize.json").read_text())}
    assert note in report["llm"]["note"]
    script = (out / "trtexec" / "build_engines.sh").read_text()
    llm_line = next(line for line in script.splitlines() if "--saveEngine=engines/llm.plan" in line)
    assert ("--int8" in llm_line) == (plan["llm"] == "int8") and "--fp16" in llm_line
