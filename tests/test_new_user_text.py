"""What a new user reads: a quiet console, generated text without special tokens, a refused export
that could not run, parity near the full context, and end-to-end prompts held out from calibration."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from omniforge.calibration.capture import CalibrationInputs
from omniforge.calibration.corpus import calibration_lines, heldout_lines
from omniforge.calibration.end_to_end import end_to_end_accuracy
from omniforge.calibration.quantize import calibration_rows
from omniforge.runtime.llm import LlmRuntime
from omniforge.runtime.pipeline import DiffusionConfig, Pipeline
from omniforge.runtime.sampling import GenerationConfig

HIDDEN = ("[IMG", "[VID", "[AUD", "<pad>", "</s>", "<s>", "<image>", "<video>", "<audio>")
NOISE = ("INFO", "Warning", "warnings.warn", "%|", "it/s]")
SCREENFUL = 25


def omniforge(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMNIFORGE_HOME": str(home)}
    for k in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE", "TRANSFORMERS_VERBOSITY"):
        env.pop(k, None)  # the CLI must quieten the libraries itself
    res = subprocess.run(
        [sys.executable, "-m", "omniforge", *args], capture_output=True, text=True, env=env, timeout=900
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def chatter(res: subprocess.CompletedProcess) -> list[str]:
    """Every output line but the rows of the result tables."""
    return [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip() and not ln.startswith("|")]


def assert_quiet(res: subprocess.CompletedProcess) -> None:
    out = res.stdout + res.stderr
    assert len(chatter(res)) <= SCREENFUL, out
    for needle in NOISE:
        assert needle not in out, f"{needle!r} in:\n{out}"


@pytest.fixture(scope="module")
def llama_folder(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain HF Llama folder with its tokenizer: the tiny default's LLM."""
    folder = tmp_path_factory.mktemp("llama") / "llm"
    shutil.copytree(default_model / "llm", folder)
    return folder


# ---- 1. quiet by default ----------------------------------------------------------------------


def test_export_of_the_default_is_quiet_and_verbose_shows_more(readme_export, tmp_path):
    model, _, quiet = readme_export  # the embedded model was written first, as on a fresh machine
    assert_quiet(quiet)
    assert "creating the embedded tiny NExT-GPT" in quiet.stderr
    assert "| vocoder |" in quiet.stdout and "build written to" in quiet.stdout
    home = model.parent
    stages = ("--stages", "token_embedding,image_encoder")  # two quick stages: the flags, not the LLM
    few = omniforge("export", "--out", str(tmp_path / "q"), *stages, home=home)
    loud = omniforge("-v", "export", "--out", str(tmp_path / "v"), *stages, home=home)
    after = omniforge("export", "--out", str(tmp_path / "w"), *stages, "--verbose", home=home)
    assert len(chatter(loud)) > len(chatter(few)) and len(chatter(after)) > len(chatter(few))
    assert "[2/2] image_encoder:" in loud.stderr and "[2/2] image_encoder:" not in few.stderr


def test_build_is_quiet_and_verbose_lets_library_logs_through(llama_folder, tmp_path):
    quiet = omniforge("build", str(llama_folder), "--out", str(tmp_path / "b"), home=tmp_path / "h1")
    assert_quiet(quiet)
    for step in ("export: running", "optimize: running", "build written to"):
        assert step in quiet.stderr
    loud = omniforge("build", str(llama_folder), "--out", str(tmp_path / "v"), "-v", home=tmp_path / "h2")
    assert "INFO" in loud.stderr and len(chatter(loud)) > len(chatter(quiet))


# ---- 2. clean generated text, signal tokens as events -----------------------------------------


def signal_prompt_config(rt: LlmRuntime) -> GenerationConfig:
    """A seed whose sampled output holds signal tokens and other special tokens."""
    special = {rt.tokenizer.token_id(t) for t in ("<pad>", "<s>", "<unk>")}
    for seed in range(40):
        cfg = GenerationConfig(max_new_tokens=64, temperature=1.0, seed=seed, stop_token_ids=())
        ids = rt.generate("Make a picture of a harbour", cfg).token_ids
        if set(ids) & rt.signal_ids.keys() and set(ids) & special:
            return cfg
    raise AssertionError("no seed in 40 produced signal and special tokens")


def test_generated_text_has_no_special_tokens_and_signals_are_events(default_build):
    rt = LlmRuntime(default_build, num_slots=1)
    cfg = signal_prompt_config(rt)
    res = rt.generate("Make a picture of a harbour", cfg)
    for needle in HIDDEN:
        assert needle not in res.text
    raw = rt.tokenizer.decode(res.token_ids)  # what the text showed before
    assert any(n in raw for n in ("[IMG", "[VID", "[AUD")) and any(
        n in raw for n in ("<pad>", "<s>", "<unk>")
    )
    expected = [
        (rt.signal_ids[t], rt.tokenizer.token(t), i)
        for i, t in enumerate(res.token_ids)
        if t in rt.signal_ids
    ]
    assert expected and [(e.modality, e.token, e.index) for e in res.signals] == expected
    assert all(e.token.startswith(("[IMG", "[VID", "[AUD")) for e in res.signals)


def test_streamed_pieces_concatenate_to_the_final_text(default_build):
    rt = LlmRuntime(default_build, num_slots=1)
    for seed in range(12):
        cfg = GenerationConfig(max_new_tokens=48, temperature=1.0, seed=seed)
        pieces = list(rt.stream("Make a picture of a harbour", cfg))
        assert "".join(pieces) == rt.generate("Make a picture of a harbour", cfg).text
        assert not any(n in p for p in pieces for n in HIDDEN)


def test_pipeline_and_run_report_signals_not_tokens(default_build, tmp_path):
    pipe = Pipeline(default_build, num_slots=1)
    gen = GenerationConfig(max_new_tokens=64)  # greedy: the tiny model asks for audio
    pieces: list[str] = []
    res = pipe.run(
        "Make a picture of a harbour",
        generation=gen,
        diffusion=DiffusionConfig(steps=1),
        on_text=pieces.append,
    )
    assert res.signals == res.generation.signals and res.signals
    assert "".join(pieces) == res.text and not any(n in res.text for n in HIDDEN)
    modalities = sorted({e.modality for e in res.signals})
    cli = omniforge(
        "run", str(default_build), "-p", "Make a picture of a harbour", "--steps", "1",
        "--out", str(tmp_path / "out"), home=tmp_path / "home",
    )  # fmt: skip
    # text-mode capture reads "\r" (a byte the tiny model may generate) as a newline
    assert cli.stdout.strip() == res.text.replace("\r\n", "\n").replace("\r", "\n").strip()
    for m in modalities:
        count = sum(e.modality == m for e in res.signals)
        assert any(ln.startswith(f"{m}: {count} signal token") for ln in cli.stderr.splitlines()), cli.stderr


# ---- 3. a Llama folder without tokenizer.json is refused at export ----------------------------


def test_llama_folder_without_tokenizer_json_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    folder = tmp_path / "user-llama"
    LlamaForCausalLM(conf).save_pretrained(folder)
    for cmd in ("export", "build"):
        res = subprocess.run(
            [sys.executable, "-m", "omniforge", cmd, str(folder), "--out", str(tmp_path / cmd)],
            capture_output=True,
            text=True,
            env={**os.environ, "OMNIFORGE_HOME": str(tmp_path / "home")},
        )
        assert res.returncode == 1
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("omniforge: error:")]
        assert len(errors) == 1 and "has no tokenizer.json" in errors[0], res.stderr
        assert "Traceback" not in res.stderr and not (tmp_path / cmd).exists()
    (folder / "tokenizer.model").write_bytes(b"\0")
    res = subprocess.run(
        [sys.executable, "-m", "omniforge", "export", str(folder), "--out", str(tmp_path / "b")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1 and "tokenizer.model" in res.stderr


# ---- 4. parity near the full context ----------------------------------------------------------


def test_llm_parity_reaches_the_full_context(default_build):
    from omniforge.pipeline.manifest import load_manifest

    parity = json.loads((default_build / "parity.json").read_text())
    llm = next(s for s in parity if s["stage"] == "llm")
    max_context = load_manifest(default_build).pipeline.stage("llm").llm.max_context
    assert max_context >= 128
    long = [p for p in llm["parity"] if p["point"].get("past", 0) + p["point"]["seq"] >= 0.9 * max_context]
    assert long and all(p["passed"] for p in long)


# ---- 5. end-to-end prompts held out from calibration -------------------------------------------


def test_end_to_end_prompts_are_held_out_from_calibration(default_build):
    held = heldout_lines(media=True) + heldout_lines(media=False)
    assert held and not set(held) & set(calibration_lines())
    assert not set(held) & set(CalibrationInputs.default(count=1000).prompts)
    # the LLM calibration rows are the calibration text's ids, and no held-out line's ids occur in them
    rt = LlmRuntime(default_build, num_slots=1)
    ids = np.asarray(rt.tokenizer.encode("\n".join(calibration_lines())), np.int64)
    rows = calibration_rows(default_build, count=4, length=32)
    np.testing.assert_array_equal(np.concatenate(rows), rt.embed_ids(ids[: 4 * 32]))
    stream = ids.tolist()
    for line in held:
        core = rt.tokenizer.encode(line)[1:-1]  # inner ids: independent of the neighbouring lines
        assert not any(stream[i : i + len(core)] == core for i in range(len(stream) - len(core) + 1)), line


def test_text_only_build_is_scored_on_held_out_text(llama_folder, tmp_path):
    from omniforge.export.exporter import export_pipeline

    export_pipeline(llama_folder, tmp_path / "b", log=lambda _m: None)
    result = end_to_end_accuracy(tmp_path / "b", tmp_path / "b", tokens=4)
    assert [r["prompt"] for r in result["prompts"]] == heldout_lines(media=False)[:3]
    assert set(result["worst"]) == {"token_agreement"} and result["worst"]["token_agreement"] == 1.0
