"""Build the ``PipelineSpec`` of a model folder from its components' JSON configs (torch-free)."""

from __future__ import annotations

from pathlib import Path

from omniforge.errors import ConfigError
from omniforge.pipeline.cogvideox import check_conditioning, cogvideox_stages, is_cogvideox
from omniforge.pipeline.model_config import ModelConfig, read_json
from omniforge.pipeline.spec import (
    Dim,
    Edge,
    LlmGeometry,
    PipelineSpec,
    StageKind,
    StageSpec,
    TensorSpec,
    Tolerance,
)

F32, I64 = "float32", "int64"
BATCH = Dim("batch", 1, 1, 8)
CFG_BATCH = Dim("batch", 1, 2, 8)  # classifier-free guidance runs uncond + cond together
TIGHT = Tolerance(atol=1e-4, rtol=1e-4)


def llm_geometry(cfg: ModelConfig) -> LlmGeometry:
    c = read_json(cfg.llm / "config.json")
    heads = int(c["num_attention_heads"])
    return LlmGeometry(
        num_layers=int(c["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or c["hidden_size"] // heads),
        hidden_size=int(c["hidden_size"]),
        vocab_size=int(c["vocab_size"]),
        max_context=min(cfg.max_context, int(c.get("max_position_embeddings", cfg.max_context))),
    )


def llm_stages(cfg: ModelConfig) -> list[StageSpec]:
    g = llm_geometry(cfg)
    ctx = g.max_context
    batch = Dim("batch", 1, 1, 8)
    seq, past = Dim("seq", 1, 16, ctx), Dim("past", 0, 16, ctx - 1)
    total = Dim("total", 1, 32, ctx, sum_of=("past", "seq"))
    kv = ("batch", g.num_kv_heads, "past", g.head_dim)
    kv_out = ("batch", g.num_kv_heads, "total", g.head_dim)
    cache_in, cache_out = [], []
    for i in range(g.num_layers):
        for kind in ("key", "value"):
            cache_in.append(TensorSpec(f"past_key_values.{i}.{kind}", F32, kv))
            cache_out.append(TensorSpec(f"present.{i}.{kind}", F32, kv_out))
    embedding = StageSpec(
        name="token_embedding",
        kind=StageKind.EMBEDDING,
        component="llm",
        inputs=(TensorSpec("input_ids", I64, ("batch", "seq"), fill="randint", high=g.vocab_size),),
        outputs=(TensorSpec("inputs_embeds", F32, ("batch", "seq", g.hidden_size)),),
        dims=(batch, seq),
        tolerance=Tolerance(atol=1e-6, rtol=0.0),
    )
    llm = StageSpec(
        name="llm",
        kind=StageKind.LLM,
        component="llm",
        inputs=(
            TensorSpec("inputs_embeds", F32, ("batch", "seq", g.hidden_size), high=0.05),
            TensorSpec("attention_mask", I64, ("batch", "total"), fill="ones"),
            TensorSpec("position_ids", I64, ("batch", "seq"), fill="positions"),
            *cache_in,
        ),
        outputs=(
            TensorSpec("logits", F32, ("batch", "seq", g.vocab_size)),
            TensorSpec("hidden_states", F32, ("batch", "seq", g.hidden_size)),
            *cache_out,
        ),
        dims=(batch, seq, past, total),
        tolerance=TIGHT,
        check_points=llm_check_points(ctx),
        llm=g,
    )
    return [embedding, llm]


def llm_check_points(ctx: int) -> tuple[dict[str, int], ...]:
    """Prefill on an empty past, decode of one token on a past, a chunk on a past, and a chunk that
    fills the context (positions and cache lengths near the maximum are where long-context bugs show)."""
    points = (
        {"batch": 2, "seq": 7, "past": 0},
        {"batch": 1, "seq": 1, "past": 9},
        {"batch": 2, "seq": 3, "past": 5},
    )
    if ctx > 32:
        points += ({"batch": 1, "seq": 8, "past": ctx - 8},)
    return points


def describe(cfg: ModelConfig) -> PipelineSpec:
    """The full pipeline of a model folder: encoders, projectors, LLM, output projectors, decoders."""
    stages = llm_stages(cfg)
    g = stages[1].llm
    assert g is not None
    edges: list[Edge] = []
    tokens_out = 16
    rows: dict[str, int] = {}  # projector rows per item of each encoder
    for modality, path in cfg.encoders.items():
        stage, _ = encoder_stage(modality, path, cfg)
        stages.append(stage)
        out = stage.outputs[0].shape
        rows[modality] = int(out[1]) if len(out) == 3 else 1
        tokens_out = max(tokens_out, rows[modality])
        proj = input_projector_name(cfg, modality)
        edges.append(Edge(f"{stage.name}.embeds", f"{proj}.features", via="stack media tokens"))
        if modality == "image":
            frames = "ImageBind's 15 two-frame clips" if is_imagebind(path) else f"{cfg.video_frames} frames"
            edges.append(Edge(f"{stage.name}.embeds", f"{proj}.features", via=f"video: mean over {frames}"))
    if cfg.video_audio is not None:
        cfg.video_audio.check_rows(rows["image"], rows["audio"])
    projectors = {m: f for m, f in cfg.input_projectors.items()}
    if cfg.input_projector is not None:
        projectors[""] = cfg.input_projector
    for modality, folder in projectors.items():
        c = read_json(folder / "config.json")
        name = f"{modality}_input_projector" if modality else "input_projector"
        stages.append(
            StageSpec(
                name,
                StageKind.INPUT_PROJECTOR,
                f"input_projectors.{modality}" if modality else "input_projector",
                (TensorSpec("features", F32, ("batch", "tokens", int(c["in_dim"]))),),
                (TensorSpec("embeds", F32, ("batch", "tokens", int(c["out_dim"]))),),
                (BATCH, Dim("tokens", 1, 1, tokens_out)),
                tolerance=TIGHT,
                modality=modality or None,
            )
        )
        edges.append(Edge(f"{name}.embeds", "llm.inputs_embeds", via="splice at media placeholders"))
    edges.append(Edge("token_embedding.inputs_embeds", "llm.inputs_embeds"))
    for modality, path in cfg.output_projectors.items():
        c = read_json(path / "config.json")
        name = f"{modality}_output_projector"
        if c.get("kind") == "textfc":  # NExT-GPT's TextFcLayer: signal hidden states + their input embeddings
            n_in, n_out = int(c["num_input_tokens"]), int(c["num_output_tokens"])
            rows = (TensorSpec("hidden_states", F32, ("batch", n_in, int(c["in_dim"]))),)
            if c.get("mode") == "linear":  # GILL's linear mode reads the hidden states alone
                n_out = min(n_in, n_out)
            else:
                rows += (TensorSpec("signal_embeds", F32, ("batch", n_in, int(c["in_dim"])), high=0.05),)
        else:
            n_in, n_out = int(c["num_signal_tokens"]), int(c["num_queries"])
            rows = (TensorSpec("hidden_states", F32, ("batch", n_in, int(c["in_dim"]))),)
        stages.append(
            StageSpec(
                name,
                StageKind.OUTPUT_PROJECTOR,
                f"output_projectors.{modality}",
                rows,
                (TensorSpec("conditioning", F32, ("batch", n_out, int(c["out_dim"]))),),
                (BATCH,),
                tolerance=TIGHT,
                modality=modality,
            )
        )
        edges.append(
            Edge("llm.hidden_states", f"{name}.hidden_states", via=f"rows at {modality} signal tokens")
        )
    for modality, path in cfg.decoders.items():
        if modality == "video" and is_cogvideox(path):  # a CogVideoX transformer + causal 3D VAE
            stages += cogvideox_stages(path)
        else:
            stages += decoder_stages(modality, path, cfg)
        edges += decoder_edges(modality)
    check_conditioning(stages)
    return PipelineSpec(
        name=cfg.root.name,
        stages=tuple(stages),
        edges=tuple(edges),
        signal_tokens=cfg.signal_tokens,
        placeholders=cfg.placeholders,
    )


def input_projector_name(cfg: ModelConfig, modality: str) -> str:
    """The input projector stage of ``modality``'s encoder: its own, else the shared one (video
    goes through the image encoder and so through the image projector)."""
    m = "image" if modality == "video" else modality
    return f"{m}_input_projector" if m in cfg.input_projectors else "input_projector"


# encoder config ``model_type`` -> kind; any other type is refused (transformers would load it
# into the wrong class with its unmatched weights freshly initialised)
ENCODER_KINDS = {
    "clip_vision_model": "clip",
    "clip": "clip",
    "imagebind": "imagebind",
    "whisper": "whisper",
    "blip-2": "blip-2",
    "clap": "clap",
    "clap_audio_model": "clap",
}


def encoder_kind(path: Path) -> str:
    """``imagebind``, ``whisper``, ``blip-2``, ``clap`` or ``clip`` (a CLIP vision folder), from its
    config's ``model_type``; one sentence naming the supported types otherwise."""
    t = read_json(path / "config.json").get("model_type")
    if t not in ENCODER_KINDS:
        raise ConfigError(
            f"the encoder at {path} is a '{t}' model; omniforge encodes media with "
            f"{', '.join(repr(k) for k in ENCODER_KINDS)} models"
        )
    return ENCODER_KINDS[t]


def is_imagebind(path: Path) -> bool:
    """Whether an encoder folder holds ImageBind (converted by ``omniforge import nextgpt``)."""
    return read_json(path / "config.json").get("model_type") == "imagebind"


def encoder_stage(modality: str, path: Path, cfg: ModelConfig) -> tuple[StageSpec, int]:
    """The encoder stage of ``modality`` and its embedding width. ImageBind takes 2-frame clips
    (an image is a clip of itself twice) or 1-channel Kaldi fbank clips; a CLIP vision folder takes
    square pixels or square log-mel patches."""
    c = read_json(path / "config.json")
    batch_max = 32
    if c.get("model_type") == "whisper":
        if modality != "audio":
            raise ConfigError(f"a Whisper encoder encodes audio, not {modality}")
        fe = cfg.audio_frontend
        for key, v, high in (("window_s", fe.window_s, 30), ("pool", fe.pool, 1500)):
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= high:
                raise ConfigError(f"audio_frontend {key} must be an integer in [1, {high}], got {v!r}")
        frames = 100 * fe.window_s  # 10 ms hops
        positions = frames // 2  # after the stride-2 convolution
        if positions > int(c["max_source_positions"]):
            raise ConfigError(
                f"a {fe.window_s} s window gives {positions} positions; this Whisper encoder has "
                f"{c['max_source_positions']}"
            )
        if positions % fe.pool:
            raise ConfigError(f"audio_frontend pool {fe.pool} must divide the {positions} encoder positions")
        enc_dim, batch_max = int(c["d_model"]), 8
        x = TensorSpec("input_features", F32, ("batch", int(c["num_mel_bins"]), frames))
        out = ("batch", positions // fe.pool, enc_dim)
    elif encoder_kind(path) == "clap":  # CLAP's audio tower + projection: one pooled embedding
        from omniforge.pipeline.clap_folder import read_clap_folder

        if modality != "audio":
            raise ConfigError(f"a CLAP audio tower encodes audio, not {modality}")
        clap = read_clap_folder(path)
        fe, enc_dim, batch_max = clap.frontend, clap.projection_dim, 8
        x = TensorSpec(
            "input_features", F32, ("batch", fe.channels, fe.frames, fe.n_mels), "uniform", -80.0, 0.0
        )
        out = ("batch", enc_dim)
    elif c.get("model_type") == "blip-2":  # vision tower + Q-Former: query states per image
        if modality != "image":
            raise ConfigError(f"a BLIP-2 Q-Former encodes images, not {modality}")
        vis, qf = c.get("vision_config", {}), c.get("qformer_config", {})
        size, enc_dim = int(vis.get("image_size", 224)), int(qf.get("hidden_size", 768))
        x = TensorSpec("pixel_values", F32, ("batch", 3, size, size))
        out = ("batch", int(c.get("num_query_tokens", 32)), enc_dim)
    elif c.get("model_type") == "imagebind":
        enc_dim = int(c["embed_dim"])
        out = ("batch", enc_dim)
        if modality == "audio":
            x = TensorSpec("fbank", F32, ("batch", 1, int(c["n_mels"]), int(c["audio_frames"])))
        else:
            size = int(c["image_size"])
            x = TensorSpec("pixel_values", F32, ("batch", 3, int(c["frames_per_clip"]), size, size))
    else:
        size, ch = int(c["image_size"]), int(c.get("num_channels", 3))
        enc_dim = int(c["projection_dim"])
        out = ("batch", enc_dim)
        if modality == "audio":
            fe = cfg.audio_frontend
            if (fe.n_mels, fe.num_frames) != (size, size):
                raise_mismatch(
                    "audio encoder image_size",
                    size,
                    "audio_frontend n_mels/num_frames",
                    (fe.n_mels, fe.num_frames),
                )
            x = TensorSpec("log_mel", F32, ("batch", ch, size, size))
        else:
            x = TensorSpec("pixel_values", F32, ("batch", ch, size, size))
    stage = StageSpec(
        f"{modality}_encoder",
        StageKind.ENCODER,
        f"encoders.{modality}",
        (x,),
        (TensorSpec("embeds", F32, out),),  # a pooled embedding (CLIP, ImageBind, CLAP), or tokens
        (Dim("batch", 1, 1, batch_max),),
        tolerance=TIGHT,
        modality=modality,
    )
    return stage, enc_dim


def raise_mismatch(a: str, av: object, b: str, bv: object) -> None:
    raise ConfigError(f"{a} ({av}) does not match {b} ({bv})")


def _vae_scale(vae: dict) -> int:
    return 2 ** (len(vae["block_out_channels"]) - 1)


def decoder_stages(modality: str, path, cfg: ModelConfig) -> list[StageSpec]:
    unet = read_json(path / "unet" / "config.json")
    vae = read_json(path / "vae" / "config.json")
    lat_c = int(unet["in_channels"])
    if int(vae["latent_channels"]) != lat_c:
        raise_mismatch(f"{modality} UNet in_channels", lat_c, "VAE latent_channels", vae["latent_channels"])
    size = unet["sample_size"]
    scale = _vae_scale(vae)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if modality == "audio":  # AudioLDM's latent is (frames, mel bins / VAE scale), whatever its config says
        n_mel = int(read_json(path / "vocoder" / "config.json")["model_in_dim"])
        if n_mel % scale:
            raise_mismatch("vocoder model_in_dim", n_mel, "a multiple of the VAE scale", scale)
        if isinstance(size, int):  # the released config gives the frames alone (128 for 5.12 s)
            w = n_mel // scale
        elif w * scale != n_mel:
            raise_mismatch(
                "audio UNet sample_size mel bins x VAE scale", w * scale, "vocoder model_in_dim", n_mel
            )
    t = TensorSpec("timestep", F32, ("batch",), fill="uniform", low=0, high=999)
    dims: tuple[Dim, ...] = (CFG_BATCH,)
    if modality == "video":  # ZeroScope: a 3D UNet over (batch, C, frames, h, w)
        dims = (CFG_BATCH, Dim("frames", 1, cfg.video_frames, 4 * cfg.video_frames))
        sample = TensorSpec("sample", F32, ("batch", lat_c, "frames", h, w))
    else:
        sample = TensorSpec("sample", F32, ("batch", lat_c, h, w))
    if modality == "audio":  # AudioLDM: one pooled vector through class_labels
        cond = TensorSpec("class_labels", F32, ("batch", int(unet["projection_class_embeddings_input_dim"])))
    else:
        cond = TensorSpec("encoder_hidden_states", F32, ("batch", 77, int(unet["cross_attention_dim"])))
    out: list[StageSpec] = [
        StageSpec(
            f"{modality}_unet",
            StageKind.DECODER,
            f"decoders.{modality}.unet",
            (sample, t, cond),
            (TensorSpec("noise_pred", F32, sample.shape),),
            dims,
            tolerance=TIGHT,
            modality=modality,
        )
    ]
    vae_batch = Dim("batch", 1, cfg.video_frames if modality == "video" else 1, 64)
    out_c = int(vae["out_channels"])
    out.append(
        StageSpec(
            f"{modality}_vae_decoder",
            StageKind.VAE,
            f"decoders.{modality}.vae",
            (TensorSpec("latent", F32, ("batch", lat_c, h, w)),),
            (
                TensorSpec(
                    "image" if modality != "audio" else "mel", F32, ("batch", out_c, h * scale, w * scale)
                ),
            ),
            (vae_batch,),
            tolerance=TIGHT,
            modality=modality,
        )
    )
    if modality == "audio":
        voc = read_json(path / "vocoder" / "config.json")
        hop = 1
        for r in voc["upsample_rates"]:
            hop *= int(r)
        frames = h * scale
        out.append(
            StageSpec(
                "vocoder",
                StageKind.VOCODER,
                "decoders.audio.vocoder",
                (TensorSpec("mel", F32, ("batch", "frames", n_mel)),),
                (TensorSpec("waveform", F32, ("batch", "samples")),),
                (
                    BATCH,
                    Dim("frames", 1, frames, 16 * frames),
                    Dim("samples", hop, hop * frames, hop * 16 * frames),
                ),
                tolerance=TIGHT,
                modality=modality,
                check_points=({}, {"batch": 2, "frames": frames // 2}),
            )
        )
    return out


def decoder_edges(modality: str) -> list[Edge]:
    cond = {
        "image": "image_unet.encoder_hidden_states",
        "video": "video_unet.encoder_hidden_states",
        "audio": "audio_unet.class_labels",
    }[modality]
    unet = cond.split(".")[0]
    edges = [
        Edge(f"{modality}_output_projector.conditioning", cond, via="classifier-free guidance batch"),
        Edge(f"{unet}.noise_pred", f"{modality}_vae_decoder.latent", via="scheduler loop"),
    ]
    if modality == "audio":
        edges.append(Edge("audio_vae_decoder.mel", "vocoder.mel", via="squeeze channel"))
    return edges
