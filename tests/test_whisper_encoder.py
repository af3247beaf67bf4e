"""Whisper as the audio encoder: the numpy log-mel front end against transformers'
``WhisperFeatureExtractor``, the encoder stage against transformers' forward, and a model folder
with a Whisper encoder and its own input projector exported and run by the torch-free runtime."""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest
import torch

from omniforge.model.families import write_whisper
from omniforge.runtime.whisper_media import log_mel
from tests.encoder_variants import export_with_encoder


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("seconds", [0.3, 7.5, 31.0])
def test_log_mel_matches_whisper_feature_extractor(n_mels, seconds):
    from transformers import WhisperFeatureExtractor

    rng = np.random.default_rng(int(seconds * 10) + n_mels)
    n = int(seconds * 16000)
    x = (rng.standard_normal(n) * 0.1 + 0.3 * np.sin(np.arange(n) * 0.03)).astype(np.float32)
    want = WhisperFeatureExtractor(feature_size=n_mels)(x, sampling_rate=16000, return_tensors="np")
    np.testing.assert_allclose(log_mel(x, n_mels), want.input_features[0], atol=1e-4)
    short = WhisperFeatureExtractor(feature_size=n_mels, chunk_length=10)(
        x, sampling_rate=16000, return_tensors="np"
    )
    np.testing.assert_allclose(log_mel(x, n_mels, window_s=10), short.input_features[0], atol=1e-4)


def test_encoder_stage_at_30s_is_transformers_forward(tmp_path):
    from omniforge.model.audio_encoders import WhisperEncoderStage

    model = write_whisper(tmp_path / "w")
    x = torch.randn(2, 80, 3000)
    with torch.no_grad():
        want = model.get_encoder()(x).last_hidden_state
        got = WhisperEncoderStage(model.get_encoder()).eval()(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_whisper_audio_encoder_end_to_end(default_model, tmp_path):
    from transformers import WhisperFeatureExtractor

    from omniforge.model.audio_encoders import WhisperEncoderStage
    from omniforge.runtime.pipeline import Pipeline

    made = {}

    def place(model):
        made["whisper"] = write_whisper(model / "whisper_encoder")
        return "whisper_encoder"

    build, proj, model = export_with_encoder(
        default_model, tmp_path, "audio", place, 32, frontend={"window_s": 2, "pool": 4}
    )
    whisper = made["whisper"]
    hidden = json.loads((model / "llm" / "config.json").read_text())["hidden_size"]

    x = (np.sin(np.arange(16000 * 3) * 0.05) * 9000).astype(np.int16)
    with wave.open(str(tmp_path / "a.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(x.tobytes())
    pipe = Pipeline(build)
    rows = pipe.encode_audio(tmp_path / "a.wav")
    feats = WhisperFeatureExtractor(chunk_length=2)(x / 32768.0, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        tokens = WhisperEncoderStage(whisper.get_encoder(), window_s=2, pool=4).eval()(feats.input_features)
        want = proj(tokens)[0].numpy()
    assert rows.shape == (25, hidden)  # 2 s -> 100 positions -> pooled by 4
    np.testing.assert_allclose(rows, want, atol=1e-4)
    result = pipe.run("describe <audio>", audio=tmp_path / "a.wav")
    assert result.generation.prompt_tokens > 25
