"""The CLI: help on every subcommand, one clear sentence and exit 1 on bad input, nothing half-written."""

import subprocess
import sys

import pytest

from omniforge.cli import main

SUBCOMMANDS = ["export", "run", "describe", "inspect", "create-default"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "omniforge", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help_on_each_subcommand(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    assert "usage: omniforge " + cmd in capsys.readouterr().out


def assert_one_line_error(res: subprocess.CompletedProcess, needle: str) -> None:
    assert res.returncode == 1, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("omniforge: error:")]
    assert len(errors) == 1 and needle in errors[0], res.stderr
    assert "Traceback" not in res.stderr


def test_missing_model_path(tmp_path):
    res = run_cli("export", str(tmp_path / "missing"), "--out", str(tmp_path / "b"))
    assert_one_line_error(res, "does not exist")
    assert not (tmp_path / "b").exists()


def test_unknown_stage_leaves_nothing_behind(tmp_path, default_model):
    res = run_cli("export", str(default_model), "--out", str(tmp_path / "b"), "--stages", "llm,warp_drive")
    assert_one_line_error(res, "unknown stage 'warp_drive'")
    assert list(tmp_path.iterdir()) == []


def test_bad_option_values(tmp_path, default_model):
    assert_one_line_error(
        run_cli("export", str(default_model), "--out", str(tmp_path / "b"), "--opset", "9"),
        "opset 9 is not supported",
    )
    assert_one_line_error(
        run_cli(
            "export",
            str(default_model),
            "--out",
            str(tmp_path / "b"),
            "--stages",
            "llm",
            "--adapter",
            "smell",
        ),
        "unknown adapter 'smell'",
    )


def test_export_refuses_to_replace_a_folder_that_is_not_a_build(tmp_path, default_model):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    res = run_cli("export", str(default_model), "--out", str(precious), "--stages", "input_projector")
    assert_one_line_error(res, "is not a build folder")
    assert (precious / "thesis.txt").read_text() == "do not delete"


def test_export_stage_subset_then_inspect_and_describe(tmp_path, default_model):
    out = tmp_path / "b"
    stages = "input_projector,vocoder"
    res = run_cli("-v", "export", str(default_model), "--out", str(out), "--stages", stages)
    assert res.returncode == 0, res.stderr
    assert "| vocoder |" in res.stdout and "build written to" in res.stdout
    assert "[2/2] vocoder" in res.stderr
    res = run_cli("inspect", str(out))
    assert res.returncode == 0 and "2 stages" in res.stdout
    res = run_cli("describe", str(out))
    assert res.returncode == 0 and "vocoder [vocoder]" in res.stdout
    # re-export replaces the build in place
    res = run_cli("export", str(default_model), "--out", str(out), "--stages", "input_projector")
    assert res.returncode == 0
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["input_projector.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_inspect_rejects_a_folder_without_manifest(tmp_path):
    assert_one_line_error(run_cli("inspect", str(tmp_path)), "not a build folder")


def test_describe_the_default_model(default_model):
    res = run_cli("describe", str(default_model))
    assert res.returncode == 0
    assert "llm [llm]" in res.stdout and "total=1/32/256" in res.stdout


def test_run_streams_text_and_reports_timings(default_build):
    res = run_cli("run", str(default_build), "--prompt", "A dog runs", "--max-new-tokens", "8")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()
    assert "8 new, finish: length" in res.stderr and "time to first token" in res.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--top-p", "0"], "top_p must lie in (0, 1]"),
        (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (["--temperature", "-1"], "temperature must be >= 0"),
    ],
)
def test_run_rejects_bad_options(default_build, args, needle):
    assert_one_line_error(run_cli("run", str(default_build), "--prompt", "hi", *args), needle)


def test_run_rejects_a_missing_build_and_an_overlong_prompt(default_build, tmp_path):
    assert_one_line_error(run_cli("run", str(tmp_path / "nope"), "--prompt", "hi"), "not a build folder")
    long_prompt = "one two three " * 200
    assert_one_line_error(
        run_cli("run", str(default_build), "--prompt", long_prompt), "the context holds 256"
    )


def test_run_with_media_writes_every_forced_medium(default_build, tmp_path):
    import numpy as np
    from PIL import Image

    from omniforge.runtime.media import write_wav

    Image.fromarray(np.full((24, 36, 3), 120, np.uint8)).save(tmp_path / "in.png")
    write_wav(tmp_path / "in.wav", np.zeros(3000, np.float32), 8000)
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(5):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(frames / f"{i}.png")
    out = tmp_path / "out"
    for media in (
        ["--image", str(tmp_path / "in.png")],
        ["--audio", str(tmp_path / "in.wav")],
        ["--video", str(frames)],
    ):
        res = run_cli(
            "run",
            str(default_build),
            "--prompt",
            "Describe it",
            *media,
            "--max-new-tokens",
            "4",
            "--steps",
            "2",
            "--force",
            "image",
            "--force",
            "video",
            "--force",
            "audio",
            "--out",
            str(out),
            "--low-memory",
        )
        assert res.returncode == 0, res.stderr
        assert "image_unet" in res.stderr and "total" in res.stderr
    assert {p.name for p in out.iterdir()} >= {"image_0.png", "video_0.gif", "audio_0.wav", "video_0_frames"}


def test_run_rejects_bad_media(default_build, tmp_path):
    (tmp_path / "fake.png").write_text("not a png")
    assert_one_line_error(
        run_cli("run", str(default_build), "--prompt", "x", "--image", str(tmp_path / "fake.png")),
        "not a readable image",
    )
    assert_one_line_error(
        run_cli("run", str(default_build), "--prompt", "x", "--audio", str(tmp_path / "none.wav")),
        "does not exist",
    )
    assert_one_line_error(
        run_cli("run", str(default_build), "--prompt", "x", "--steps", "0"), "steps must be >= 1"
    )
