"""The default build: one ONNX file per stage, parity at fresh shapes, a verified manifest."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from omniforge.export.stages import reference_module
from omniforge.model.loader import load_component, load_llm
from omniforge.pipeline.manifest import load_manifest
from omniforge.pipeline.model_config import load_model_config

REQUIRED = [
    "token_embedding",
    "llm",
    "image_encoder",
    "audio_encoder",
    "input_projector",
    "image_output_projector",
    "video_output_projector",
    "audio_output_projector",
    "image_unet",
    "image_vae_decoder",
    "video_unet",
    "video_vae_decoder",
    "audio_unet",
    "audio_vae_decoder",
    "vocoder",
]
# a shape per stage that the export-time parity check did not use
FRESH = {
    "token_embedding": {"batch": 3, "seq": 5},
    "llm": {"batch": 3, "seq": 4, "past": 11},
    "image_encoder": {"batch": 3},
    "audio_encoder": {"batch": 5},
    "input_projector": {"batch": 2, "tokens": 3},
    "image_output_projector": {"batch": 3},
    "video_output_projector": {"batch": 2},
    "audio_output_projector": {"batch": 4},
    "image_unet": {"batch": 4},
    "image_vae_decoder": {"batch": 2},
    "video_unet": {"batch": 1, "frames": 6},
    "video_vae_decoder": {"batch": 3},
    "audio_unet": {"batch": 3},
    "audio_vae_decoder": {"batch": 2},
    "vocoder": {"batch": 1, "frames": 20},
}


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def test_build_has_one_valid_onnx_per_stage(default_build):
    m = load_manifest(default_build, verify=True)
    assert list(m.stages) == REQUIRED
    for name, sb in m.stages.items():
        model = onnx.load(str(default_build / sb.file))
        onnx.checker.check_model(model)
        stage = m.pipeline.stage(name)
        assert [i.name for i in model.graph.input] == stage.input_names
        assert [o.name for o in model.graph.output] == stage.output_names


def test_parity_report_covers_every_stage_at_two_or_more_shapes(default_build):
    report = json.loads((default_build / "parity.json").read_text())
    assert [r["stage"] for r in report] == REQUIRED
    for r in report:
        assert r["passed"], r["stage"]
        shapes = {json.dumps(p["point"], sort_keys=True) for p in r["parity"]}
        assert len(shapes) >= 2, r["stage"]
    assert "| llm |" in (default_build / "parity.md").read_text()


@pytest.mark.parametrize("name", REQUIRED)
def test_stage_matches_pytorch_at_a_fresh_shape(default_build, default_model, name):
    m = load_manifest(default_build, verify=False)
    stage = m.pipeline.stage(name)
    cfg = load_model_config(default_model)
    module = load_component(cfg, stage.component)  # the LLM's adapters are switched at run time
    feeds = stage.sample_inputs(FRESH[name], seed=99)
    with torch.no_grad():
        ref = reference_module(stage, module)(*[torch.from_numpy(feeds[n]) for n in stage.input_names])
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = session(default_build / m.stages[name].file).run(stage.output_names, feeds)
    for out, r, g in zip(stage.output_names, ref, got, strict=True):
        assert g.shape == tuple(r.shape), out
        scale = float(r.abs().max())
        assert np.abs(r.numpy() - g).max() <= 1e-4 + 1e-4 * scale, out


def test_llm_prefill_then_decode_equals_one_full_forward(default_build, default_model):
    """Feeding present back as past reproduces HF's full-sequence logits, token by token."""
    m = load_manifest(default_build, verify=False)
    spec = m.pipeline.stage("llm")
    g = spec.llm
    emb = session(default_build / m.stages["token_embedding"].file)
    llm = session(default_build / m.stages["llm"].file)
    ids = np.random.default_rng(0).integers(0, g.vocab_size, size=(1, 12)).astype(np.int64)
    hf = load_llm(load_model_config(default_model), adapter=None)  # adapters are switched at run time
    with torch.no_grad():
        full = hf(torch.from_numpy(ids)).logits.numpy()
    past = {
        f"past_key_values.{i}.{k}": np.zeros((1, g.num_kv_heads, 0, g.head_dim), np.float32)
        for i in range(g.num_layers)
        for k in ("key", "value")
    }
    logits = []
    for start, end in ((0, 8), (8, 9), (9, 10), (10, 12)):  # prefill, two decode steps, a chunk
        x = emb.run(None, {"input_ids": ids[:, start:end]})[0]
        outs = llm.run(
            None,
            {
                "inputs_embeds": x,
                "attention_mask": np.ones((1, end), np.int64),
                "position_ids": np.arange(start, end)[None],
                **past,
            },
        )
        logits.append(outs[0])
        past = dict(zip(past, outs[2:], strict=True))
        assert past["past_key_values.0.key"].shape[2] == end
    np.testing.assert_allclose(np.concatenate(logits, axis=1), full, atol=1e-4, rtol=1e-4)


def test_user_llama_folder_of_another_shape_exports(tmp_path):
    """A user's local HF Llama folder (other head counts, tied embeddings) goes through the same export."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from omniforge.export.exporter import export_pipeline

    torch.manual_seed(3)
    conf = LlamaConfig(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    folder = tmp_path / "user-llama"
    LlamaForCausalLM(conf).save_pretrained(folder)
    manifest, reports = export_pipeline(folder, tmp_path / "build", log=lambda _m: None)
    assert list(manifest.stages) == ["token_embedding", "llm"]
    g = manifest.pipeline.stage("llm").llm
    assert (g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim, g.max_context) == (3, 6, 2, 8, 128)
    assert all(r.passed for r in reports)
    assert len(manifest.pipeline.stage("llm").inputs) == 3 + 2 * 3
    load_manifest(tmp_path / "build", verify=True)


def test_missed_tolerance_fails_the_export_and_keeps_the_previous_build(default_model, tmp_path, monkeypatch):
    """A stage outside its tolerance stops the export with a clear error; the old build stays."""
    import dataclasses

    from omniforge.errors import ExportError
    from omniforge.export import exporter
    from omniforge.pipeline.spec import Tolerance

    out = tmp_path / "build"
    exporter.export_pipeline(
        default_model, out, exporter.ExportOptions(stages=["input_projector"]), log=lambda _m: None
    )
    before = (out / "manifest.json").read_bytes()

    real_describe = exporter.describe

    def strict(cfg):  # demand bit-exactness from the image encoder, which it cannot meet
        spec = real_describe(cfg)
        stages = tuple(
            dataclasses.replace(s, tolerance=Tolerance(0.0, 0.0)) if s.name == "image_encoder" else s
            for s in spec.stages
        )
        return dataclasses.replace(spec, stages=stages)

    monkeypatch.setattr(exporter, "describe", strict)
    with pytest.raises(ExportError, match="image_encoder max abs"):
        exporter.export_pipeline(
            default_model, out, exporter.ExportOptions(stages=["image_encoder"]), log=lambda _m: None
        )
    assert (out / "manifest.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["build"]
    load_manifest(out)
