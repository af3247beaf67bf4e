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


def test_audio_latent_width_comes_from_the_vocoders_mel_bins(default_model, tmp_path):
    """AudioLDM's released UNet config gives ``sample_size: 128``, the latent frames alone; the
    latent's width is the vocoder's mel bins over the VAE scale (128 x 16 for 64 mel bins)."""
    import shutil

    from omniforge.errors import ConfigError

    folder = shutil.copytree(default_model, tmp_path / "m")
    unet_cfg = folder / "audio_decoder" / "unet" / "config.json"
    voc_cfg = folder / "audio_decoder" / "vocoder" / "config.json"
    base = describe(load_model_config(folder))
    frames, width = base.stage("audio_unet").inputs[0].shape[2:]
    n_mel = json.loads(voc_cfg.read_text())["model_in_dim"]
    scale = n_mel // width
    assert base.stage("vocoder").inputs[0].shape[2] == n_mel
    assert base.stage("audio_vae_decoder").outputs[0].shape[2:] == (frames * scale, n_mel)

    c = json.loads(unet_cfg.read_text())
    unet_cfg.write_text(json.dumps({**c, "sample_size": 2 * frames}))  # the released form: frames only
    spec = describe(load_model_config(folder))
    assert spec.stage("audio_unet").inputs[0].shape[2:] == (2 * frames, width)
    assert spec.stage("audio_vae_decoder").outputs[0].shape[2:] == (2 * frames * scale, n_mel)

    unet_cfg.write_text(json.dumps({**c, "sample_size": [frames, width + 1]}))
    with pytest.raises(ConfigError, match="vocoder model_in_dim"):
        describe(load_model_config(folder))
    unet_cfg.write_text(json.dumps(c))
    v = json.loads(voc_cfg.read_text())
    voc_cfg.write_text(json.dumps({**v, "model_in_dim": n_mel + 1}))
    with pytest.raises(ConfigError, match="multiple of the VAE scale"):
        describe(load_model_config(folder))
