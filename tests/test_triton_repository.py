"""``omniforge triton``: the repository's layout and configs, from the stage description."""

from __future__ import annotations

import json
import os

import pytest

from omniforge.cli import main
from omniforge.errors import ConfigError, ManifestError
from omniforge.pipeline.spec import Dim, StageKind, StageSpec, TensorSpec
from omniforge.serving import pbtxt
from omniforge.serving.repository import (
    REPOSITORY_FILE,
    RepositoryOptions,
    batch_dim,
    read_repository,
    stage_config,
    write_repository,
)


def parsed(path):
    """A config.pbtxt parsed with Triton's own ModelConfig message (from tritonclient)."""
    message = pbtxt.model_config_message()
    if message is None:
        pytest.skip(
            "tritonclient (the serve extra) is not installed: Triton's ModelConfig message is missing"
        )
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), message())


@pytest.fixture(scope="module")
def repo(default_build, tmp_path_factory):
    return write_repository(default_build, tmp_path_factory.mktemp("triton") / "repo")


def test_every_stage_gets_its_models_and_configs_parse(repo, default_build):
    from omniforge.pipeline.manifest import load_manifest

    m = load_manifest(default_build)
    names = set(repo.names())
    for stage in m.stages:
        assert f"{stage}_onnx" in names
        assert (f"{stage}_py" in names) == (stage != "llm")  # the LLM is served by the llm model
    assert {"llm", "any2any", "omniforge_build"} <= names
    assert not repo.names("tensorrt")  # this build has no engines
    for name in names:
        cfg = parsed(repo.path / name / "config.pbtxt")
        assert cfg.name == name
        assert (repo.path / name / "1").is_dir()
    assert repo.checked
    assert read_repository(repo.path).names() == repo.names()


def test_dims_batching_and_files_come_from_the_stage_description(repo, default_build):
    unet = parsed(repo.path / "image_unet_onnx" / "config.pbtxt")
    assert unet.platform == "onnxruntime_onnx" and unet.max_batch_size == 8
    ins = {i.name: i for i in unet.input}
    assert list(ins["sample"].dims) == [4, 16, 16]
    assert list(ins["timestep"].dims) == [1] and list(ins["timestep"].reshape.shape) == []  # (batch,)
    assert unet.HasField("dynamic_batching")
    vocoder = parsed(repo.path / "vocoder_onnx" / "config.pbtxt")
    assert [list(t.dims) for t in vocoder.input] == [[-1, 16]] and [list(t.dims) for t in vocoder.output] == [
        [-1]
    ]
    llm = parsed(repo.path / "llm_onnx" / "config.pbtxt")
    assert llm.max_batch_size == 8 and not llm.HasField("dynamic_batching")
    assert list({t.name: t for t in llm.input}["past_key_values.0.key"].dims) == [2, -1, 16]
    link = repo.path / "image_unet_onnx" / "1" / "model.onnx"
    assert link.is_symlink() and link.resolve() == (default_build / "stages" / "image_unet.onnx").resolve()
    py = parsed(repo.path / "image_unet_py" / "config.pbtxt")
    assert py.backend == "python" and py.max_batch_size == 8
    params = {k: v.string_value for k, v in py.parameters.items()}
    assert params["stage"] == "image_unet" and params["build"] == str(default_build.resolve())
    assert len(params["manifest_sha256"]) == 64
    assert (
        "omniforge.serving.triton_backend import StageModel"
        in (repo.path / "image_unet_py" / "1" / "model.py").read_text()
    )
    stream = parsed(repo.path / "llm" / "config.pbtxt")
    assert stream.model_transaction_policy.decoupled
    assert {t.name for t in stream.input if not t.optional} == {"prompt"}
    a2a = parsed(repo.path / "any2any" / "config.pbtxt")
    assert a2a.max_batch_size == 4 and {t.name for t in a2a.output} >= {
        "text",
        "images",
        "videos",
        "audios",
        "signals",
    }


def test_copy_holds_the_build_and_no_links(default_build, tmp_path):
    repo = write_repository(default_build, tmp_path / "repo", RepositoryOptions(copy=True))
    copied = repo.path / "omniforge_build" / "build"
    assert (copied / "manifest.json").read_bytes() == (default_build / "manifest.json").read_bytes()
    assert not [p for p in repo.path.rglob("*") if p.is_symlink()]
    params = {k: v.string_value for k, v in parsed(repo.path / "llm" / "config.pbtxt").parameters.items()}
    assert params["build"] == "../omniforge_build/build"
    assert (repo.path / "image_unet_onnx" / "1" / "model.onnx").read_bytes() == (
        default_build / "stages" / "image_unet.onnx"
    ).read_bytes()


def test_batch_dim_rules():
    batch = Dim("batch", 1, 1, 4)
    both = StageSpec(
        "s",
        StageKind.ENCODER,
        "c",
        (TensorSpec("x", "float32", ("batch", 3)),),
        (TensorSpec("y", "float32", ("batch",)),),
        (batch,),
    )
    assert batch_dim(both) is batch
    other = StageSpec(
        "s",
        StageKind.ENCODER,
        "c",
        (TensorSpec("x", "float32", (2, "n")),),
        (TensorSpec("y", "float32", ("n",)),),
        (Dim("n", 1, 2, 9),),
    )
    assert batch_dim(other) is None
    cfg = stage_config("s_onnx", other, "onnxruntime", RepositoryOptions(), {})
    assert (
        cfg["max_batch_size"] == 0 and cfg["input"][0]["dims"] == [2, -1] and cfg["dynamic_batching"] is None
    )
    assert pbtxt.check(pbtxt.render(cfg), "s_onnx") in (True, False)
    trt = stage_config("s_trt", both, "tensorrt", RepositoryOptions(), {})
    assert trt["platform"] == "tensorrt_plan" and trt["max_batch_size"] == 4
    assert trt["output"][0]["dims"] == [1] and trt["output"][0]["reshape"] == {"shape": []}
    assert pbtxt.check(pbtxt.render(trt), "s_trt") in (True, False)
    twice = StageSpec(
        "s",
        StageKind.ENCODER,
        "c",
        (TensorSpec("x", "float32", ("batch", "batch")),),
        (TensorSpec("y", "float32", ("batch",)),),
        (batch,),
    )
    assert batch_dim(twice) is None


def test_render_escapes_strings_and_check_refuses_unknown_fields():
    text = pbtxt.render({"name": 'a"b\\c', "parameters": pbtxt.parameters({"k": "line\nnext"})})
    assert 'name: "a\\"b\\\\c"' in text and '"line\\nnext"' in text
    if pbtxt.model_config_message() is None:
        pytest.skip("tritonclient is not installed")
    with pytest.raises(ConfigError, match="not a Triton ModelConfig"):
        pbtxt.check('name: "x"\nno_such_field: 1\n', "x")


def test_cli_writes_replaces_and_refuses(default_build, tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["triton", str(default_build), "--out", str(out), "--llm-slots", "2"]) == 0
    printed = capsys.readouterr().out
    assert "32 models" in printed and "omniforge serve --repo" in printed
    assert json.loads((out / REPOSITORY_FILE).read_text())["options"]["llm_slots"] == 2
    assert main(["triton", str(default_build), "--out", str(out)]) == 0  # replaced in place
    assert read_repository(out).options.llm_slots == 4
    assert main(["triton", str(default_build), "--out", str(default_build / "repo")]) == 1
    assert "may not be the build folder" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["triton", str(default_build), "--out", str(other)]) == 1
    assert "not a repository written by `omniforge triton`" in capsys.readouterr().err
    assert main(["triton", str(default_build), "--out", str(out), "--llm-slots", "0"]) == 1
    assert "llm-slots must be an integer" in capsys.readouterr().err


def test_a_tampered_build_writes_nothing(default_build, tmp_path):
    import shutil

    build = tmp_path / "build"
    shutil.copytree(default_build, build)
    out = tmp_path / "repo"
    write_repository(build, out)
    before = sorted(os.listdir(out))
    with open(build / "stages" / "vocoder.onnx", "r+b") as f:
        f.seek(50)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ManifestError, match="SHA-256"):
        write_repository(build, out)
    assert sorted(os.listdir(out)) == before  # the previous repository is left as it was


def test_python_models_take_providers_and_threads(default_build, tmp_path, capsys):
    out = tmp_path / "repo"
    argv = [
        "triton",
        str(default_build),
        "--out",
        str(out),
        "--providers",
        "CUDAExecutionProvider,CPUExecutionProvider",
    ]
    assert main([*argv, "--threads", "2"]) == 0
    params = {k: v.string_value for k, v in parsed(out / "image_unet_py" / "config.pbtxt").parameters.items()}
    assert params["providers"] == "CUDAExecutionProvider,CPUExecutionProvider" and params["threads"] == "2"
    assert read_repository(out).options.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert main([*argv[:-2], "--providers", "not a provider"]) == 1
    assert "providers must be ONNX Runtime provider names" in capsys.readouterr().err
