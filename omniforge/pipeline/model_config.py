"""Reading a model folder's top-level description (torch-free).

A NExT-GPT folder holds ``nextgpt.json`` naming its parts, each in its library's own format:

    nextgpt.json
    llm/                      HF LLM folder (LLM_BACKBONES) + tokenizer.json
    lora/<modality>/          peft LoRA adapters
    image_encoder/            HF CLIPVisionModelWithProjection folder (ImageBind-style ViT)
    audio_encoder/            the same class over 1-channel log-mel patches
    input_projector/          config.json + model.safetensors
    output_projectors/<m>/    config.json + model.safetensors
    image_decoder/            diffusers folders: unet/, vae/, scheduler/
    video_decoder/            unet/ (UNet3DConditionModel), vae/, scheduler/
    audio_decoder/            unet/, vae/, vocoder/ (SpeechT5HifiGan), scheduler/

Paths in ``nextgpt.json`` are relative to the folder or absolute, so real checkpoints
(Vicuna, Stable Diffusion, ZeroScope, AudioLDM folders) can be pointed at where they lie.
A plain HF LLM folder (``config.json`` with a ``model_type`` of ``LLM_BACKBONES``) is accepted
too and describes an LLM-only pipeline.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omniforge.errors import ConfigError, ModelNotFoundError
from omniforge.pipeline.protocol import PromptProtocol
from omniforge.runtime.video_audio import VideoAudio

FORMAT = "omniforge-nextgpt"
FORMAT_VERSION = 1
MODALITIES = ("image", "video", "audio")
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# the LLM backbones omniforge exports: HF config.json ``model_type`` -> transformers class
LLM_BACKBONES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclass(frozen=True)
class AudioFrontend:
    """Log-mel parameters of the audio encoder's input (computed in numpy at run time)."""

    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 32
    num_frames: int = 32
    mean: float = -4.268  # log-mel normalisation, ImageBind's values
    std: float = 4.569
    window_s: int = 30  # Whisper encoders: seconds per window (Whisper was trained on 30)
    pool: int = 1  # Whisper encoders: average-pool this many positions into one token


@dataclass(frozen=True)
class ModelConfig:
    """Resolved paths and settings of a model folder."""

    root: Path
    llm: Path
    max_context: int = 256
    adapters: dict[str, Path] = field(default_factory=dict)
    merge_adapter: str | None = None  # merged into the LLM at export; None: adapters switched at run time
    adapter_auto: dict[str, str | None] = field(default_factory=dict)  # modality -> adapter, first match wins
    encoders: dict[str, Path] = field(default_factory=dict)  # image, audio
    audio_frontend: AudioFrontend = AudioFrontend()
    video_frames: int = 4  # frames sampled from a video for the image encoder
    input_projector: Path | None = None  # shared by every modality (NExT-GPT's llama_proj)
    input_projectors: dict[str, Path] = field(default_factory=dict)  # per modality, over the shared one
    output_projectors: dict[str, Path] = field(default_factory=dict)
    decoders: dict[str, Path] = field(default_factory=dict)
    signal_tokens: dict[str, list[str]] = field(default_factory=dict)
    placeholders: dict[str, str] = field(default_factory=dict)
    protocol: PromptProtocol | None = None  # a conversation protocol (NExT-GPT's); None: placeholders
    uncond: dict[str, Path] = field(default_factory=dict)  # modality -> unconditional embedding (.npy)
    video_audio: VideoAudio | None = None  # how a video's sound track joins its frames; None: concat

    @property
    def is_llm_only(self) -> bool:
        return not (self.encoders or self.decoders or self.output_projectors)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelNotFoundError(f"missing file {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def load_model_config(path: str | Path) -> ModelConfig:
    """Parse a NExT-GPT folder or a plain HF Llama folder; raise one clear error otherwise."""
    root = Path(path).expanduser()
    if not root.exists():
        raise ModelNotFoundError(f"model path '{root}' does not exist")
    if not root.is_dir():
        raise ModelNotFoundError(f"model path '{root}' is not a folder")
    if (root / "nextgpt.json").is_file():
        return _from_nextgpt(root, read_json(root / "nextgpt.json"))
    if (root / "config.json").is_file():
        cfg = read_json(root / "config.json")
        if cfg.get("model_type") not in LLM_BACKBONES:
            raise ModelNotFoundError(
                f"'{root}' holds a '{cfg.get('model_type')}' model; omniforge reads NExT-GPT folders "
                f"(nextgpt.json) or HF LLM folders of model_type {_backbones()}"
            )
        llm_backbone(root)
        ctx = int(cfg.get("max_position_embeddings", 2048))
        return ModelConfig(root=root.resolve(), llm=root.resolve(), max_context=ctx)
    raise ModelNotFoundError(f"'{root}' has neither nextgpt.json nor an HF config.json")


def _backbones() -> str:
    return ", ".join(f"'{t}' ({c})" for t, c in LLM_BACKBONES.items())


def llm_backbone(folder: Path) -> str:
    """The ``model_type`` of the HF LLM folder ``folder``, one of ``LLM_BACKBONES``; anything else
    (another architecture, sliding-window attention) is refused in one sentence."""
    c = read_json(folder / "config.json")
    kind = c.get("model_type")
    if kind not in LLM_BACKBONES:
        raise ConfigError(
            f"the LLM in '{folder}' is a '{kind}' model; omniforge exports LLMs of model_type {_backbones()}"
        )
    if c.get("use_sliding_window"):
        raise ConfigError(
            f"the LLM in '{folder}' uses sliding-window attention (use_sliding_window), which omniforge "
            "does not export; set it to false where the context fits the window"
        )
    return kind


def _from_nextgpt(root: Path, d: dict[str, Any]) -> ModelConfig:
    if d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{root / 'nextgpt.json'} is not a version {FORMAT_VERSION} '{FORMAT}' description "
            f"(format={d.get('format')!r}, format_version={d.get('format_version')!r})"
        )
    root = root.resolve()

    def p(rel: str) -> Path:
        q = Path(rel).expanduser()
        q = q if q.is_absolute() else root / q
        if not q.exists():
            raise ModelNotFoundError(f"nextgpt.json names '{rel}', which does not exist under {root}")
        return q

    def mods(section: str) -> dict[str, Path]:
        entries = d.get(section, {})
        bad = set(entries) - set(MODALITIES)
        if bad:
            raise ConfigError(f"nextgpt.json '{section}' has unknown modalities {sorted(bad)}")
        return {k: p(v) for k, v in entries.items()}

    merge = d.get("merge_adapter")
    adapters = d.get("adapters", {})
    if not isinstance(adapters, dict) or not all(
        isinstance(k, str) and ADAPTER_NAME.fullmatch(k) for k in adapters
    ):
        raise ConfigError("nextgpt.json 'adapters' must map names (letters, digits, _ and -) to folders")
    adapters = {k: p(v) for k, v in adapters.items()}
    if merge is not None and merge not in adapters:
        raise ConfigError(f"merge_adapter '{merge}' is not one of the adapters {sorted(adapters)}")
    auto = d.get("adapter_auto", {})
    if not isinstance(auto, dict) or not all(
        k in (*MODALITIES, "text") and (v is None or v in adapters) for k, v in auto.items()
    ):
        raise ConfigError(
            "nextgpt.json 'adapter_auto' must map modalities (image, video, audio, text) to one of "
            f"the adapters {sorted(adapters)} or null"
        )
    encoders = mods("encoders")
    if "video" in encoders:
        raise ConfigError("video goes through the image encoder; nextgpt.json must not name a video encoder")
    llm = p(d["llm"])
    if (llm / "config.json").is_file():
        llm_backbone(llm)
    return ModelConfig(
        root=root,
        llm=llm,
        max_context=int(d.get("max_context", 256)),
        adapters=adapters,
        merge_adapter=merge,
        adapter_auto=dict(auto),
        encoders=encoders,
        audio_frontend=AudioFrontend(**d.get("audio_frontend", {})),
        video_frames=int(d.get("video_frames", 4)),
        input_projector=p(d["input_projector"]) if d.get("input_projector") else None,
        input_projectors=mods("input_projectors"),
        output_projectors=mods("output_projectors"),
        decoders=mods("decoders"),
        signal_tokens={k: list(v) for k, v in d.get("signal_tokens", {}).items()},
        placeholders=dict(d.get("placeholders", {})),
        protocol=PromptProtocol.from_dict(d["protocol"]) if d.get("protocol") is not None else None,
        uncond=mods("uncond"),
        video_audio=_video_audio(d, encoders),
    )


def _video_audio(d: dict[str, Any], encoders: dict[str, Path]) -> VideoAudio | None:
    if d.get("video_audio") is None:
        return None
    if not {"image", "audio"} <= set(encoders):
        raise ConfigError(
            "nextgpt.json 'video_audio' needs an image encoder (for the frames) and an audio encoder "
            "(for the sound track)"
        )
    return VideoAudio.from_config(d["video_audio"])


DEFAULT_VERSION = 4  # of the embedded tiny default: bump when its architecture or seeds change


def omniforge_home() -> Path:
    """``$OMNIFORGE_HOME``, or ~/.cache/omniforge: the default model and the build cache live here."""
    return Path(os.environ.get("OMNIFORGE_HOME", Path.home() / ".cache" / "omniforge"))


def default_model_dir() -> Path:
    """Where the embedded default is materialised."""
    return omniforge_home() / f"tiny-nextgpt-v{DEFAULT_VERSION}"
