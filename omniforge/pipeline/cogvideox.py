"""CogVideoX as the video decoder: its stages, read from a diffusers CogVideoX folder (torch-free).

A CogVideoX folder holds ``transformer/`` (``CogVideoXTransformer3DModel``), ``vae/``
(``AutoencoderKLCogVideoX``) and ``scheduler/`` (``CogVideoXDDIMScheduler`` or
``CogVideoXDPMScheduler``). The latent shape is fixed by the transformer's config
(``sample_frames``, ``sample_height``, ``sample_width``): the rotary or sin-cos positional
embeddings and the causal VAE's frame-batched decode are exported for that shape; only the batch
is dynamic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omniforge.errors import ConfigError
from omniforge.pipeline.spec import Dim, StageKind, StageSpec, TensorSpec, Tolerance

F32 = "float32"
TRANSFORMER_CLASS = "CogVideoXTransformer3DModel"
VAE_CLASS = "AutoencoderKLCogVideoX"
SCHEDULER_CLASSES = ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler")
TIGHT = Tolerance(atol=1e-4, rtol=1e-4)


def _read(path: Path) -> dict:
    from omniforge.pipeline.model_config import read_json

    return read_json(path)


def _int(d: dict, key: str, default: int, where: str) -> int:
    v = d.get(key, default)
    if isinstance(v, float) and v.is_integer():  # diffusers writes some sizes as floats
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1 << 20:
        raise ConfigError(f"the CogVideoX {where} config's '{key}' must be a positive integer, got {v!r}")
    return v


def is_cogvideox(folder: Path) -> bool:
    """Whether a decoder folder holds a CogVideoX transformer (``transformer/config.json``)."""
    f = Path(folder) / "transformer" / "config.json"
    return f.is_file() and _read(f).get("_class_name") == TRANSFORMER_CLASS


@dataclass(frozen=True)
class CogVideoXGeometry:
    """The fixed shapes of a CogVideoX decoder: latents (F, C, h, w), text (L, D), frames out."""

    latent_frames: int
    latent_channels: int
    height: int  # latent rows
    width: int  # latent columns
    text_length: int
    text_dim: int
    patch_size: int
    temporal_ratio: int
    spatial_scale: int
    out_channels: int

    @property
    def frames(self) -> int:
        """Video frames the VAE decodes the latents to."""
        return (self.latent_frames - 1) * self.temporal_ratio + 1


def geometry(folder: Path) -> CogVideoXGeometry:
    """Read and check a CogVideoX folder's configs; anything the export does not cover is refused in
    one sentence (CogVideoX 1.5's temporal patches, image-to-video inputs, other VAE or scheduler
    classes)."""
    folder = Path(folder)
    t = _read(folder / "transformer" / "config.json")
    v = _read(folder / "vae" / "config.json")
    s = _read(folder / "scheduler" / "scheduler_config.json")
    if v.get("_class_name") != VAE_CLASS:
        raise ConfigError(
            f"a CogVideoX decoder needs an {VAE_CLASS} VAE; {folder / 'vae'} holds {v.get('_class_name')!r}"
        )
    if s.get("_class_name") not in SCHEDULER_CLASSES:
        raise ConfigError(
            f"a CogVideoX decoder's scheduler must be one of {', '.join(SCHEDULER_CLASSES)}, got {s.get('_class_name')!r}"
        )
    if t.get("patch_size_t") is not None or t.get("ofs_embed_dim") is not None:
        raise ConfigError(
            "CogVideoX 1.5 transformers (patch_size_t, ofs_embed_dim) are not supported as video decoders"
        )
    lat_c, tr_in = _int(v, "latent_channels", 16, "VAE"), _int(t, "in_channels", 16, "transformer")
    if tr_in != lat_c:
        raise ConfigError(
            f"the CogVideoX transformer takes {tr_in} channels but the VAE's latents have {lat_c} "
            "(image-to-video transformers are not supported as video decoders)"
        )
    out = tr_in if t.get("out_channels") is None else _int(t, "out_channels", tr_in, "transformer")
    if out != lat_c:
        raise ConfigError(
            f"the CogVideoX transformer's out_channels ({t.get('out_channels')}) must equal the VAE's latent_channels ({lat_c})"
        )
    ratio = _int(t, "temporal_compression_ratio", 4, "transformer")
    if _int(v, "temporal_compression_ratio", 4, "VAE") != ratio:
        raise ConfigError(
            f"the CogVideoX transformer's temporal_compression_ratio ({ratio}) differs from its VAE's "
            f"({v.get('temporal_compression_ratio', 4)})"
        )
    p = _int(t, "patch_size", 2, "transformer")
    h, w = _int(t, "sample_height", 60, "transformer"), _int(t, "sample_width", 90, "transformer")
    if h % p or w % p:
        raise ConfigError(f"the CogVideoX latent size {h}x{w} must be a multiple of its patch_size {p}")
    blocks = v.get("block_out_channels", (128, 256, 256, 512))
    if not isinstance(blocks, (list, tuple)) or not 1 <= len(blocks) <= 8:
        raise ConfigError(
            f"the CogVideoX VAE config's 'block_out_channels' must list 1 to 8 sizes, got {blocks!r}"
        )
    return CogVideoXGeometry(
        latent_frames=(_int(t, "sample_frames", 49, "transformer") - 1) // ratio + 1,
        latent_channels=lat_c,
        height=h,
        width=w,
        text_length=_int(t, "max_text_seq_length", 226, "transformer"),
        text_dim=_int(t, "text_embed_dim", 4096, "transformer"),
        patch_size=p,
        temporal_ratio=ratio,
        spatial_scale=2 ** (len(blocks) - 1),
        out_channels=_int(v, "out_channels", 3, "VAE"),
    )


def cogvideox_stages(folder: Path) -> list[StageSpec]:
    """``video_unet`` (the transformer: latents (B, F, C, h, w), timestep, text conditioning) and
    ``video_vae_decoder`` (latents (B, C, F, h, w) -> frames (B, 3, frames, H, W))."""
    g = geometry(folder)
    frames = Dim("frames", g.latent_frames, g.latent_frames, g.latent_frames)  # fixed: see the module doc
    latents = TensorSpec("latents", F32, ("batch", "frames", g.latent_channels, g.height, g.width))
    denoiser = StageSpec(
        "video_unet",
        StageKind.DECODER,
        "decoders.video.transformer",
        (
            latents,
            TensorSpec("timestep", F32, ("batch",), fill="uniform", low=0, high=999),
            TensorSpec("encoder_hidden_states", F32, ("batch", g.text_length, g.text_dim)),
        ),
        (TensorSpec("noise_pred", F32, latents.shape),),
        (Dim("batch", 1, 2, 8), frames),
        tolerance=TIGHT,
        modality="video",
    )
    s = g.spatial_scale
    vae = StageSpec(
        "video_vae_decoder",
        StageKind.VAE,
        "decoders.video.vae",
        (TensorSpec("latent", F32, ("batch", g.latent_channels, "frames", g.height, g.width)),),
        (TensorSpec("video", F32, ("batch", g.out_channels, g.frames, g.height * s, g.width * s)),),
        (Dim("batch", 1, 1, 4), frames),
        tolerance=TIGHT,
        modality="video",
    )
    return [denoiser, vae]


def check_conditioning(stages: list[StageSpec]) -> None:
    """The video output projector must give the CogVideoX transformer's text shape exactly."""
    by = {s.name: s for s in stages}
    proj, den = by.get("video_output_projector"), by.get("video_unet")
    if proj is None or den is None or den.component != "decoders.video.transformer":
        return
    got, want = tuple(proj.outputs[0].shape[1:]), tuple(den.inputs[2].shape[1:])
    if got != want:
        raise ConfigError(
            f"the video output projector gives {got[0]} x {got[1]} conditioning but the CogVideoX "
            f"transformer takes {want[0]} x {want[1]} (max_text_seq_length x text_embed_dim)"
        )
