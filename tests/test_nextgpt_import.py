"""NExT-GPT's release files in: ``omniforge import nextgpt`` on checkpoints fabricated in the release's
exact formats, then build and run the whole any-to-any chain. Every imported stage is compared with
an independent torch forward written from the checkpoint's own tensors, and NExT-GPT's protocol
(prompt layout, signal-token positions) with a torch reference of the same request."""

from __future__ import annotations

import json
import subprocess
import sys
import wave
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from omniforge.pipeline.manifest import load_manifest
from tests.release_format.delta import make_delta, make_malicious_pickle, reference_textfc
from tests.release_format.imagebind import make_imagebind_pth, reference_audio, reference_vision
from tests.release_format.vicuna import make_vicuna
from tests.test_native import native_build, native_cache, ort_headers, ort_library  # noqa: F401  (fixtures)

HEADS = 4  # of the fabricated ImageBind trunks (ImageBind-huge: 16 / 12)
ALPHA = 32.0  # NExT-GPT's released LoRA alpha, the importer's default
P = "llama_model.base_model.model."
PROMPT = "show me a small bird"


def omniforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omniforge", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def release(tmp_path_factory, default_model):
    root = tmp_path_factory.mktemp("release")
    make_vicuna(root / "vicuna")
    ib = make_imagebind_pth(root / "imagebind_huge.pth")
    # the tiny default's decoders: SD/ZeroScope-style UNets cross-attending to 77 x 32, AudioLDM taking 16
    make_delta(
        root / "delta", root / "vicuna", image_out=(77, 32), video_out=(77, 32), audio_out=(1, 16), enc_dim=16
    )
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(root / "bird.png")
    frames = [Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)) for _ in range(30)]
    frames[0].save(root / "clip.gif", save_all=True, append_images=frames[1:], duration=100)  # 3 s at 10 fps
    with wave.open(str(root / "chirp.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(22050)
        w.writeframes((np.sin(np.arange(22050 * 3) * 0.05) * 9000).astype(np.int16).tobytes())
    delta = torch.load(root / "delta" / "pytorch_model.pt", weights_only=True)
    return SimpleNamespace(root=root, ib=ib, delta=delta, default=default_model)


def import_args(release, out: Path, **over: str) -> list[str]:
    r, d = release.root, release.default
    args = {
        "--vicuna": str(r / "vicuna"),
        "--imagebind": str(r / "imagebind_huge.pth"),
        "--delta": str(r / "delta"),
        "--image-decoder": str(d / "image_decoder"),
        "--video-decoder": str(d / "video_decoder"),
        "--audio-decoder": str(d / "audio_decoder"),
        "--vision-heads": str(HEADS),
        "--audio-heads": str(HEADS),
        "--out": str(out),
        **over,
    }
    return ["import", "nextgpt", *[x for kv in args.items() for x in kv]]


@pytest.fixture(scope="module")
def imported(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "nextgpt"
    proc = omniforge(*import_args(release, out))
    assert proc.returncode == 0, proc.stderr
    return SimpleNamespace(folder=out, stdout=proc.stdout)


@pytest.fixture(scope="module")
def built(imported, tmp_path_factory, default_builds):
    root = tmp_path_factory.mktemp("built")
    out = root / "build"
    cache = default_builds[1]  # never the user's $OMNIFORGE_HOME; its decoders were optimized there
    proc = omniforge("build", str(imported.folder), "--out", str(out), "--cache", str(cache))
    assert proc.returncode == 0, proc.stderr
    return out


def test_import_writes_a_safetensors_model_folder(imported):
    out, folder = imported.stdout, imported.folder
    for row in (
        "| llm | LlamaForCausalLM |",
        "LoRA r=4 alpha=32",
        "| imagebind/vision |",
        "| imagebind/audio |",
    ):
        assert row in out
    assert out.count("TextFcLayer transformer") == 3
    assert "added tokens: 38 ({'<Img>'}=480, {'</Img>'}=481, [IMG0]=482" in out
    assert "<Img> -> \"{'<Img>'}\"" in out  # the release's tags are the set literals its code produced
    desc = json.loads((folder / "nextgpt.json").read_text())
    assert {m: len(t) for m, t in desc["signal_tokens"].items()} == {"image": 4, "video": 24, "audio": 8}
    assert desc["merge_adapter"] == "nextgpt" and desc["protocol"]["media_open"] == "<Img>"
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pt", ".pth", ".bin", ".pkl")]
    assert {p.parent.name for p in files if p.suffix == ".safetensors"} >= {
        "llm",
        "nextgpt",
        "imagebind",
        "input_projector",
        "image",
        "video",
        "audio",
    }


@pytest.mark.parametrize("which", ["--imagebind", "--delta"])
def test_a_pickle_that_runs_code_is_refused(release, tmp_path, which):
    marker = tmp_path / "ran"
    if which == "--delta":
        (tmp_path / "delta").mkdir()
        evil = make_malicious_pickle(tmp_path / "delta" / "pytorch_model.pt", marker)
        for f in (release.root / "delta").iterdir():
            if f.name != "pytorch_model.pt":
                (tmp_path / "delta" / f.name).write_bytes(f.read_bytes())
        evil = evil.parent
    else:
        evil = make_malicious_pickle(tmp_path / "imagebind_huge.pth", marker)
    out = tmp_path / "model"
    proc = omniforge(*import_args(release, out, **{which: str(evil)}))
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]  # after the progress lines: one error line
    assert last.startswith("omniforge: error:") and "refused" in last and "Traceback" not in proc.stderr
    assert not marker.exists() and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model")]  # no temporary left


def _session(build: Path, stage: str) -> ort.InferenceSession:
    m = load_manifest(build)
    return ort.InferenceSession(
        str(build / m.stages[stage].canonical.file), providers=["CPUExecutionProvider"]
    )


def _close(a, b, atol=1e-4):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.abs(a - b).max() <= atol * max(1.0, np.abs(b).max()), np.abs(a - b).max()


def reference_llm(release) -> torch.nn.Module:
    """Vicuna from its .bin shards, the delta's embeddings and head, the LoRA merged by hand."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vicuna, d = release.root / "vicuna", release.delta
    state = {}
    for shard in sorted(vicuna.glob("pytorch_model-*.bin")):
        state.update(torch.load(shard, weights_only=True))
    state = {k: v.float() for k, v in state.items() if "rotary_emb" not in k}
    state["model.embed_tokens.weight"] = d[P + "model.embed_tokens.weight"].float()
    state["lm_head.weight"] = d[P + "lm_head.weight"].float()
    for key in [k for k in d if k.endswith("lora_A.default.weight")]:
        a, b = d[key].float(), d[key.replace("lora_A", "lora_B")].float()
        base = key.removeprefix(P).replace(".lora_A.default", "")
        state[base] = state[base] + (ALPHA / a.shape[0]) * (b @ a)
    cfg = LlamaConfig.from_pretrained(vicuna)
    cfg.vocab_size, cfg.pad_token_id = state["lm_head.weight"].shape[0], None
    model = LlamaForCausalLM(cfg).eval()
    model.load_state_dict(state)
    return model


def test_imported_stages_match_independent_references(release, built):
    g = torch.Generator().manual_seed(0)
    clips = torch.randn(3, 3, 2, 224, 224, generator=g)
    got = _session(built, "image_encoder").run(None, {"pixel_values": clips.numpy()})[0]
    _close(got, reference_vision(release.ib, clips, HEADS))
    fbank = torch.randn(3, 1, 128, 204, generator=g)
    got = _session(built, "audio_encoder").run(None, {"fbank": fbank.numpy()})[0]
    _close(got, reference_audio(release.ib, fbank, HEADS))

    d = release.delta
    feats = torch.randn(1, 2, 16, generator=g)
    got = _session(built, "input_projector").run(None, {"features": feats.numpy()})[0]
    _close(
        got, torch.nn.functional.linear(feats, d["llama_proj.weight"].float(), d["llama_proj.bias"].float())
    )

    for m, prefix, n in (
        ("image", "gen_text_hidden_fcs.0.", 4),
        ("video", "gen_text_hidden_fcs_video.0.", 24),
        ("audio", "gen_text_hidden_fcs_audio.0.", 8),
    ):
        state = {k.removeprefix(prefix): v.float() for k, v in d.items() if k.startswith(prefix)}
        x, e = torch.randn(2, n, 64, generator=g), torch.randn(2, n, 64, generator=g) * 0.05
        got = _session(built, f"{m}_output_projector").run(
            None, {"hidden_states": x.numpy(), "signal_embeds": e.numpy()}
        )[0]
        _close(got, reference_textfc(state, x, e, heads=4))

    rows = torch.randn(1, 9, 64, generator=g) * 0.05
    llm = _session(built, "llm")
    feeds = {
        "inputs_embeds": rows.numpy(),
        "attention_mask": np.ones((1, 9), np.int64),
        "position_ids": np.arange(9)[None],
    }
    for i in llm.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    logits, hidden = llm.run(["logits", "hidden_states"], feeds)
    with torch.no_grad():
        ref = reference_llm(release)(inputs_embeds=rows, output_hidden_states=True)
    _close(logits, ref.logits)
    _close(hidden, ref.hidden_states[-1])


def test_run_any_to_any_from_the_cli(release, built, tmp_path):
    r = release.root
    for media, force, expect in (
        (["--image", str(r / "bird.png")], "image", "image_0.png"),
        (["--audio", str(r / "chirp.wav")], "audio", "audio_0.wav"),
        (["--video", str(r / "clip.gif")], "video", "video_0.gif"),
    ):
        out = tmp_path / force
        proc = omniforge(
            "run",
            str(built),
            "--prompt",
            PROMPT,
            *media,
            "--force",
            force,
            "--steps",
            "2",
            "--max-new-tokens",
            "4",
            "--out",
            str(out),
        )
        assert proc.returncode == 0, proc.stderr
        assert (out / expect).is_file(), sorted(p.name for p in out.iterdir())


def _expected_rows(release, image_row: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """NExT-GPT's layout of one image request, from the delta's SentencePiece model and embedding."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(release.root / "delta" / "tokenizer.model"))
    emb = release.delta[P + "model.embed_tokens.weight"].float()
    segments = [
        [1, *sp.encode("### Human:")],
        sp.encode("<Img>"),
        None,
        sp.encode("</Img>"),
        [1, *sp.encode(PROMPT + "\n### Assistant:")],
    ]
    parts = [image_row if s is None else emb[s] for s in segments]
    return torch.cat(parts), [t for s in segments if s is not None for t in s]


def test_protocol_layout_and_signal_positions(release, built, monkeypatch):
    """The rows fed to the LLM follow NExT-GPT's generation layout, and the projector reads the hidden
    states that predicted each signal token (teacher-forced after the text, and when generated)."""
    from omniforge.runtime import llm as llm_module
    from omniforge.runtime.imagebind_media import image_clip
    from omniforge.runtime.media import load_image
    from omniforge.runtime.pipeline import DiffusionConfig, Pipeline
    from omniforge.runtime.sampling import GenerationConfig

    d = release.delta
    clip = torch.from_numpy(image_clip(load_image(release.root / "bird.png")))[None]
    image_row = torch.nn.functional.linear(
        reference_vision(release.ib, clip, HEADS),
        d["llama_proj.weight"].float(),
        d["llama_proj.bias"].float(),
    )
    rows, _ = _expected_rows(release, image_row)
    emb = d[P + "model.embed_tokens.weight"].float()
    signal = [482, 483, 484, 485]  # [IMG0..3] after the 480-piece vocabulary and the two tags
    ref = reference_llm(release)

    def predicting(fed_ids: list[int]) -> torch.Tensor:
        seq = torch.cat([rows, emb[fed_ids]]) if fed_ids else rows
        with torch.no_grad():
            return ref(inputs_embeds=seq[None], output_hidden_states=True).hidden_states[-1][0, -4:]

    pipe = Pipeline(built, num_slots=1)
    seen: dict[str, dict] = {}
    pipe.recorder = lambda stage, feeds: seen.setdefault(stage, {k: v.copy() for k, v in feeds.items()})
    res = pipe.run(
        PROMPT,
        image=release.root / "bird.png",
        force=["image"],
        generation=GenerationConfig(max_new_tokens=3),
        diffusion=DiffusionConfig(steps=1),
    )
    _close(next(iter(seen["llm"].values())), rows, atol=1e-4)
    text_ids = [t for t in res.generation.token_ids if t != 2]
    _close(seen["image_output_projector"]["hidden_states"][0], predicting(text_ids + signal[:-1]))
    _close(seen["image_output_projector"]["signal_embeds"][0], emb[signal], atol=1e-6)

    script = iter([7, *signal, 9])  # the LLM "generates" a token, then [IMG0..3]
    monkeypatch.setattr(llm_module, "select_token", lambda *a, **k: next(script))
    seen.clear()
    res = pipe.run(
        PROMPT,
        image=release.root / "bird.png",
        generation=GenerationConfig(max_new_tokens=6),
        diffusion=DiffusionConfig(steps=1),
    )
    assert res.generation.token_ids == [7, *signal, 9] and len(res.images) == 1
    _close(seen["image_output_projector"]["hidden_states"][0], predicting([7, *signal[:-1]]))


def test_left_out_decoders_and_the_empty_prompt_embedding(release, tmp_path):
    """Only an image decoder, with a CLIP text encoder beside it: the model cannot produce video or
    audio, and guidance's unconditional input is that encoder on the empty prompt, as NExT-GPT's
    Stable Diffusion pipeline computes it when it is given ``prompt_embeds``."""
    import shutil

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from omniforge.pipeline.describe import describe
    from omniforge.pipeline.model_config import load_model_config

    sd = tmp_path / "sd"
    shutil.copytree(release.default / "image_decoder", sd)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "!</w>": 3}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")).save_pretrained(
        sd / "tokenizer"
    )
    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        vocab_size=4, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4
    )
    encoder = CLIPTextModel(cfg).eval()
    encoder.save_pretrained(sd / "text_encoder", safe_serialization=True)
    out = tmp_path / "model"
    args = [a for a in import_args(release, out, **{"--image-decoder": str(sd)})]
    for flag in ("--video-decoder", "--audio-decoder"):
        i = args.index(flag)
        del args[i : i + 2]
    proc = omniforge(*args)
    assert proc.returncode == 0, proc.stderr
    assert "no video decoder given" in proc.stdout and "no audio decoder given" in proc.stdout
    with torch.no_grad():
        ids = torch.tensor([[0] + [1] * 76])  # "" as CLIP's tokenizer pads it to 77
        want = encoder(ids)[0][0].numpy()
    np.testing.assert_allclose(np.load(out / "uncond" / "image.npy"), want, atol=1e-6)
    names = describe(load_model_config(out)).stage_names
    assert "image_unet" in names and not [n for n in names if n.startswith(("video_", "audio_o", "audio_u"))]


def test_imagebind_audio_reads_the_first_channel_of_the_whole_recording(built, tmp_path):
    """As ImageBind's loader: the first channel of a stereo file, clips placed over all of it (a
    40 s recording is longer than the runtime's default audio window)."""
    from omniforge.runtime.pipeline import Pipeline

    n = 16000 * 40
    left = (np.sin(np.arange(n) * 0.01) * 8000).astype(np.int16)
    right = (np.random.default_rng(0).standard_normal(n) * 8000).astype(np.int16)
    for name, ch, data in (("stereo", 2, np.stack([left, right], 1)), ("left", 1, left)):
        with wave.open(str(tmp_path / f"{name}.wav"), "wb") as w:
            w.setnchannels(ch)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes(data.tobytes())
    pipe = Pipeline(built)
    stereo, mono = pipe.encode_audio(tmp_path / "stereo.wav"), pipe.encode_audio(tmp_path / "left.wav")
    np.testing.assert_array_equal(stereo, mono)
    short = tmp_path / "short.wav"
    with wave.open(str(short), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(left[: 16000 * 30].tobytes())
    assert np.abs(pipe.encode_audio(short) - mono).max() > 1e-6  # the last 10 s do count


def test_native_encoders_and_conditioning_equal_the_python_runtime(release, built, native_build, ort_library):  # noqa: F811
    """The C API on the imported build: ImageBind's image clip, its video clips and audio clips
    (averaged over the batch) through the encoders and llama_proj, and the TextFcLayer conditioning,
    which also reads the signal tokens' input embeddings from the LLM."""
    import ctypes

    from omniforge.runtime import imagebind_media as IB
    from omniforge.runtime import media as M
    from omniforge.runtime.pipeline import IB_LONGEST_S, Pipeline
    from omniforge.runtime.video import read_picked_frames
    from tests.test_native_media import Native

    pipe = Pipeline(built)
    native = Native(native_build, built, ort_library)
    try:
        pic = np.asarray(Image.open(release.root / "bird.png").convert("RGB"))
        enc = native.open("encoder", "image")
        status, rows = native.encode(enc, IB.image_clip(pic)[None])
        assert status == 0, rows
        want = pipe.encode_image(release.root / "bird.png")
        np.testing.assert_allclose(rows, want, rtol=0, atol=1e-5)
        status, rows = native.encode_images(enc, pic)  # from pixels: ImageBind's image transform in C++
        assert status == 0, rows
        np.testing.assert_allclose(rows, want, rtol=0, atol=1e-5)

        at, frames = read_picked_frames(release.root / "clip.gif", IB.video_frame_indices)
        clips = IB.clips_from_frames([[np.asarray(frames[int(i)]) for i in row] for row in at])
        assert clips.shape[0] == 15  # 5 times x 3 crops
        vid = native.open("encoder", "video")
        status, rows = native.encode(vid, clips)
        assert status == 0, rows
        want = pipe.encode_video(release.root / "clip.gif")
        np.testing.assert_allclose(rows, want, rtol=0, atol=1e-5)
        with Image.open(release.root / "clip.gif") as im:  # the frames the C API picks: the same
            n_frames, ms = im.n_frames, float(im.info["duration"])
        assert native.video_frames(vid, n_frames, 1000.0 / ms) == (0, at.reshape(-1).tolist())
        picked = [np.ascontiguousarray(np.asarray(frames[int(i)])) for row in at for i in row]
        status, rows = native.encode_images(vid, *picked)  # the picked frames' pixels, clip after clip
        assert status == 0, rows
        np.testing.assert_allclose(rows, want, rtol=0, atol=1e-5)

        samples, sr = M.load_wav(release.root / "chirp.wav", IB_LONGEST_S, 0)
        fbank = IB.audio_clips(samples, sr)
        assert fbank.shape[0] == 3
        aud = native.open("encoder", "audio")
        status, rows = native.encode(aud, fbank)
        assert status == 0, rows
        want = pipe.encode_audio(release.root / "chirp.wav")
        np.testing.assert_allclose(rows, want, rtol=0, atol=1e-5)
        status, rows = native.encode_audio(aud, samples, sr)  # from samples: resampling, clips, fbank in C++
        assert status == 0, rows
        np.testing.assert_allclose(rows, want, rtol=0, atol=1e-5)

        llm, dec = native.llm(), native.open("decoder", "image")
        n, width = ctypes.c_size_t(), ctypes.c_size_t()
        assert native.lib.of_decoder_conditioning_input(dec, ctypes.byref(n), ctypes.byref(width)) == 0
        hidden = np.random.default_rng(2).standard_normal((n.value, width.value)).astype(np.float32)
        want = pipe.conditioning("image", hidden)
        status, why = native.conditioning(dec, None, hidden, want.size)
        assert status == 1 and why.endswith("reads the signal tokens' input embeddings: pass the LLM handle")
        status, cond = native.conditioning(dec, llm, hidden, want.size)
        assert status == 0, cond
        np.testing.assert_allclose(cond, want.reshape(-1), rtol=0, atol=1e-5)
    finally:
        native.close()

    # NExT-GPT's protocol: the prompt laid out around the media, its stop strings
    from dataclasses import replace

    from omniforge.runtime.native import NativeLlm
    from omniforge.runtime.sampling import GenerationConfig
    from tests.test_native_media import generate_media

    image, sound = pipe.encode_image(release.root / "bird.png"), pipe.encode_audio(release.root / "chirp.wav")
    nat = NativeLlm(built, 1, 0, threads=1, library=native_build / "libomniforge.so", needs_tokenizer=True)
    try:
        for media in ([("image", image)], [("audio", sound), ("image", image)], []):
            rows, ids = pipe.llm.prepare_protocol(PROMPT, media)
            for cfg in (
                GenerationConfig(max_new_tokens=12),
                GenerationConfig(max_new_tokens=12, temperature=0.9, seed=1),
            ):
                py_cfg = replace(cfg, stop_strings=pipe.llm.protocol.stop_strings)
                want = pipe.llm.generate_rows([rows], [ids], py_cfg, adapters=[None])[0]
                status, got = generate_media(nat, PROMPT, media, cfg)
                assert status == 0, got
                assert (got.token_ids, got.text) == (want.token_ids, want.text), media
    finally:
        nat.close()


def test_keep_lora_switches_the_delta_adapter_at_run_time(release, tmp_path):
    """--keep-lora: the delta's LoRA stays an adapter, and ``auto`` runs every request with it,
    as the merged import does."""
    from omniforge.export.exporter import ExportOptions, export_pipeline
    from omniforge.importers.nextgpt import ImportOptions, import_nextgpt
    from omniforge.pipeline.model_config import load_model_config
    from omniforge.runtime.llm import LlmRuntime
    from omniforge.runtime.sampling import GenerationConfig

    r = release.root
    folder = tmp_path / "kept"
    common = dict(vicuna=r / "vicuna", imagebind=r / "imagebind_huge.pth", delta=r / "delta")
    common.update(vision_heads=HEADS, audio_heads=HEADS, max_context=64)
    import_nextgpt(ImportOptions(out=folder, merge_lora=False, **common), log=lambda _m: None)
    cfg = load_model_config(folder)
    assert cfg.merge_adapter is None and cfg.adapter_auto == {"text": "nextgpt"}
    stages = ExportOptions(stages=["token_embedding", "llm"], parity=False)
    export_pipeline(folder, tmp_path / "switched", stages, log=lambda _m: None)
    merged = tmp_path / "merged-folder"
    import_nextgpt(ImportOptions(out=merged, **common), log=lambda _m: None)
    export_pipeline(merged, tmp_path / "merged", stages, log=lambda _m: None)
    switched = LlmRuntime(tmp_path / "switched", num_slots=1)
    assert switched.resolve_adapter("auto", ["image"]) == "nextgpt"
    ids = [1, 5, 9, 13, 2, 7]
    cfg16 = GenerationConfig(max_new_tokens=16, stop_token_ids=())
    a = switched.generate(ids, cfg16)
    b = LlmRuntime(tmp_path / "merged", num_slots=1).generate(ids, cfg16)
    assert a.adapter == "nextgpt" and a.token_ids == b.token_ids
