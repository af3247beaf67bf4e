"""``omniforge optimize`` on the default build: every stage, parity, report, runtime unchanged."""

import contextlib
import io
import json
import shutil
from types import SimpleNamespace

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
def cli_run(default_build, tmp_path_factory):
    """``omniforge optimize BUILD`` in place on a copy of the default build, run once for the
    module: the folder it ran in, the exit code, what it printed, and the manifest and per-stage
    results ``optimize_build`` returned to it."""
    import omniforge.passes.build

    root = tmp_path_factory.mktemp("opt")
    out = root / "b"
    shutil.copytree(default_build, out)
    returned = []

    def kept(*args, **kwargs):
        returned.append(optimize_build(*args, **kwargs))
        return returned[-1]

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(omniforge.passes.build, "optimize_build", kept)
        code = main(["optimize", str(out)])
    ((manifest, results),) = returned
    return SimpleNamespace(
        root=root, out=out, code=code, stdout=printed.getvalue(), manifest=manifest, results=results
    )


@pytest.fixture(scope="module")
def optimized(cli_run):
    return cli_run.out, cli_run.manifest, cli_run.results


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


def test_cli_optimize_in_place_and_refuses_twice(cli_run, capsys):
    copy = cli_run.out
    assert cli_run.code == 0
    assert "| llm |" in cli_run.stdout
    assert (copy / "optimize.json").is_file() and [p.name for p in cli_run.root.iterdir()] == ["b"]
    assert main(["optimize", str(copy)]) == 1
    assert "already optimized" in capsys.readouterr().err
