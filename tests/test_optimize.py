"""``omniforge optimize`` on the default build: every stage, parity, report, runtime unchanged."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from omniforge.cli import main
from omniforge.passes.build import optimize_build
from omniforge.passes.fold_norm_linear import fold_norm_into_linear
from omniforge.pipeline.contracts import Role
from omniforge.pipeline.manifest import load_manifest
from omniforge.runtime.llm import LlmRuntime
from omniforge.runtime.pipeline import DiffusionConfig, Pipeline
from omniforge.runtime.sampling import GenerationConfig


@pytest.fixture(scope="module")
def optimized(default_build, tmp_path_factory):
    out = tmp_path_factory.mktemp("opt") / "build"
    manifest, results = optimize_build(default_build, out, log=lambda _m: None)
    return out, manifest, results


def test_every_stage_is_optimized_within_tolerance(optimized, default_build):
    out, manifest, results = optimized
    assert [r.stage for r in results] == list(load_manifest(default_build).stages)
    assert all(r.passed and r.max_abs_err <= 1e-5 for r in results)
    big = {r.stage: r for r in results if r.nodes_before > 100}
    assert all(r.nodes_after < r.nodes_before for r in big.values())
    fired = {p.name for r in results for p in r.passes if p.fired}
    assert {"fold_constants", "fold_norm_linear"} <= fired
    report = json.loads((out / "optimize.json").read_text())
    assert [r["stage"] for r in report] == [r.stage for r in results]
    assert "| image_unet |" in (out / "optimize.md").read_text()
    load_manifest(out)  # hashes of the rewritten artifacts are in the manifest


def test_no_foldable_norm_is_left(optimized):
    out, manifest, _ = optimized
    for name, sb in manifest.stages.items():
        model = ir.from_proto(onnx.load(str(out / sb.file)))
        again = fold_norm_into_linear(model)
        assert again.fired == 0, name
        for note in again.notes:  # what stays is explained
            assert "not linear" in note or "graph output" in note


def test_lowered_graphs_are_used_and_outputs_do_not_change(optimized, default_build):
    out, manifest, _ = optimized
    assert manifest.stages["image_unet"].variant(Role.ORT) is not None
    base, opt = Pipeline(default_build), Pipeline(out)
    assert opt.build.engine("image_unet").path.name == "image_unet.ort.onnx"
    kw = dict(
        generation=GenerationConfig(max_new_tokens=8),
        diffusion=DiffusionConfig(steps=3),
        force=["image", "audio"],
    )
    a, b = base.run("Describe the image", **kw), opt.run("Describe the image", **kw)
    assert a.generation.token_ids == b.generation.token_ids
    assert np.abs(a.images[0] - b.images[0]).max() <= 1e-4
    assert np.abs(a.audios[0] - b.audios[0]).max() <= 1e-4
    assert (
        LlmRuntime(out).generate("A dog runs", GenerationConfig(max_new_tokens=16)).token_ids
        == LlmRuntime(default_build).generate("A dog runs", GenerationConfig(max_new_tokens=16)).token_ids
    )


def test_cli_optimize_in_place_and_refuses_twice(default_build, tmp_path, capsys):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(default_build, copy)
    assert main(["optimize", str(copy)]) == 0
    assert "| llm |" in capsys.readouterr().out
    assert (copy / "optimize.json").is_file() and [p.name for p in tmp_path.iterdir()] == ["b"]
    assert main(["optimize", str(copy)]) == 1
    assert "already optimized" in capsys.readouterr().err
