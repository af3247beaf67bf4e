"""The build cache: content digests, damaged indexes and entries, stale temporaries, concurrent builds,
and what goes into the export step's key. Builds here use the default model's LLM folder (a plain HF
Llama folder: an LLM-only pipeline), so a cold build takes seconds."""

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest

from omniforge.build import BuildOptions, build
from omniforge.build_cache import clean_stale, folder_digest, read_index
from omniforge.cli import main
from omniforge.errors import ConfigError
from omniforge.pipeline.manifest import load_manifest


def _quiet(_m: str) -> None:
    pass


def _age(path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def _flip_weight_byte(path) -> None:
    """Change one weight byte of a safetensors file in place (same size, first tensor's low byte)."""
    with open(path, "r+b") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        b = f.read(1)
        f.seek(8 + header)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.fixture(scope="module")
def llm_model(default_model, tmp_path_factory):
    return shutil.copytree(default_model / "llm", tmp_path_factory.mktemp("llm") / "llm")


@pytest.fixture(scope="module")
def shared(llm_model, tmp_path_factory):
    """Three builds started together on a fresh cache (two of them into the same folder)."""
    root = tmp_path_factory.mktemp("concurrent")
    cache = root / "cache"
    outs = [root / "x", root / "y", root / "x"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "omniforge", "build", str(llm_model), "-o", str(o), "--cache", str(cache)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for o in outs
    ]
    results = [(p.wait(timeout=900), p.stderr.read()) for p in procs]
    return root, cache, results


def test_concurrent_builds_on_a_fresh_cache_share_it(shared, capsys):
    root, _, results = shared
    for rc, err in results:
        assert rc == 0, err
    reused = [err for _, err in results if "export: up to date" in err]
    assert len(reused) == 2  # one build exported, the others waited and reused its entry
    for name in ("x", "y"):
        assert main(["inspect", str(root / name)]) == 0
    capsys.readouterr()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_a_second_build_reads_the_cache_and_reindexes_nothing(shared, llm_model, tmp_path):
    _, cache, _ = shared
    index = cache / "file-hashes.json"
    before = index.read_bytes()
    logs: list[str] = []
    build(llm_model, tmp_path / "again", BuildOptions(cache=cache), log=logs.append)
    assert "export: up to date (cached)" in logs and "optimize: up to date (cached)" in logs
    assert not any(line.startswith("[1/2]") for line in logs)
    assert index.read_bytes() == before


def test_an_in_place_edit_of_a_model_file_rebuilds(shared, llm_model, tmp_path):
    _, cache, _ = shared
    model = shutil.copytree(llm_model, tmp_path / "model")
    logs: list[str] = []
    build(model, tmp_path / "before", BuildOptions(cache=cache), log=logs.append)
    assert "export: up to date (cached)" in logs  # same content elsewhere: same key
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    _flip_weight_byte(weights)
    assert weights.stat().st_size == size
    logs.clear()
    build(model, tmp_path / "after", BuildOptions(cache=cache), log=logs.append)
    assert "export: up to date (cached)" not in logs
    assert any(line.startswith("[2/2] llm:") for line in logs)
    old, new = load_manifest(tmp_path / "before"), load_manifest(tmp_path / "after")
    assert old.artifacts["stages/llm.onnx"].sha256 != new.artifacts["stages/llm.onnx"].sha256


def _one_file_folder(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A model folder holding one aged 64-byte file, and where its hash index goes."""
    folder = tmp_path / "m"
    folder.mkdir()
    f = folder / "weights.bin"
    f.write_bytes(b"a" * 64)
    _age(f, 60)
    return folder, f, tmp_path / "index.json"


def test_an_edit_that_restores_the_mtime_is_still_seen(tmp_path):
    folder, f, index = _one_file_folder(tmp_path)
    first = folder_digest(folder, index)
    st = f.stat()
    with open(f, "r+b") as fh:
        fh.write(b"b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: the ctime still moves
    assert f.stat().st_mtime_ns == st.st_mtime_ns
    assert folder_digest(folder, index) != first


def test_an_unchanged_file_is_taken_from_the_index(tmp_path):
    folder, f, index = _one_file_folder(tmp_path)
    real = folder_digest(folder, index)
    data = json.loads(index.read_text())
    (entry,) = data["files"].values()
    entry[4] = "0" * 64  # the index is trusted while the stamp matches: the file is not read again
    index.write_text(json.dumps(data))
    assert folder_digest(folder, index) != real
    f.write_bytes(b"a" * 64)  # rewritten: a new stamp, hashed again
    _age(f, 60)
    assert folder_digest(folder, index) == real


def test_a_truncated_index_counts_as_empty(shared, llm_model, tmp_path):
    _, cache, _ = shared
    index = cache / "file-hashes.json"
    text = index.read_text()
    index.write_text(text[: len(text) // 2])
    assert read_index(index) == {}
    logs: list[str] = []
    build(llm_model, tmp_path / "out", BuildOptions(cache=cache), log=logs.append)
    assert "export: up to date (cached)" in logs
    assert read_index(index)  # rewritten whole
    for bad in ("", "[]", '{"version": 1, "files": 3}', "\x00\x01"):
        index.write_text(bad)
        assert read_index(index) == {}


def test_stale_temporary_folders_are_removed(shared, llm_model, tmp_path):
    _, cache, _ = shared
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [
        cache / f".export-0123.tmp-{dead.pid}-abcd",  # its owner is gone
        tmp_path / ".out.tmp-k2j4h5g6",  # no owner recorded, two hours old
        tmp_path / f".out.old-{time.time_ns()}",
    ]
    kept = [
        cache / f".export-0123.tmp-{os.getpid()}-abcd",  # this process: a build in progress
        tmp_path / ".out.tmp-fresh123",  # recent, no owner recorded
        tmp_path / ".other.tmp-k2j4h5g6",  # another build folder's
    ]
    for p in stale + kept:
        (p / "stages").mkdir(parents=True)
        (p / "stages" / "big.onnx").write_bytes(b"0" * 1024)
    for p in stale[1:] + kept[2:]:
        _age(p, 7200)
    logs: list[str] = []
    build(llm_model, out, BuildOptions(cache=cache), log=logs.append)
    assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in kept)
    assert any("stale temporary folder" in line for line in logs)
    shutil.rmtree(kept[0])
    assert clean_stale(tmp_path, "out", _quiet) == []


def test_a_damaged_cache_entry_is_rebuilt(shared, llm_model, tmp_path):
    _, cache, _ = shared
    entry = min(cache.glob("optimize-*"), key=lambda p: p.stat().st_mtime)  # the first: this model's
    graph = entry / "stages" / "llm.onnx"
    graph.write_bytes(graph.read_bytes()[:-10] + b"0" * 10)
    logs: list[str] = []
    build(llm_model, tmp_path / "out", BuildOptions(cache=cache), log=logs.append)
    assert any("is damaged" in line and "rebuilding it" in line for line in logs)
    load_manifest(tmp_path / "out", verify=True)
    load_manifest(entry, verify=True)


def test_every_export_option_is_in_the_key():
    from omniforge.export.exporter import ExportOptions

    opts = BuildOptions().export_options()
    assert set(opts) == {f.name for f in fields(ExportOptions)}
    assert ExportOptions(**opts) == ExportOptions()  # what the export step runs with


def test_unsupported_opsets_are_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(ConfigError, match="opset 18 is not supported"):
        BuildOptions(opset=18)
    assert BuildOptions(opset=17).opset == 17
    for cmd in ("build", "export"):
        for opset in ("13", "18", "21"):
            out = tmp_path / f"{cmd}-{opset}"
            assert main([cmd, "--out", str(out), "--opset", opset]) == 1
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"omniforge: error: ONNX opset {opset} is not")
            assert not out.exists()
    from omniforge.export.exporter import ExportOptions, export_pipeline

    with pytest.raises(ConfigError, match="opset 16"):
        export_pipeline(tmp_path / "nowhere", tmp_path / "x", ExportOptions(opset=16), log=_quiet)
