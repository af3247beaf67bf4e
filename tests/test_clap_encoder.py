# ruff: noqa: F811  (the native fixtures are imported from tests/test_native.py by name)
"""CLAP's audio tower as the audio encoder: the numpy front end against transformers'
``ClapFeatureExtractor`` (both routes, every padding, short and long clips), the stage against
transformers' forward, unsupported options refused, and a model folder with a CLAP encoder and its
own input projector exported, built at INT8 and run by the torch-free runtime."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch

from omniforge.model.families import clap_audio_config, write_clap
from omniforge.runtime.clap_media import ClapFrontEnd, features, fusion_starts
from tests.encoder_variants import export_with_encoder
from tests.test_native import native_build, native_cache, ort_headers, ort_library  # noqa: F401  (fixtures)

SR = 48000
WINDOW_S = 2  # a 2 s window: 201 log-mel frames


def _clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    return (rng.standard_normal(n) * 0.1 + 0.3 * np.sin(np.arange(n) * 0.01)).astype(np.float32)


@pytest.mark.parametrize("padding", ["repeatpad", "repeat", "pad"])
@pytest.mark.parametrize("seconds", [0.37, 2.0, 2.004, 2.01, 5.3])
def test_fusion_front_end_matches_clap_feature_extractor(padding, seconds, monkeypatch):
    """The extractor's crops, drawn at random, pinned to the middle start of each third (the
    deterministic choice the runtime makes); everything else is the extractor's own code."""
    from transformers import ClapFeatureExtractor

    x = _clip(seconds, int(seconds * 100))
    fe = ClapFrontEnd(max_length_s=WINDOW_S, padding=padding, f_min=50.0, truncation="fusion")
    ext = ClapFeatureExtractor(max_length_s=WINDOW_S, padding=padding, frequency_min=50, truncation="fusion")
    monkeypatch.setattr(np.random, "choice", lambda r: r[len(r) // 2])
    want = ext(x, sampling_rate=SR, return_tensors="np")
    got = features(x, fe)
    assert got.shape == (4, 201, 64) and got.dtype == np.float32
    np.testing.assert_allclose(got, want.input_features[0], atol=1e-4)
    assert bool(want.is_longer[0][0])  # a lone clip always takes the fusion branch


@pytest.mark.parametrize("padding", ["repeatpad", "repeat", "pad"])
@pytest.mark.parametrize("seconds", [0.37, 2.0, 5.3])
def test_rand_trunc_front_end_matches_clap_feature_extractor(padding, seconds):
    """Shorter clips are padded exactly as the extractor pads them; a longer clip is its first
    window (the extractor cuts one at a random start: fed that window, it computes the same)."""
    from transformers import ClapFeatureExtractor

    x = _clip(seconds, 7)
    fe = ClapFrontEnd(
        max_length_s=WINDOW_S, padding=padding, n_mels=48, f_max=12000.0, truncation="rand_trunc"
    )
    ext = ClapFeatureExtractor(
        feature_size=48, max_length_s=WINDOW_S, padding=padding, frequency_max=12000, truncation="rand_trunc"
    )
    want = ext(x[: fe.max_samples], sampling_rate=SR, return_tensors="np").input_features[0]
    got = features(x, fe)
    assert got.shape == (1, 201, 48)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_fusion_crops_are_the_middle_of_each_third():
    assert fusion_starts(531, 201) == [55, 166, 276]  # 331 starts: 111 + 110 + 110
    assert fusion_starts(202, 201) == [0, 1, 0]  # two possible starts: an empty third starts at 0


@pytest.mark.parametrize("fusion", [True, False])
def test_stage_is_transformers_forward(tmp_path, fusion):
    from transformers import ClapAudioModelWithProjection

    from omniforge.model.clap_encoder import load_clap_encoder

    model = write_clap(tmp_path / "c", fusion)
    stage = load_clap_encoder(tmp_path / "c")
    assert isinstance(model, ClapAudioModelWithProjection)
    x = torch.rand(3, 4 if fusion else 1, 201, 64) * -80
    longer = torch.ones(3, 1, dtype=torch.bool) if fusion else None
    with torch.no_grad():
        want = model(input_features=x, is_longer=longer).audio_embeds
        got = stage(x)
    assert got.shape == (3, 24)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_full_clap_model_folder_reads_its_audio_tower(tmp_path):
    from omniforge.model.clap_encoder import load_clap_encoder

    model = write_clap(tmp_path / "full", full=True)
    x = torch.rand(2, 4, 201, 64) * -80
    longer = torch.ones(2, 1, dtype=torch.bool)
    with torch.no_grad():
        pooled = model.audio_model(input_features=x, is_longer=longer).pooler_output
        want = model.audio_projection(pooled)  # get_audio_features before its L2 normalisation
        got = load_clap_encoder(tmp_path / "full")(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"fusion_type": "channel_map"}, "fusion_type 'channel_map'"),
        ({"patch_embed_input_channels": 3}, "takes 3 input channels"),
        ({"num_mel_bins": 32, "spec_size": 128}, "makes 64 mel bins; its audio tower takes 32"),
        ({"spec_size": 64}, "takes at most 64"),
    ],
)
def test_unsupported_options_are_refused_in_one_sentence(tmp_path, change, says):
    from omniforge.errors import ConfigError
    from omniforge.pipeline.clap_folder import read_clap_folder

    folder = tmp_path / "c"
    folder.mkdir()
    cfg = {"model_type": "clap_audio_model", **clap_audio_config(True), **change}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=says) as err:
        read_clap_folder(folder)
    assert "\n" not in str(err.value)
    (folder / "config.json").write_text(
        json.dumps({"model_type": "clap_audio_model", **clap_audio_config(True)})
    )
    (folder / "preprocessor_config.json").write_text(json.dumps({"truncation": "random"}))
    with pytest.raises(ConfigError, match="truncation 'random'"):
        read_clap_folder(folder)


def _write_wav(path, x: np.ndarray, sr: int = SR) -> np.ndarray:
    """16-bit PCM; returns the samples as the file holds them (float, [-1, 1))."""
    q = np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(q.tobytes())
    return q / 32768.0


@pytest.fixture(scope="module")
def clap_builds(default_model, tmp_path_factory):
    """``get(fusion)``: the default model with a seeded CLAP audio tower (fused: a
    ``ClapAudioModelWithProjection`` folder; unfused: a full ``ClapModel`` folder) and its own
    input projector, exported once per module. Returns (build, projector, model folder, the
    transformers model, a scratch folder)."""
    made: dict[bool, tuple] = {}

    def get(fusion: bool) -> tuple:
        if fusion not in made:
            tmp = tmp_path_factory.mktemp("clap")
            hf = {}

            def place(model):
                hf["clap"] = write_clap(model / "clap", fusion=fusion, full=not fusion)
                return "clap"

            build, proj, model = export_with_encoder(default_model, tmp, "audio", place, 24)
            made[fusion] = (build, proj, model, hf["clap"], tmp)
        return made[fusion]

    return get


@pytest.fixture(scope="module")
def clap_build(clap_builds):
    return clap_builds(True)


@pytest.mark.parametrize("fusion", [True, False])
def test_export_parity_at_two_batch_sizes(clap_builds, fusion):
    build = clap_builds(fusion)[0]
    report = json.loads((build / "parity.json").read_text())
    rows = [r for r in report if r["stage"] == "audio_encoder"]
    assert rows and rows[0]["passed"]
    batches = {p["point"]["batch"] for p in rows[0]["parity"]}
    assert batches == {1, 2}
    assert all(p["max_abs"] <= 1e-4 for p in rows[0]["parity"])  # measured <= 1e-7
    fe = json.loads((build / "configs" / "audio_frontend.json").read_text())
    assert fe["kind"] == "clap" and fe["f_min"] == 50
    assert fe["truncation"] == ("fusion" if fusion else "rand_trunc")


@pytest.mark.parametrize(("fusion", "seconds"), [(True, 1.3), (True, 4.7), (False, 1.3), (False, 4.7)])
def test_pipeline_rows_equal_torch(clap_builds, fusion, seconds, monkeypatch):
    """A short (padded) and a long clip (fused: shrunk + crops; unfused: its first window) through
    the Pipeline against the extractor (crops pinned as the runtime picks them) -> transformers'
    forward -> the projector."""
    from transformers import ClapFeatureExtractor

    from omniforge.runtime.pipeline import Pipeline

    build, proj, model, clap, tmp = clap_builds(fusion)
    hidden = json.loads((model / "llm" / "config.json").read_text())["hidden_size"]
    held = _write_wav(tmp / f"a{seconds}.wav", _clip(seconds, 11) * 2)
    pipe = Pipeline(build)
    rows = pipe.encode_audio(tmp / f"a{seconds}.wav")
    ext = ClapFeatureExtractor.from_pretrained(model / "clap")
    monkeypatch.setattr(np.random, "choice", lambda r: r[len(r) // 2])
    feats = ext(held[: WINDOW_S * SR] if not fusion else held, sampling_rate=SR, return_tensors="pt")
    x = feats.input_features.float()
    with torch.no_grad():
        if fusion:
            emb = clap(input_features=x, is_longer=feats.is_longer).audio_embeds
        else:  # a full ClapModel: its audio tower and projection
            emb = clap.audio_projection(clap.audio_model(input_features=x).pooler_output)
        want = proj(emb[:, None])[0].numpy()
    assert rows.shape == (1, hidden)
    np.testing.assert_allclose(rows, want, atol=1e-4)  # measured <= 3e-8
    result = pipe.run("describe <audio>", audio=tmp / f"a{seconds}.wav")
    assert result.generation.prompt_tokens >= 2


@pytest.mark.parametrize("fusion", [True, False])
def test_native_front_end_and_encoder_equal_the_python_runtime(
    clap_builds, fusion, native_build, ort_library
):
    """``of_encoder_run_audio`` on a long clip's samples (fused: shrunk + crops; unfused: its first
    window; resampled from 44.1 kHz): the CLAP front end in C++, the encoder and the projector."""
    from omniforge.runtime import media as M
    from omniforge.runtime.pipeline import Pipeline
    from tests.test_native_media import Native

    build, _, _, _, tmp = clap_builds(fusion)
    wav = tmp / "native.wav"
    t = np.arange(int(44100 * 4.7)) / 44100
    M.write_wav(
        wav, (0.3 * np.sin(2 * np.pi * 523 * t) * np.sin(2 * np.pi * 0.5 * t)).astype(np.float32), 44100
    )
    samples, sr = M.load_wav(wav, 600.0, None)
    native = Native(native_build, build, ort_library)
    try:
        status, rows = native.encode_audio(native.open("encoder", "audio"), samples, sr)
        assert status == 0, rows
        np.testing.assert_allclose(rows, Pipeline(build).encode_audio(wav), rtol=0, atol=1e-5)
    finally:
        native.close()


def test_int8_build_runs_with_accuracy_report(clap_build, tmp_path):
    """``omniforge build --precision int8`` of a model folder with the LLM, the CLAP audio tower
    and its projector: the encoder is quantized, the accuracy report lists it, and the build
    answers an audio request."""
    from omniforge.runtime.pipeline import Pipeline

    model = tmp_path / "model"
    model.mkdir()
    for part in ("llm", "clap", "audio_projector"):
        shutil.copytree(clap_build[2] / part, model / part)
    desc = {
        "format": "omniforge-nextgpt",
        "format_version": 1,
        "llm": "llm",
        "encoders": {"audio": "clap"},
        "input_projectors": {"audio": "audio_projector"},
        "placeholders": {"audio": "<audio>"},
    }
    (model / "nextgpt.json").write_text(json.dumps(desc))
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "prompts.txt").write_text("what do you hear\ndescribe the sound\n")
    _write_wav(calib / "tone.wav", _clip(1.5, 5) * 2)
    out = tmp_path / "int8"
    args = ["--precision", "int8", "--cache", str(tmp_path / "cache"), "--calibration-data", str(calib)]
    args += ["--int8-max-fp32-layers", "0"]
    proc = subprocess.run(
        [sys.executable, "-m", "omniforge", "build", str(model), "--out", str(out), *args],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "audio_encoder | int8" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["audio_encoder"]["precision"] == "int8"
    report = {r["stage"]: r for r in json.loads((out / "quantize.json").read_text())}
    assert report["audio_encoder"]["metrics"]["cosine_min"] > 0.999  # measured 0.9999
    pipe = Pipeline(out)
    rows = pipe.encode_audio(calib / "tone.wav")
    assert rows.shape == (1, pipe.llm.embed_ids([1]).shape[1]) and np.isfinite(rows).all()
    assert pipe.run("what is <audio>", audio=calib / "tone.wav").generation.prompt_tokens >= 2
