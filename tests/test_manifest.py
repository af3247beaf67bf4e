"""Manifest validation: schema version, paths inside the build, SHA-256 of every artifact."""

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omniforge.errors import ManifestError
from omniforge.pipeline.manifest import Manifest, check_relative, load_manifest


@pytest.fixture()
def build_copy(default_build, tmp_path):
    dst = tmp_path / "build"
    shutil.copytree(default_build, dst)
    return dst


def edit_manifest(build, fn):
    path = build / "manifest.json"
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def test_manifest_roundtrips(default_build):
    m = load_manifest(default_build)
    again = Manifest.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again.to_dict() == m.to_dict()
    assert m.files["tokenizer"] == "llm/tokenizer.json"
    assert {
        "image_scheduler",
        "video_scheduler",
        "audio_scheduler",
        "image_preprocessor",
        "audio_frontend",
        "vocoder",
    } <= set(m.files)
    assert m.tools["onnxruntime"]


def test_flipped_byte_in_any_artifact_is_detected(build_copy):
    m = load_manifest(build_copy)
    for rel in m.artifacts:
        f = build_copy / rel
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01
        original = f.read_bytes()
        f.write_bytes(bytes(data))
        with pytest.raises(ManifestError, match="SHA-256"):
            load_manifest(build_copy)
        f.write_bytes(original)
    load_manifest(build_copy)


def test_missing_artifact_is_reported(build_copy):
    (build_copy / "stages" / "vocoder.onnx").unlink()
    with pytest.raises(ManifestError, match="'stages/vocoder.onnx' is missing"):
        load_manifest(build_copy)


def test_schema_version_mismatch(build_copy):
    edit_manifest(build_copy, lambda d: d.update(schema_version=0))
    with pytest.raises(ManifestError, match="schema version 0 is not supported"):
        load_manifest(build_copy)


def test_paths_must_stay_inside_the_build(build_copy):
    def escape(d):
        d["artifacts"][0]["path"] = "../outside.onnx"
        d["stages"]["token_embedding"]["variants"][0]["file"] = "../outside.onnx"

    edit_manifest(build_copy, escape)
    with pytest.raises(ManifestError, match="does not match its schema at artifacts/0/path"):
        load_manifest(build_copy)


def test_symlink_out_of_the_build_is_rejected(build_copy, tmp_path):
    target = build_copy / "stages" / "vocoder.onnx"
    outside = tmp_path / "outside.onnx"
    shutil.move(target, outside)
    target.symlink_to(outside)
    with pytest.raises(ManifestError, match="outside the build folder"):
        load_manifest(build_copy)


def test_malformed_manifest(build_copy):
    edit_manifest(build_copy, lambda d: d.pop("pipeline"))
    with pytest.raises(ManifestError, match="does not match its schema"):
        load_manifest(build_copy)
    (build_copy / "manifest.json").write_text("[1, 2")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(build_copy)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(min_size=0, max_size=40))
def test_check_relative_never_lets_a_path_escape(p):
    from pathlib import PurePosixPath

    try:
        check_relative(p)
    except ManifestError:
        return
    parts = PurePosixPath(p).parts
    assert p and not p.startswith("/") and ".." not in parts and "\\" not in p


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
        max_leaves=10,
    )
)
def test_from_dict_raises_only_manifest_errors(data):
    try:
        Manifest.from_dict(data)
    except ManifestError:
        pass
