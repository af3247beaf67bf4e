"""The embedded default is built from the real library classes and loads through their loaders."""

import json

import pytest
import torch

from omniforge.model.loader import load_component, load_llm
from omniforge.model.tiny import create_default
from omniforge.model.tokenizer import PLACEHOLDERS, SIGNAL_TOKENS
from omniforge.pipeline.describe import describe
from omniforge.pipeline.manifest import sha256_file
from omniforge.pipeline.model_config import load_model_config


def test_default_is_deterministic(default_model, tmp_path):
    again = create_default(tmp_path / "again")
    for rel in (
        "llm/model.safetensors",
        "image_decoder/unet/diffusion_pytorch_model.safetensors",
        "lora/audio/adapter_model.safetensors",
        "llm/tokenizer.json",
    ):
        assert sha256_file(default_model / rel) == sha256_file(again / rel), rel


def test_tokenizer_has_signal_and_placeholder_tokens(default_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model / "llm")
    for token in [
        *SIGNAL_TOKENS["image"],
        *SIGNAL_TOKENS["video"],
        *SIGNAL_TOKENS["audio"],
        *PLACEHOLDERS.values(),
    ]:
        ids = tok(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, token
    assert len(SIGNAL_TOKENS["video"]) == 24 and len(SIGNAL_TOKENS["audio"]) == 8


def test_llm_uses_gqa_and_lora_merge_changes_weights(default_model):
    cfg = load_model_config(default_model)
    base = load_llm(cfg, adapter=None)
    merged = load_llm(cfg, adapter="image")
    c = base.config
    assert c.num_key_value_heads < c.num_attention_heads
    q0 = base.model.layers[0].self_attn.q_proj.weight
    q1 = merged.model.layers[0].self_attn.q_proj.weight
    assert (q0 - q1).abs().max() > 1e-4
    # the MLP is not targeted by the adapters
    torch.testing.assert_close(
        base.model.layers[0].mlp.up_proj.weight, merged.model.layers[0].mlp.up_proj.weight
    )


def test_every_component_loads_and_matches_its_description(default_model):
    cfg = load_model_config(default_model)
    spec = describe(cfg)
    names = set(spec.stage_names)
    required = {
        "image_encoder",
        "audio_encoder",
        "input_projector",
        "llm",
        "image_output_projector",
        "video_output_projector",
        "audio_output_projector",
        "image_unet",
        "video_unet",
        "audio_unet",
        "image_vae_decoder",
        "vocoder",
    }
    assert required <= names
    out = spec.stage("image_output_projector").outputs[0]
    assert out.shape[1:] == (77, 32)
    assert spec.stage("audio_output_projector").outputs[0].shape[1] == 1
    for stage in spec.stages:
        assert isinstance(load_component(cfg, stage.component, None), torch.nn.Module)


def test_bad_model_folders_give_clear_errors(tmp_path, default_model):
    from omniforge.errors import ConfigError, ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model_config(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="neither nextgpt.json"):
        load_model_config(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "nextgpt.json").write_text(json.dumps({"format": "omniforge-nextgpt", "format_version": 99}))
    with pytest.raises(ConfigError, match="not a version 1"):
        load_model_config(bad)
    (bad / "nextgpt.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model_config(bad)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelNotFoundError, match="'bert' model"):
        load_model_config(bert)
