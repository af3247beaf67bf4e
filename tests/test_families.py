"""``omniforge create-default --family``: each family swapped into the default model folder in its
library's format, exported with parity and run end to end from the CLI."""

import json
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch
from PIL import Image

FAMILY_STAGES = {  # the stages each folder's swapped parts need, and the text ones around them
    "qwen2,clap,blip2,cogvideox": "token_embedding,llm,image_encoder,image_input_projector,audio_encoder,"
    "audio_input_projector,video_output_projector,video_unet,video_vae_decoder",
    "qwen3,whisper": "token_embedding,llm,audio_encoder,audio_input_projector",
}


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "omniforge", *args], capture_output=True, text=True, cwd=cwd)


def write_wav(path, rate: int, seconds: float = 3.0) -> None:
    x = (np.sin(np.arange(int(rate * seconds)) * 0.05) * 9000).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(x.tobytes())


@pytest.fixture(scope="module")
def family_builds(tmp_path_factory):
    """{families: (model folder, build)} written and exported through the CLI."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for i, (names, stages) in enumerate(FAMILY_STAGES.items()):
        model, build = root / f"model{i}", root / f"build{i}"
        proc = cli("create-default", str(model), "--family", names)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"tiny NExT-GPT with {names.replace(',', ', ')} written to {model}"
        proc = cli("export", str(model), "--out", str(build), "--stages", stages)
        assert proc.returncode == 0, proc.stderr
        out[names] = model, build
    return out


def test_each_family_is_written_in_its_library_format(family_builds):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Blip2Model,
        ClapAudioModelWithProjection,
        WhisperModel,
    )

    from omniforge.model.tokenizer import PLACEHOLDERS, SIGNAL_TOKENS
    from omniforge.pipeline.model_config import load_model_config
    from omniforge.runtime.tokenizer import TextTokenizer

    model, _ = family_builds["qwen2,clap,blip2,cogvideox"]
    desc = json.loads((model / "nextgpt.json").read_text())
    assert desc["families"] == ["qwen2", "clap", "blip2", "cogvideox"]
    assert (
        "input_projector" not in desc and not (model / "input_projector").exists()
    )  # both encoders have their own
    assert set(desc["input_projectors"]) == {"image", "audio"}
    load_model_config(model)
    llm = AutoModelForCausalLM.from_pretrained(model / "llm")
    assert type(llm).__name__ == "Qwen2ForCausalLM" and llm.config.tie_word_embeddings
    assert llm.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    assert type(ClapAudioModelWithProjection.from_pretrained(model / "audio_encoder")).__name__.startswith(
        "Clap"
    )
    assert Blip2Model.from_pretrained(model / "image_encoder").config.num_query_tokens == 4
    transformer = CogVideoXTransformer3DModel.from_pretrained(model / "video_decoder" / "transformer")
    assert (transformer.config.max_text_seq_length, transformer.config.text_embed_dim) == (77, 32)
    AutoencoderKLCogVideoX.from_pretrained(model / "video_decoder" / "vae")

    # the Qwen tokenizer carries the signal tokens and placeholders as single tokens, read alike by
    # transformers and by the runtime, and ChatML's template
    theirs = AutoTokenizer.from_pretrained(model / "llm")
    ours = TextTokenizer(model / "llm" / "tokenizer.json", model / "llm" / "tokenizer_config.json")
    text = "Look at <image>, then [IMG0][IMG1] café 東京"
    assert ours.encode(text) == theirs(text)["input_ids"]
    for token in [*SIGNAL_TOKENS["image"], *SIGNAL_TOKENS["audio"], *PLACEHOLDERS.values()]:
        assert ours.encode(token) == [theirs.convert_tokens_to_ids(token)]
    chat = theirs.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ours.eos_token == "<|im_end|>"

    model, _ = family_builds["qwen3,whisper"]
    llm = AutoModelForCausalLM.from_pretrained(model / "llm")
    assert type(llm).__name__ == "Qwen3ForCausalLM" and not llm.config.tie_word_embeddings
    assert type(WhisperModel.from_pretrained(model / "audio_encoder")).__name__ == "WhisperModel"
    assert json.loads((model / "nextgpt.json").read_text())["audio_frontend"] == {"window_s": 2, "pool": 4}


def test_exported_with_parity_and_the_base_llm_equals_transformers(family_builds):
    from transformers import AutoModelForCausalLM

    from omniforge.runtime.llm import LlmRuntime
    from omniforge.runtime.sampling import GenerationConfig

    for names, (model, build) in family_builds.items():
        parity = json.loads((build / "parity.json").read_text())
        assert {r["stage"] for r in parity} == set(FAMILY_STAGES[names].split(","))
        assert all(r["passed"] for r in parity), names
        hf = AutoModelForCausalLM.from_pretrained(model / "llm", torch_dtype=torch.float32).eval()
        runtime = LlmRuntime(build)
        prompt = "A dog runs across the harbour"
        ids = runtime.tokenizer.encode(prompt)
        with torch.no_grad():
            want = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, min_new_tokens=16)
        got = runtime.generate(prompt, GenerationConfig(max_new_tokens=16, stop_token_ids=()), adapter="none")
        assert got.token_ids == want[0, len(ids) :].tolist(), names


def test_a_request_through_every_swapped_stage_from_the_cli(family_builds, tmp_path):
    from omniforge.runtime.pipeline import Pipeline

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(
        tmp_path / "p.png"
    )
    write_wav(tmp_path / "a48.wav", 48000)
    write_wav(tmp_path / "a16.wav", 16000)
    _, build = family_builds["qwen2,clap,blip2,cogvideox"]
    args = ["--image", str(tmp_path / "p.png"), "--audio", str(tmp_path / "a48.wav"), "--force", "video"]
    proc = cli("run", str(build), "-p", "See <image>, hear <audio>; film it", *args, "--steps", "2",
               "--max-new-tokens", "4", "--out", str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for stage in (
        "image_encoder",
        "image_input_projector",
        "audio_encoder",
        "audio_input_projector",
        "video_unet",
    ):
        assert f"{stage} " in proc.stderr  # the timings line
    with Image.open(tmp_path / "out" / "video_0.gif") as gif:
        assert gif.n_frames == 17 and gif.size == (32, 32)  # CogVideoX's (5 - 1) * 4 + 1 frames

    _, build = family_builds["qwen3,whisper"]
    proc = cli("run", str(build), "-p", "Hear <audio> and say", "--audio", str(tmp_path / "a16.wav"),
               "--max-new-tokens", "4")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "audio_encoder " in proc.stderr
    assert Pipeline(build).encode_audio(tmp_path / "a16.wav").shape == (
        25,
        64,
    )  # 2 s: 100 positions pooled by 4


@pytest.mark.parametrize(
    "families, says",
    [
        (["clap,whisper"], "'clap' and 'whisper' both fill the audio encoder; choose one"),
        (["qwen2", "blip2,qwen3"], "'qwen2' and 'qwen3' both fill the llm; choose one"),
        (["gpt2"], "unknown family 'gpt2'; choose from qwen2, qwen3, whisper, clap, blip2, cogvideox"),
    ],
)
def test_bad_families_are_refused_before_anything_is_written(tmp_path, families, says):
    proc = cli("create-default", str(tmp_path / "m"), *[a for f in families for a in ("--family", f)])
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"omniforge: error: {says}"
    assert list(tmp_path.iterdir()) == []


def test_the_pytorch_reference_of_bench_mirrors_a_blip2_and_qwen_model(family_builds, tmp_path):
    """``omniforge bench``'s eager reference runs the family folder's own encoder and projector; a
    folder without an image decoder gets a note instead."""
    from omniforge.bench.reference import run_reference

    model, _ = family_builds["qwen2,clap,blip2,cogvideox"]
    ref = run_reference(model, steps=1, new_tokens=2, threads=1)
    assert ref["total_ms"] > 0 and set(ref["stages_ms"]) >= {"image_encoder+input_projector", "llm"}
    desc = json.loads((model / "nextgpt.json").read_text())
    desc["decoders"].pop("image")
    desc["output_projectors"].pop("image")
    desc["signal_tokens"].pop("image")
    bare = tmp_path / "bare"
    bare.mkdir()
    for part in model.iterdir():
        if part.name != "nextgpt.json":
            (bare / part.name).symlink_to(part)
    (bare / "nextgpt.json").write_text(json.dumps(desc))
    assert run_reference(bare, steps=1, new_tokens=2, threads=1) == {
        "skipped": "the reference mirrors a CLIP or BLIP-2 image encoder and a Stable Diffusion decoder"
    }


def test_an_encoder_of_an_unsupported_family_is_refused_in_one_sentence(family_builds, tmp_path):
    """Not loaded into CLIP's class with its weights freshly initialised: refused, naming the supported types."""
    model, _ = family_builds["qwen3,whisper"]
    other = tmp_path / "model"
    other.mkdir()
    for part in model.iterdir():
        if part.name != "image_encoder":
            (other / part.name).symlink_to(part)
    (other / "image_encoder").mkdir()
    config = json.loads((model / "image_encoder" / "config.json").read_text())
    (other / "image_encoder" / "config.json").write_text(
        json.dumps({**config, "model_type": "siglip_vision_model"})
    )
    proc = cli("export", str(other), "--out", str(tmp_path / "build"))
    assert proc.returncode == 1 and not (tmp_path / "build").exists()
    assert proc.stderr.strip() == (
        f"omniforge: error: the encoder at {other / 'image_encoder'} is a 'siglip_vision_model' model; omniforge "
        "encodes media with 'clip_vision_model', 'clip', 'imagebind', 'whisper', 'blip-2', 'clap', "
        "'clap_audio_model' models"
    )


def test_int8_builds_of_the_swapped_encoders_with_accuracy_reports(family_builds, tmp_path, quick_quant):
    """Each family's encoder quantized to INT8 with its accuracy in the report, and the INT8 build's
    rows close to the FP32 build's."""
    from omniforge.calibration.quantize import quantize_build
    from omniforge.runtime.pipeline import Pipeline

    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(
        tmp_path / "p.png"
    )
    write_wav(tmp_path / "a48.wav", 48000, 1.5)
    write_wav(tmp_path / "a16.wav", 16000, 1.5)
    media = {
        "qwen2,clap,blip2,cogvideox": {"image": "p.png", "audio": "a48.wav"},
        "qwen3,whisper": {"audio": "a16.wav"},
    }
    for names, (_, build) in family_builds.items():
        stages = FAMILY_STAGES[names].split(",")
        keep = {
            s: "fp32" for s in stages if s.startswith("video_")
        }  # CogVideoX's INT8 is tests/test_cogvideox.py's
        out = tmp_path / f"int8-{len(stages)}"
        quantize_build(build, out, "int8", log=lambda _m: None, options=quick_quant, overrides=keep)
        report = {r["stage"]: r for r in json.loads((out / "quantize.json").read_text())}
        for modality, file in media[names].items():
            assert report[f"{modality}_encoder"]["precision"] == "int8"
            assert report[f"{modality}_encoder"]["metrics"]["cosine_min"] > 0.999  # measured 0.9998-1.0
            a, b = (getattr(Pipeline(x), f"encode_{modality}")(tmp_path / file) for x in (build, out))
            cosine = float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))
            assert a.shape == b.shape and cosine > 0.99, (names, modality, cosine)


def test_bench_runs_a_build_without_image_stages(family_builds, tmp_path):
    """``omniforge bench`` of the Whisper + Qwen3 build: its end-to-end request is the audio one."""
    _, build = family_builds["qwen3,whisper"]
    proc = cli(
        "bench", str(build), "--runs", "1", "--steps", "1", "--new-tokens", "2", "--out", str(tmp_path)
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "bench.json").read_text())
    assert "reference" not in data  # the eager reference runs the image request only
    (b,) = data["builds"]
    assert b["e2e"]["request"] == "audio + prompt in, text out"
    assert set(b["e2e"]["stages_ms"]) >= {"audio_encoder", "audio_input_projector", "llm"}
    assert b["llm"]["ttft_ms_prompt16_plus_audio"] > 0


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_int4_awq_and_gptq_on_a_qwen3_llm(family_builds, tmp_path, quick_quant, method):
    """Calibrated INT4 methods on Qwen3 (per-head q/k norms after the QKV projection): the method
    runs and its logits stay close to FP32 (measured cosine 0.933 AWQ, 0.922 GPTQ, 0.920 RTN)."""
    from dataclasses import replace

    from omniforge.calibration.quantize import quantize_build
    from omniforge.calibration.weight_only import WeightOnlyConfig
    from omniforge.runtime.llm import LlmRuntime
    from omniforge.runtime.sampling import GenerationConfig

    _, build = family_builds["qwen3,whisper"]
    keep = {"audio_encoder": "fp32", "audio_input_projector": "fp32"}
    opts = replace(quick_quant, end_to_end=False)
    out = tmp_path / "int4"
    quantize_build(
        build,
        out,
        "int4",
        WeightOnlyConfig(method=method),
        log=lambda _m: None,
        options=opts,
        overrides=keep,
    )
    llm = {r["stage"]: r for r in json.loads((out / "quantize.json").read_text())}["llm"]
    assert f"({method.upper()})" in llm["method"] and llm["metrics"]["logits_cosine"] > 0.9
    assert LlmRuntime(out).generate("A dog runs", GenerationConfig(max_new_tokens=4)).new_tokens == 4
