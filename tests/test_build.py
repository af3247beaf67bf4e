"""``omniforge build`` and ``omniforge compare``: cached, atomic, per precision; comparison both ways."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from omniforge.build import BuildOptions, build, cache_root
from omniforge.cli import main
from omniforge.engines.compare import compare_builds
from omniforge.errors import ConfigError
from omniforge.pipeline.contracts import Role
from omniforge.pipeline.manifest import load_manifest
from omniforge.runtime.pipeline import DiffusionConfig, Pipeline
from omniforge.runtime.sampling import GenerationConfig


def test_each_precision_builds_and_runs(default_builds):
    out, _, _ = default_builds
    for precision, path in out.items():
        m = load_manifest(path)
        assert m.source["backend"] == "onnxruntime"
        r = Pipeline(path).run(
            "Describe",
            generation=GenerationConfig(max_new_tokens=4),
            diffusion=DiffusionConfig(steps=2),
            force=["image"],
        )
        assert r.images[0].shape == (32, 32, 3), precision
    assert load_manifest(out["int8"]).stages["llm"].precision == "int8"
    plan = load_manifest(out["auto"]).source["precision_plan"]
    assert set(plan) == set(load_manifest(out["fp32"]).stages) and set(plan.values()) <= {
        "fp32",
        "fp16",
        "int8",
        "int4",
    }
    auto = load_manifest(out["auto"])
    for name, p in plan.items():  # the plan is what the manifest holds, and each choice is reported
        assert auto.stages[name].precision == p
    report = {r["stage"]: r for r in json.loads((out["auto"] / "quantize.json").read_text())}
    assert {r["precision"] for r in report.values()} == set(plan.values())
    summary = json.loads((out["auto"] / "build.json").read_text())["summary"]
    assert {r["stage"] for r in summary} == set(plan)
    script = (out["fp32"] / "trtexec" / "build_engines.sh").read_text()
    assert "trtexec --onnx=stages/image_unet.onnx --saveEngine=engines/image_unet.plan" in script


def test_a_second_identical_build_reuses_every_step(default_builds, default_model, tmp_path):
    out, cache, _ = default_builds
    logs: list[str] = []
    build(default_model, tmp_path / "again", BuildOptions(precision="fp32", cache=cache), log=logs.append)
    assert logs[:2] == ["export: up to date (cached)", "optimize: up to date (cached)"]
    assert not any(line.startswith("[") for line in logs)  # no stage exported or optimized again
    again, first = load_manifest(tmp_path / "again"), load_manifest(out["fp32"])
    assert {k: a.sha256 for k, a in again.artifacts.items() if k != "build.json"} == {
        k: a.sha256 for k, a in first.artifacts.items() if k not in ("build.json", "trtexec/build_engines.sh")
    }


def test_tensorrt_backend_says_what_is_missing(default_model, tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here")
    assert main(["build", str(default_model), "--out", str(tmp_path / "trt"), "--backend", "tensorrt"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "use --backend onnxruntime" in err[0]
    assert not (tmp_path / "trt").exists()


def test_a_killed_build_leaves_the_previous_build_usable(default_builds, default_model, tmp_path):
    out, _, _ = default_builds
    import shutil

    target = tmp_path / "target"
    shutil.copytree(out["fp32"], target)
    env = {**os.environ, "OMNIFORGE_HOME": str(tmp_path / "home")}  # an empty cache: the build takes a while
    proc = subprocess.Popen(
        # -v: the per-stage lines the kill waits for are printed only in verbose mode
        [sys.executable, "-m", "omniforge", "-v", "build", str(default_model), "--out", str(target)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it in the middle of the export
        line = proc.stderr.readline()
        if not line or "[3/15]" in line:
            break
    assert proc.poll() is None, "the build ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    m = load_manifest(target)  # still the previous, complete build
    assert m.source["backend"] == "onnxruntime"
    assert Pipeline(target).llm.generate("hi", GenerationConfig(max_new_tokens=2)).new_tokens == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".target")]


def test_compare_passes_and_fails_by_tolerance(default_builds, capsys):
    out, _, _ = default_builds
    loose = compare_builds(out["fp32"], out["int8"], atol=1.0, rtol=1.0)
    assert all(r.passed for r in loose) and {r.stage for r in loose} >= {"llm", "image_encoder"}
    assert main(["compare", str(out["fp32"]), str(out["int8"]), "--atol", "1", "--rtol", "1"]) == 0
    assert "| image_encoder | fp32 | int8 |" in capsys.readouterr().out
    assert main(["compare", str(out["fp32"]), str(out["int8"]), "--atol", "1e-7", "--rtol", "0"]) == 1
    captured = capsys.readouterr()
    assert "outside atol 1e-07" in captured.err and "NO" in captured.out
    same = compare_builds(out["fp32"], out["fp32"], atol=1e-6, rtol=0, stages=["image_unet"])
    assert same[0].passed and same[0].max_abs == 0.0


def test_build_options_are_checked():
    with pytest.raises(ConfigError, match="precision 'int2'"):
        BuildOptions(precision="int2")
    assert cache_root(BuildOptions()).name == "build-cache"


def test_changing_one_stage_precision_rebuilds_only_that_stage(
    default_builds, default_model, tmp_path, quick_quant
):
    _, cache, _ = default_builds
    logs: list[str] = []
    opts = BuildOptions(
        precision="int8",
        cache=cache,
        quantize=quick_quant,
        stage_precision={"image_unet": "fp32", "image_vae_decoder": "fp16"},
    )
    build(default_model, tmp_path / "mixed", opts, log=logs.append)
    m = load_manifest(tmp_path / "mixed")
    assert m.stages["image_unet"].precision == "fp32" and m.stages["video_unet"].precision == "int8"
    assert m.stages["image_vae_decoder"].precision == "fp16"
    r = Pipeline(tmp_path / "mixed").run(
        "Describe",
        generation=GenerationConfig(max_new_tokens=2),
        diffusion=DiffusionConfig(steps=2),
        force=["image"],
    )
    assert r.images[0].shape == (32, 32, 3) and r.images[0].dtype.kind == "f"
    assert m.source["precision_plan"]["image_unet"] == "fp32"
    reused = [line for line in logs if "up to date (cached)" in line]
    assert any(
        line.startswith("video_unet: int8") for line in reused
    )  # every other stage came from the cache
    assert not any(line.startswith("image_unet") for line in reused)
    for stage_precision, message in (
        ({"vocoder": "int4"}, "int4 is for the LLM"),
        ({"llm": "fp16"}, "no fp16 form"),
        ({"nope": "int8"}, "no stage 'nope'"),
    ):
        bad = BuildOptions(
            precision="int8", cache=cache, quantize=quick_quant, stage_precision=stage_precision
        )
        with pytest.raises(ConfigError, match=message):
            build(default_model, tmp_path / "bad", bad, log=lambda _m: None)
    with pytest.raises(ConfigError, match="auto plan chooses"):
        BuildOptions(precision="auto", stage_precision={"llm": "int4"})
    assert not (tmp_path / "bad").exists()


def test_tensorrt_builds_quantized_stages_from_their_qdq_graphs(default_builds):
    from omniforge.build import tensorrt_source

    out, _, _ = default_builds
    m = load_manifest(out["int8"])
    unet = m.stages["image_unet"]
    assert tensorrt_source(unet) == (unet.variant(Role.QDQ).file, "int8")
    fp32_unet = load_manifest(out["fp32"]).stages["image_unet"]
    assert tensorrt_source(fp32_unet, "10.3") == ("stages/image_unet.onnx", "fp16")  # weakly typed: the flag
    assert tensorrt_source(fp32_unet, "11") == (
        "stages/image_unet.onnx",
        "fp32",
    )  # strongly typed: as written
    llm = m.stages["llm"]
    assert tensorrt_source(llm) == ("stages/llm.int8.qdq.onnx", "int8")
    script = (out["int8"] / "trtexec" / "build_engines.sh").read_text()
    line = next(x for x in script.splitlines() if "image_unet.plan" in x)
    assert f"--onnx={unet.variant(Role.QDQ).file}" in line and "--stronglyTyped" in line
    assert "--int8" not in line and "--fp16" not in line  # TensorRT 11's trtexec has neither


def test_emitted_trtexec_lines_pin_the_same_norms_as_the_engine_build(default_builds):
    from omniforge.build import tensorrt_source, trtexec_script
    from omniforge.engines.profiles import fp32_layers

    out, _, _ = default_builds
    for precision in ("fp32", "int8"):
        m = load_manifest(out[precision])
        lines = trtexec_script(out[precision], m, "10.3").splitlines()  # JetPack 6: weakly typed
        for name in ("llm", "image_encoder", "image_unet"):
            graph, _ = tensorrt_source(m.stages[name], "10.3")
            pinned = fp32_layers(out[precision] / graph)  # what _tensorrt_engines hands to build_engine
            assert pinned, (precision, name)
            line = next(x for x in lines if f"engines/{name}.plan" in x)
            spec = ",".join(f"{n}:fp32" for n in pinned)
            assert f"--layerPrecisions={spec}" in line and f"--layerOutputTypes={spec}" in line
            assert "--precisionConstraints=obey" in line
