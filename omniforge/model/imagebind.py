"""ImageBind's vision and audio encoders (as NExT-GPT uses them) as exportable torch modules.

Read by the released checkpoint's own key names: open ``imagebind_huge.pth`` (a pickled state dict)
with ``torch.load(path, map_location="cpu", weights_only=True)``, then ``save_imagebind`` writes the
two encoders' tensors as safetensors and ``load_imagebind`` builds either stage from that folder.

What the modules compute, as in ImageBind's ``imagebind_model.py`` in eval mode (drop path is the
identity there, and no trunk uses layer scale):

- vision: Conv3d stem (kernel = stride = (frames_per_clip, patch, patch), no bias) -> CLS token +
  learned positions -> LayerNorm -> pre-norm blocks ``x + attn(LN x)``, ``x + fc2(GELU(fc1(LN x)))``
  -> LayerNorm -> CLS -> Linear (no bias) -> L2 normalise;
- audio: Conv2d stem (kernel ``audio_patch``, stride ``audio_stride``, no bias) + LayerNorm (torch's
  default eps 1e-5, unlike every other norm's 1e-6) -> CLS + positions -> the same blocks with
  ``add_bias_kv`` attention, no pre-trunk norm -> the same head -> L2 normalise. ImageBind scales
  audio embeddings by 20 after normalising; NExT-GPT's forward drops that, and so do we.

One forward call embeds one clip per batch row; ImageBind averages a video's 15 clip embeddings (or
an audio's 3) after normalisation, without normalising again, and that mean is left to the caller.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from omniforge.errors import ConfigError, ModelNotFoundError

Prefixes = tuple[tuple[str, str], ...]  # (ImageBind's key prefix, this module's prefix)

VISION_PREFIXES: Prefixes = (
    ("modality_preprocessors.vision.", "preprocessor."),
    ("modality_trunks.vision.", "trunk."),
    ("modality_heads.vision.", "head."),
)
AUDIO_PREFIXES: Prefixes = (
    ("modality_preprocessors.audio.", "preprocessor."),
    ("modality_trunks.audio.", "trunk."),
    ("modality_heads.audio.", "head."),
)


@dataclass(frozen=True)
class ImageBindConfig:
    """The two encoders' sizes; ``config_from_state`` reads all but the head counts from tensors."""

    vision_width: int
    vision_layers: int
    vision_heads: int  # not in the state dict: 16 for ImageBind-huge
    audio_width: int
    audio_layers: int
    audio_heads: int  # not in the state dict: 12 for ImageBind-huge
    embed_dim: int  # the shared embedding space both heads project to
    image_size: int = 224
    patch_size: int = 14
    frames_per_clip: int = 2  # the stem's temporal kernel and stride: an image is repeated to 2 frames
    n_mels: int = 128  # the audio input is (1, n_mels, audio_frames) Kaldi fbank
    audio_frames: int = 204
    audio_patch: int = 16
    audio_stride: int = 10  # audio patches overlap: 128x204 -> 12x19 patches
    eps: float = 1e-6  # every LayerNorm but the audio stem's
    audio_stem_eps: float = 1e-5  # the audio stem's LayerNorm is built with torch's default eps

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "int" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"ImageBind's {f.name} must be a positive integer, got {v!r}")
            if f.type == "float" and (
                isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1
            ):
                raise ConfigError(f"ImageBind's {f.name} must be a number in (0, 1), got {v!r}")
        for width, heads, what in (
            (self.vision_width, self.vision_heads, "vision"),
            (self.audio_width, self.audio_heads, "audio"),
        ):
            if width % heads:
                raise ConfigError(f"ImageBind's {what} width {width} is not divisible by its {heads} heads")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"ImageBind's image size {self.image_size} is not a multiple of its patch size {self.patch_size}"
            )
        if self.audio_patch > min(self.n_mels, self.audio_frames):
            raise ConfigError(
                f"ImageBind's audio patch {self.audio_patch} exceeds its {self.n_mels}x{self.audio_frames} input"
            )

    @property
    def vision_positions(self) -> int:
        """CLS + one token per spatial patch (the whole clip is one temporal patch)."""
        return 1 + (self.image_size // self.patch_size) ** 2

    @property
    def audio_grid(self) -> tuple[int, int]:
        """(mel, time) patches of the overlapping audio stem."""
        rows = (self.n_mels - self.audio_patch) // self.audio_stride + 1
        cols = (self.audio_frames - self.audio_patch) // self.audio_stride + 1
        return rows, cols

    @property
    def audio_positions(self) -> int:
        rows, cols = self.audio_grid
        return 1 + rows * cols


IMAGEBIND_HUGE = ImageBindConfig(
    vision_width=1280,
    vision_layers=32,
    vision_heads=16,
    audio_width=768,
    audio_layers=12,
    audio_heads=12,
    embed_dim=1024,
)


# ---- modules, named like ImageBind's so that a fixed prefix mapping loads its keys -------------------
class PadIm2Video(nn.Module):
    """An image (B, C, H, W) or one-frame clip becomes a clip of ``frames`` copies; clips pass as they are."""

    def __init__(self, frames: int) -> None:
        super().__init__()
        self.frames = frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.unsqueeze(2)  # (B, C, 1, H, W)
        if x.shape[2] == 1:
            x = x.repeat(1, 1, self.frames, 1, 1)
        return x


class PatchStem(nn.Module):
    """ImageBind's ``PatchEmbedGeneric``: projection, flatten to tokens, optional LayerNorm."""

    def __init__(self, proj: nn.Module, norm_layer: nn.Module | None = None) -> None:
        super().__init__()
        self.proj = proj
        self.norm_layer = norm_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)  # (B, C, (T,) H, W) -> (B, N, C)
        return x if self.norm_layer is None else self.norm_layer(x)


class PositionalEmbedding(nn.Module):
    """ImageBind's ``SpatioTemporalPosEmbeddingHelper`` (learnable) at the input size it was built for."""

    def __init__(self, positions: int, width: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, positions, width))


class Tokenizer(nn.Module):
    """ImageBind's ``RGBDTPreprocessor`` / ``AudioPreprocessor``: stem tokens, CLS first, plus positions."""

    def __init__(self, stem: PatchStem, positions: int, width: int) -> None:
        super().__init__()
        self.rgbt_stem = stem
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embedding_helper = PositionalEmbedding(positions, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.rgbt_stem(x)  # (B, N, C)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # (B, 1, C)
        return torch.cat((cls, tokens), dim=1) + self.pos_embedding_helper.pos_embed  # (B, 1 + N, C)


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as ImageBind's
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """ImageBind's ``BlockWithMasking`` in eval mode: pre-norm attention and MLP, no layer scale."""

    def __init__(self, width: int, heads: int, add_bias_kv: bool, eps: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, bias=True, add_bias_kv=add_bias_kv)
        self.norm_1 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, 4 * width)
        self.norm_2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (L, B, C): sequence first, as ImageBind's
        h = self.norm_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm_2(x))


class Trunk(nn.Module):
    """ImageBind's ``SimpleTransformer``: optional pre-trunk LayerNorm, then the blocks."""

    def __init__(self, width: int, layers: int, heads: int, pre_norm: bool, add_bias_kv: bool, eps: float):
        super().__init__()
        self.pre_transformer_layer = (
            nn.Sequential(nn.LayerNorm(width, eps=eps)) if pre_norm else nn.Identity()
        )
        self.blocks = nn.Sequential(*(Block(width, heads, add_bias_kv, eps) for _ in range(layers)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, L, C)
        x = self.pre_transformer_layer(tokens).transpose(0, 1)  # (L, B, C)
        return self.blocks(x).transpose(0, 1)


class SelectCls(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]  # (B, L, C) -> (B, C)


def _head(width: int, embed_dim: int, eps: float) -> nn.Sequential:
    """LayerNorm, CLS token, Linear without bias: keys ``0.*`` and ``2.weight`` like ImageBind's."""
    return nn.Sequential(nn.LayerNorm(width, eps=eps), SelectCls(), nn.Linear(width, embed_dim, bias=False))


class _Encoder(nn.Module):
    PREFIXES: ClassVar[Prefixes]

    def __init__(self, preprocessor: Tokenizer, trunk: Trunk, head: nn.Sequential) -> None:
        super().__init__()
        self.preprocessor = preprocessor
        self.trunk = trunk
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.trunk(self.preprocessor(x))), dim=-1)  # (B, embed_dim)

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], cfg: ImageBindConfig) -> _Encoder:
        """The encoder in eval mode with ImageBind's tensors (original key names; other modalities'
        keys are ignored); a missing, unexpected or mis-shaped key of this encoder is a ``ConfigError``."""
        module = cls(cfg)
        own = _check_keys(cls, state, cfg)
        module.load_state_dict(own, strict=True)
        return module.eval()


class ImageBindVision(_Encoder):
    """``forward(clips)``: (B, 3, frames_per_clip, H, W) CLIP-normalised float32 -> (B, embed_dim), unit norm.

    An image is a clip of the image repeated (``PadIm2Video`` does that here for (B, 3, H, W) too);
    a video is 15 clips of 2 frames (5 times x 3 crops) whose embeddings the caller averages."""

    PREFIXES = VISION_PREFIXES

    def __init__(self, cfg: ImageBindConfig) -> None:
        t, p, w = cfg.frames_per_clip, cfg.patch_size, cfg.vision_width
        conv = nn.Conv3d(3, w, kernel_size=(t, p, p), stride=(t, p, p), bias=False)
        super().__init__(
            Tokenizer(PatchStem(nn.Sequential(PadIm2Video(t), conv)), cfg.vision_positions, w),
            Trunk(w, cfg.vision_layers, cfg.vision_heads, pre_norm=True, add_bias_kv=False, eps=cfg.eps),
            _head(w, cfg.embed_dim, cfg.eps),
        )
        self.cfg = cfg


class ImageBindAudio(_Encoder):
    """``forward(fbank)``: (B, 1, n_mels, audio_frames) normalised Kaldi fbank -> (B, embed_dim), unit
    norm, without ImageBind's x20 logit scale (NExT-GPT drops it)."""

    PREFIXES = AUDIO_PREFIXES

    def __init__(self, cfg: ImageBindConfig) -> None:
        w = cfg.audio_width
        conv = nn.Conv2d(1, w, kernel_size=cfg.audio_patch, stride=cfg.audio_stride, bias=False)
        super().__init__(
            Tokenizer(PatchStem(conv, nn.LayerNorm(w, eps=cfg.audio_stem_eps)), cfg.audio_positions, w),
            Trunk(w, cfg.audio_layers, cfg.audio_heads, pre_norm=False, add_bias_kv=True, eps=cfg.eps),
            _head(w, cfg.embed_dim, cfg.eps),
        )
        self.cfg = cfg


# ---- ImageBind's state dict ----------------------------------------------------------------------------
def _renamed(state: Mapping[str, torch.Tensor], prefixes: Prefixes) -> dict[str, torch.Tensor]:
    """The keys under ``prefixes``, renamed to this module's names."""
    out = {}
    for key, value in state.items():
        for theirs, ours in prefixes:
            if key.startswith(theirs):
                out[ours + key[len(theirs) :]] = value
    return out


def original_key(name: str, prefixes: Prefixes) -> str:
    """ImageBind's key name of this module's tensor ``name``."""
    for theirs, ours in prefixes:
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    raise AssertionError(name)


def _check_keys(cls: type[_Encoder], state: Mapping[str, torch.Tensor], cfg: ImageBindConfig) -> dict:
    """This encoder's tensors of ``state`` under its own names, after checking names and shapes."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in cls(cfg).state_dict().items()}
    own = _renamed(state, cls.PREFIXES)
    for name, shape in expected.items():
        if name not in own:
            raise ConfigError(f"the ImageBind state dict lacks '{original_key(name, cls.PREFIXES)}'")
        if not isinstance(own[name], torch.Tensor) or tuple(own[name].shape) != shape:
            got = tuple(own[name].shape) if isinstance(own[name], torch.Tensor) else type(own[name]).__name__
            raise ConfigError(
                f"ImageBind's '{original_key(name, cls.PREFIXES)}' is {got}, the config implies {shape}"
            )
    extra = sorted(set(own) - set(expected))
    if extra:
        raise ConfigError(
            f"the ImageBind state dict has '{original_key(extra[0], cls.PREFIXES)}', "
            f"which this config's encoder does not have"
        )
    return own


def _shape(state: Mapping[str, torch.Tensor], key: str, ndim: int) -> tuple[int, ...]:
    t = state.get(key)
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"this is not an ImageBind state dict: it lacks '{key}'")
    if t.ndim != ndim:
        raise ConfigError(f"ImageBind's '{key}' should have {ndim} dimensions, it has shape {tuple(t.shape)}")
    return tuple(t.shape)


def _layers(state: Mapping[str, torch.Tensor], trunk: str) -> int:
    prefix = f"{trunk}.blocks."
    ids = {k[len(prefix) :].split(".", 1)[0] for k in state if k.startswith(prefix)}
    if not ids or not all(i.isdigit() for i in ids):
        raise ConfigError(f"this is not an ImageBind state dict: it has no '{prefix}N' blocks")
    return max(int(i) for i in ids) + 1


def config_from_state(
    state: Mapping[str, torch.Tensor], vision_heads: int = 16, audio_heads: int = 12
) -> ImageBindConfig:
    """The config of ImageBind's vision and audio encoders from its state dict's shapes.

    Widths, layer counts, patch sizes, the clip length and the embedding size come from the stems,
    blocks and heads; the image size from the number of vision positions. The audio input's
    128x204 size and stride 10 are not recoverable from shapes: they are ImageBind's, checked
    against the number of audio positions. Head counts must be given."""
    if not isinstance(state, Mapping):
        raise ConfigError(
            f"an ImageBind state dict must be a mapping of names to tensors, got {type(state).__name__}"
        )
    v_conv = _shape(state, "modality_preprocessors.vision.rgbt_stem.proj.1.weight", 5)  # (W, 3, T, P, P)
    v_pos = _shape(state, "modality_preprocessors.vision.pos_embedding_helper.pos_embed", 3)  # (1, N, W)
    a_conv = _shape(state, "modality_preprocessors.audio.rgbt_stem.proj.weight", 4)  # (W, 1, P, P)
    v_head = _shape(state, "modality_heads.vision.2.weight", 2)  # (E, W)
    if v_conv[1] != 3 or v_conv[3] != v_conv[4]:
        raise ConfigError(f"ImageBind's vision stem should be (W, 3, T, P, P), it is {v_conv}")
    if a_conv[1] != 1 or a_conv[2] != a_conv[3]:
        raise ConfigError(f"ImageBind's audio stem should be (W, 1, P, P), it is {a_conv}")
    grid = math.isqrt(max(v_pos[1] - 1, 0))
    if v_pos[1] < 2 or grid * grid != v_pos[1] - 1:
        raise ConfigError(f"ImageBind's vision positions ({v_pos[1]}) are not a CLS token plus a square grid")
    cfg = ImageBindConfig(
        vision_width=v_conv[0],
        vision_layers=_layers(state, "modality_trunks.vision"),
        vision_heads=vision_heads,
        audio_width=a_conv[0],
        audio_layers=_layers(state, "modality_trunks.audio"),
        audio_heads=audio_heads,
        embed_dim=v_head[0],
        image_size=grid * v_conv[3],
        patch_size=v_conv[3],
        frames_per_clip=v_conv[2],
        audio_patch=a_conv[2],
    )
    _check_keys(ImageBindVision, state, cfg)
    _check_keys(ImageBindAudio, state, cfg)
    return cfg


def encoder_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision and audio encoders' tensors under their original names (text, depth, thermal, IMU and
    the post-processors' logit scales dropped)."""
    keep = tuple(theirs for theirs, _ in VISION_PREFIXES + AUDIO_PREFIXES)
    return {k: v for k, v in state.items() if k.startswith(keep)}


def save_imagebind(state: Mapping[str, torch.Tensor], cfg: ImageBindConfig, folder: str | Path) -> Path:
    """``folder/config.json`` ({"model_type": "imagebind", ...}) and ``folder/model.safetensors`` (the
    encoders' tensors in their stored dtype), after checking every tensor against ``cfg``."""
    _check_keys(ImageBindVision, state, cfg)
    _check_keys(ImageBindAudio, state, cfg)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in encoder_state(state).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(
        json.dumps({"model_type": "imagebind", **asdict(cfg)}, indent=2) + "\n"
    )
    return folder


def read_imagebind_config(folder: str | Path) -> ImageBindConfig:
    """The config of an ImageBind folder written by ``save_imagebind``."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file() or not (folder / "model.safetensors").is_file():
        raise ModelNotFoundError(
            f"'{folder}' is not an ImageBind folder: it needs config.json and model.safetensors"
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"'{path}' is not readable JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("model_type") != "imagebind":
        got = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise ConfigError(f"'{path}' does not describe ImageBind (model_type {got!r})")
    known = {f.name for f in fields(ImageBindConfig)}
    unknown = sorted(set(raw) - known - {"model_type"})
    if unknown:
        raise ConfigError(f"'{path}' has a key ImageBind's config does not know: '{unknown[0]}'")
    try:
        return ImageBindConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    except TypeError as exc:
        raise ConfigError(f"'{path}' is not a complete ImageBind config ({exc})") from None


def load_imagebind(folder: str | Path, modality: str) -> nn.Module:
    """The ``"image"`` (also video) or ``"audio"`` encoder of an ImageBind folder, in eval mode.

    Weights are read only from ``model.safetensors``."""
    encoders = {"image": ImageBindVision, "audio": ImageBindAudio}
    if modality not in encoders:
        raise ConfigError(f"ImageBind's encoders are 'image' and 'audio', not {modality!r}")
    cfg = read_imagebind_config(folder)
    try:
        state = load_file(str(Path(folder) / "model.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(
            f"'{Path(folder) / 'model.safetensors'}' is not a readable safetensors file ({exc})"
        ) from None
    return encoders[modality].from_state(state, cfg)
