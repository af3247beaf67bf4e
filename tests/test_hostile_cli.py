"""Hostile arguments to the commands that write builds (export, build, optimize, quantize): folders
whose replacement would delete the caller's files, files where folders are meant, paths the operating
system cannot take, and calibration folders with broken contents. Each is one sentence and exit 1,
given before any export or quantization starts, with nothing written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from omniforge.calibration.capture import MAX_CALIBRATION_FILES, MAX_CALIBRATION_PROMPTS, CalibrationInputs
from omniforge.cli import main
from omniforge.runtime.media import write_png, write_wav

LONG = "a" * 5000  # beyond PATH_MAX
LONG_NAME = "n" * 300  # one component beyond NAME_MAX


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> str:
    """Run the CLI; it must exit 1 with one error line containing ``needle``, and no traceback."""
    assert main(argv) == 1, argv
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("omniforge: error:")]
    assert len(errors) == 1 and needle in errors[0], err
    assert err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")}


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A current folder holding a file of the caller's."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.txt").write_text("do not delete")
    monkeypatch.chdir(work)
    return work


# ---- --out: folders whose replacement would delete the caller's files ---------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["export", "{model}", "--out", "."],
        ["export", "--out", "."],
        ["build", "{model}", "--out", ".", "--cache", "{tmp}/cache"],
        ["optimize", "{build}", "--out", "."],
        ["quantize", "{build}", "--out", "."],
    ],
)
def test_out_the_current_folder_is_refused(argv, cwd, default_model, default_build, tmp_path, capsys):
    argv = [a.format(model=default_model, build=default_build, tmp=tmp_path) for a in argv]
    refused(capsys, argv, "--out '.' is the current folder; replacing it would delete the files in it")
    assert sorted(os.listdir(cwd)) == ["thesis.txt"] and (cwd / "thesis.txt").read_text() == "do not delete"
    assert not (tmp_path / "cache").exists()


def test_out_a_folder_above_the_current_one_is_refused(cwd, default_model, capsys):
    refused(capsys, ["export", str(default_model), "--out", ".."], "is a folder above the current one")
    refused(capsys, ["export", str(default_model), "--out", "/"], "is a folder above the current one")
    assert sorted(os.listdir(cwd)) == ["thesis.txt"]


def test_optimize_in_place_from_inside_the_build_is_refused(default_build, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "b"
    shutil.copytree(default_build, copy)
    before = snapshot(copy)
    monkeypatch.chdir(copy)
    refused(capsys, ["optimize", "."], "BUILD '.' is the current folder")
    assert snapshot(copy) == before


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["export", "{model}", "--out", "{model}"], "holds the model folder being read"),
        (["export", "{model}", "--out", "{model_parent}"], "holds the model folder being read"),
        (["export", "{model}", "--out", "{model}/build"], "lies inside the model folder being read"),
        (["build", "{model}", "--out", "{model}", "--cache", "{tmp}/cache"], "holds the model folder"),
        (["build", "{model}", "--out", "{model_parent}", "--cache", "{tmp}/cache"], "holds the model folder"),
        (["build", "{model}", "--out", "{tmp}/c", "--cache", "{tmp}/c/cache"], "holds the build cache"),
        (["optimize", "{build}", "--out", "{build_parent}"], "holds the build being read"),
        (["optimize", "{build}", "--out", "{build}/optimized"], "lies inside the build being read"),
        (["quantize", "{build}", "--out", "{build}"], "holds the build being read"),
        (["quantize", "{build}", "--out", "{build}/int4"], "lies inside the build being read"),
    ],
)
def test_out_overlapping_what_is_read_is_refused(
    argv, needle, default_model, default_build, tmp_path, capsys
):
    names = {
        "model": default_model,
        "model_parent": default_model.parent,
        "build": default_build,
        "build_parent": default_build.parent,
        "tmp": tmp_path,
    }
    before = snapshot(default_model.parent), snapshot(default_build.parent)
    refused(capsys, [a.format(**names) for a in argv], needle)
    assert (snapshot(default_model.parent), snapshot(default_build.parent)) == before
    assert not (tmp_path / "cache").exists() and not (tmp_path / "c").exists()


# ---- files where folders are meant ---------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, needle",
    [
        (
            ["build", "{model}", "--out", "{tmp}/b", "--cache", "{file}"],
            "--cache '{file}' is a file, not a folder",
        ),
        (
            ["build", "{model}", "--out", "{tmp}/b", "--cache", "{file}/sub"],
            "lies under '{file}', which is a file",
        ),
        (["export", "{model}", "--out", "{file}"], "--out '{file}' is a file, not a folder"),
        (["export", "{model}", "--out", "{file}/deeper/b"], "lies under '{file}', which is a file"),
        (["build", "{model}", "--out", "{file}"], "--out '{file}' is a file, not a folder"),
        (["optimize", "{build}", "--out", "{file}"], "--out '{file}' is a file, not a folder"),
        (["quantize", "{build}", "--out", "{file}"], "--out '{file}' is a file, not a folder"),
    ],
)
def test_files_where_folders_are_meant_are_refused(
    argv, needle, default_model, default_build, tmp_path, capsys
):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    names = {"model": default_model, "build": default_build, "tmp": tmp_path, "file": file}
    from omniforge.cli._common import _shown  # a long temporary path is shown cut

    refused(capsys, [a.format(**names) for a in argv], needle.format(file=_shown(str(file))))
    assert file.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["notes.txt"]


# ---- paths the operating system cannot take -------------------------------------------------------
@pytest.mark.parametrize("long", [LONG, LONG_NAME], ids=["5000-characters", "300-character-name"])
@pytest.mark.parametrize(
    "argv, what",
    [
        (["export", "{model}", "--out", "{tmp}/{long}"], "--out"),
        (["build", "{model}", "--out", "{tmp}/b", "--cache", "{tmp}/{long}"], "--cache"),
        (
            [
                "build",
                "{model}",
                "--out",
                "{tmp}/b",
                "--cache",
                "{tmp}/c",
                "--calibration-data",
                "{tmp}/{long}",
            ],
            "--calibration-data",
        ),
        (
            ["quantize", "{build}", "--out", "{tmp}/q", "--calibration-data", "{tmp}/{long}"],
            "--calibration-data",
        ),
        (["export", "{tmp}/{long}", "--out", "{tmp}/b"], "model path"),
        (["build", "{tmp}/{long}", "--out", "{tmp}/b", "--cache", "{tmp}/c"], "model path"),
        (["optimize", "{tmp}/{long}", "--out", "{tmp}/b"], "build path"),
        (["quantize", "{tmp}/{long}", "--out", "{tmp}/b"], "build path"),
        (["optimize", "{build}", "--out", "{tmp}/{long}"], "--out"),
    ],
)
def test_overlong_paths_get_one_sentence(argv, what, long, default_model, default_build, tmp_path, capsys):
    names = {"model": default_model, "build": default_build, "tmp": tmp_path, "long": long}
    line = refused(capsys, [a.format(**names) for a in argv], what)
    why = "is longer than the 4095 bytes a path may have" if long == LONG else "has a name of 300 bytes"
    assert why in line and len(line) < 300, line  # the path is shown cut short
    assert os.listdir(tmp_path) == []


def test_a_5000_character_out_in_a_new_process_is_one_line(default_model, tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "omniforge", "export", str(default_model), "--out", str(tmp_path / LONG)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("omniforge: error: --out ") and "Traceback" not in res.stderr


# ---- --calibration-data folders with broken contents ------------------------------------------------
GOOD = b'{"prompt": "a cat on a mat"}\n'


def _image(folder: Path) -> None:
    write_png(folder / "good.png", np.full((16, 16, 3), 0.5, np.float32))


CALIBRATION_CASES = {
    "non-utf8": (
        {"prompts.jsonl": GOOD + b'{"prompt": "caf\xe9"}\n'},
        "prompts.jsonl line 2 is not UTF-8 text",
    ),
    "not-json": ({"prompts.jsonl": GOOD + b"a cat\n"}, "prompts.jsonl line 2 is not valid JSON"),
    "json-array": (
        {"prompts.jsonl": b"\n" + GOOD + b"[1, 2]\n"},
        "prompts.jsonl line 3 is not a JSON object",
    ),
    "json-string": ({"prompts.jsonl": b'"a cat"\n'}, "prompts.jsonl line 1 is not a JSON object"),
    "huge-float": (
        {"prompts.jsonl": b'{"prompt": 1e999}\n'},
        "line 1 has a 'prompt' that is a number, not a string",
    ),
    "huge-int": (
        {"prompts.jsonl": b'{"prompt": ' + b"7" * 5000 + b"}\n"},
        "line 1 holds an integer with more digits",
    ),
    "huge-int-elsewhere": (
        {"prompts.jsonl": GOOD + b'{"n": ' + b"7" * 5000 + b', "prompt": "x"}\n'},
        "line 2 holds an integer with more digits",
    ),
    "deep-nesting": ({"prompts.jsonl": b"[" * 100_000 + b"\n"}, "line 1 nests arrays or objects too deep"),
    "no-prompt-key": (
        {"prompts.jsonl": GOOD + b'{"text": "a cat"}\n'},
        "prompts.jsonl line 2 has no 'prompt' key",
    ),
    "null-prompt": ({"prompts.jsonl": b'{"prompt": null}\n'}, "line 1 has a 'prompt' that is null"),
    "empty-prompt": ({"prompts.jsonl": b'{"prompt": "  "}\n'}, "line 1 has an empty 'prompt'"),
    "lone-surrogate": (
        {"prompts.jsonl": b'{"prompt": "\\ud800"}\n'},
        "line 1 has a 'prompt' that is not valid Unicode",
    ),
    "empty-file": ({"prompts.jsonl": b""}, "prompts.jsonl' holds no prompts"),
    "blank-lines": ({"prompts.txt": b"\n  \n\n"}, "prompts.txt' holds no prompts"),
    "no-prompts-file": ({}, "has no prompts.jsonl or prompts.txt"),
    "prompts-is-a-folder": ({"prompts.jsonl/": b""}, "prompts.jsonl' is not a regular file"),
    "folder-named-like-an-image": ({"prompts.jsonl": GOOD, "x.png/": b""}, "x.png' is a folder"),
    "undecodable-image": (
        {"prompts.jsonl": GOOD, "photo.png": b"\x89PNG but not really"},
        "'photo.png' is not a readable image",
    ),
    "truncated-image": ({"prompts.jsonl": GOOD, "cut.png": "CUT"}, "'cut.png' is not a readable image"),
    "not-a-wav": (
        {"prompts.jsonl": GOOD, "clip.wav": b"RIFF....AVI LIST"},
        "'clip.wav' is not a readable PCM WAV file",
    ),
    "too-many-prompts": (
        {"prompts.jsonl": GOOD * (MAX_CALIBRATION_PROMPTS + 1)},
        f"prompts.jsonl line {MAX_CALIBRATION_PROMPTS + 1}: more than 10,000 prompts",
    ),
    "too-many-images": ({"prompts.jsonl": GOOD, "MANY": ".png"}, "holds more than 10,000 images"),
    "too-many-wavs": ({"prompts.jsonl": GOOD, "MANY": ".wav"}, "holds more than 10,000 WAV files"),
}


def _calibration_folder(root: Path, files: dict[str, bytes | str]) -> Path:
    folder = root / "calib"
    folder.mkdir()
    _image(folder)  # a good image beside the bad content: the bad one is still found
    for name, content in files.items():
        if name.endswith("/"):
            (folder / name.rstrip("/")).mkdir()
        elif name == "MANY":
            for i in range(MAX_CALIBRATION_FILES + 1):
                (folder / f"{i:05d}{content}").touch()
        elif content == "CUT":
            full = (folder / "good.png").read_bytes()
            (folder / name).write_bytes(full[: len(full) // 2])
        else:
            (folder / name).write_bytes(content)
    return folder


@pytest.mark.parametrize("case", list(CALIBRATION_CASES))
def test_broken_calibration_folders_are_refused_before_quantizing(case, default_build, tmp_path, capsys):
    files, needle = CALIBRATION_CASES[case]
    folder = _calibration_folder(tmp_path, files)
    out = tmp_path / "q"
    line = refused(
        capsys, ["quantize", str(default_build), "--out", str(out), "--calibration-data", str(folder)], needle
    )
    assert str(folder) in line  # the file is named with its folder
    assert not out.exists()


def test_build_checks_the_calibration_folder_before_exporting(default_model, tmp_path, capsys):
    folder = _calibration_folder(tmp_path, {"prompts.jsonl": GOOD + b"[1]\n"})
    argv = ["build", str(default_model), "--out", str(tmp_path / "b"), "--cache", str(tmp_path / "cache")]
    refused(
        capsys,
        [*argv, "--precision", "int8", "--calibration-data", str(folder)],
        "line 2 is not a JSON object",
    )
    assert sorted(os.listdir(tmp_path)) == ["calib"]  # no cache, no build


def test_a_good_calibration_folder_is_read_whole(tmp_path):
    folder = _calibration_folder(
        tmp_path, {"prompts.jsonl": b"\xef\xbb\xbf" + GOOD + b"\n" + b'{"prompt": "caf\xc3\xa9"}\n'}
    )
    write_wav(folder / "tone.wav", np.sin(np.arange(1600) / 5).astype(np.float32), 16000)
    (folder / "notes.md").write_text("not calibration data")
    got = CalibrationInputs.from_folder(folder)
    assert got.prompts == ["a cat on a mat", "café"]
    assert [p.name for p in got.images] == ["good.png"] and [p.name for p in got.audios] == ["tone.wav"]
    many = tmp_path / "many"
    many.mkdir()
    (many / "prompts.txt").write_text("a dog\n" * MAX_CALIBRATION_PROMPTS)
    assert len(CalibrationInputs.from_folder(many).prompts) == MAX_CALIBRATION_PROMPTS
