"""Reading an HF CLAP folder as an audio encoder (torch-free): its audio tower's geometry and the
front end its ``ClapFeatureExtractor`` settings describe, with unsupported options refused.

The folder holds ``ClapAudioModelWithProjection`` (``model_type: clap_audio_model``) or a full
``ClapModel`` (``model_type: clap``; only its audio tower and audio projection are read), and
optionally ``preprocessor_config.json`` (the extractor's settings; defaults otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omniforge.errors import ConfigError
from omniforge.pipeline.model_config import read_json
from omniforge.runtime.clap_media import TRUNCATIONS, ClapFrontEnd

MODEL_TYPES = ("clap_audio_model", "clap")
# ClapAudioConfig's defaults for the keys read here (a config.json may leave them out)
AUDIO_DEFAULTS: dict[str, Any] = {
    "spec_size": 256,
    "num_mel_bins": 64,
    "enable_fusion": False,
    "fusion_type": None,
    "patch_embed_input_channels": 1,
    "projection_dim": 512,
}
# ClapFeatureExtractor's settings -> ClapFrontEnd's fields
EXTRACTOR_KEYS = {
    "sampling_rate": "sample_rate",
    "fft_window_size": "n_fft",
    "hop_length": "hop_length",
    "feature_size": "n_mels",
    "frequency_min": "f_min",
    "frequency_max": "f_max",
    "max_length_s": "max_length_s",
    "padding": "padding",
}


@dataclass(frozen=True)
class ClapFolder:
    """What the audio encoder stage and the runtime need from a CLAP folder."""

    frontend: ClapFrontEnd
    projection_dim: int
    fusion: bool


def is_clap(path: Path) -> bool:
    return read_json(path / "config.json").get("model_type") in MODEL_TYPES


def read_clap_folder(path: Path) -> ClapFolder:
    """The audio tower's settings; an option omniforge cannot export or reproduce is refused in
    one sentence (``ConfigError``)."""
    c = read_json(path / "config.json")
    audio = c.get("audio_config", {}) if c.get("model_type") == "clap" else c
    if not isinstance(audio, dict):
        raise ConfigError(f"the CLAP config in '{path}' has no audio_config object")
    a = {**AUDIO_DEFAULTS, **audio}
    if c.get("model_type") == "clap" and c.get("projection_dim") is not None:
        a["projection_dim"] = c["projection_dim"]
    fusion = bool(a["enable_fusion"])
    if fusion and a["fusion_type"] not in (None, "aff_2d"):
        raise ConfigError(
            f"the CLAP audio tower in '{path}' uses fusion_type '{a['fusion_type']}'; only the 2-D "
            "attentional feature fusion (aff_2d) that transformers implements is supported"
        )
    if a["patch_embed_input_channels"] != 1:
        raise ConfigError(
            f"the CLAP audio tower in '{path}' takes {a['patch_embed_input_channels']} input channels "
            "per spectrogram; its feature extractor makes one"
        )
    pre = path / "preprocessor_config.json"
    p = read_json(pre) if pre.is_file() else {}
    if p.get("truncation", "fusion") not in TRUNCATIONS:
        raise ConfigError(
            f"{pre} names truncation '{p['truncation']}'; CLAP's extractor knows {', '.join(TRUNCATIONS)}"
        )
    given = {field: p[key] for key, field in EXTRACTOR_KEYS.items() if p.get(key) is not None}
    fe = ClapFrontEnd(**given, truncation="fusion" if fusion else "rand_trunc")
    why = fe.problem()
    if why is not None:
        raise ConfigError(f"the CLAP feature extractor settings in '{path}' are not supported: {why}")
    mels, spec = int(a["num_mel_bins"]), int(a["spec_size"])
    if fe.n_mels != mels:
        raise ConfigError(
            f"the CLAP feature extractor in '{path}' makes {fe.n_mels} mel bins; its audio tower takes {mels}"
        )
    ratio = spec // mels
    if ratio < 1 or fe.frames > spec * ratio:
        raise ConfigError(
            f"a {fe.max_length_s} s window gives {fe.frames} log-mel frames; the CLAP audio tower in "
            f"'{path}' (spec_size {spec}, {mels} mel bins) takes at most {spec * max(ratio, 1)}"
        )
    return ClapFolder(fe, int(a["projection_dim"]), fusion)
