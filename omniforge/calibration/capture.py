"""Calibration data captured from the pipeline itself.

The FP32 build runs end to end on calibration inputs (prompts, images, audio) with every decoder
forced, and each stage's real inputs are recorded as the runtime makes them: encoder pixels and
log-mels, projector inputs (real encoder outputs), the LLM's prompt rows (text and media prefix),
output-projector inputs (real signal-token hidden states), UNet inputs over the whole denoising
trajectory (every timestep, both classifier-free-guidance branches in one batch), VAE latents and
vocoder mels. They are stored as ``calibration/<stage>.npz`` with ``calibration.json`` (the
inputs' digest and counts), so a re-run with the same inputs reuses them.

Every fourth recorded call of a stage is held out: quantization is calibrated on the others and
its accuracy measured on the held-out ones.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omniforge.calibration.corpus import calibration_lines
from omniforge.errors import ConfigError, InputError
from omniforge.pipeline.atomic import atomic_folder
from omniforge.runtime.media import write_wav

Feeds = dict[str, np.ndarray]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
HOLDOUT_EVERY = 4


@dataclass
class CalibrationInputs:
    """What the FP32 pipeline is run on: prompts, images (paths or (H, W, 3) uint8), WAV paths."""

    prompts: list[str]
    images: list[Path | np.ndarray] = field(default_factory=list)
    audios: list[Path] = field(default_factory=list)
    steps: int = 8  # denoising steps per decoder call
    max_per_stage: int = 64  # recorded calls kept per stage (evenly spaced)

    @classmethod
    def default(cls, count: int = 8) -> CalibrationInputs:
        """Prompts from the text shipped with omniforge and seeded synthetic images (WAVs: see ``run``)."""
        prompts = calibration_lines()[:count]
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:64, 0:64] / 63.0
        images: list[Path | np.ndarray] = []
        for i in range(max(1, count // 2)):
            base = np.stack([xx * (i % 3 == 0), yy, (xx + yy) / 2], -1) * 200
            images.append(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
        return cls(prompts, images)

    @classmethod
    def from_folder(cls, folder: str | Path, steps: int = 8) -> CalibrationInputs:
        """``prompts.jsonl`` ({"prompt": ...} per line) or ``prompts.txt``, images and ``*.wav`` files."""
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"calibration folder '{folder}' does not exist")
        prompts: list[str] = []
        if (folder / "prompts.jsonl").is_file():
            for i, line in enumerate((folder / "prompts.jsonl").read_text().splitlines()):
                if not line.strip():
                    continue
                try:
                    prompts.append(str(json.loads(line)["prompt"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise InputError(
                        f"{folder / 'prompts.jsonl'} line {i + 1} is not a JSON object with a 'prompt'"
                    ) from None
        elif (folder / "prompts.txt").is_file():
            prompts = [ln for ln in (folder / "prompts.txt").read_text().splitlines() if ln.strip()]
        if not prompts:
            raise InputError(
                f"calibration folder '{folder}' has no prompts.jsonl or prompts.txt with prompts"
            )
        files = sorted(folder.iterdir())
        images: list[Path | np.ndarray] = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        audios = [p for p in files if p.suffix.lower() == ".wav"]
        return cls(prompts, images, audios, steps)

    def digest(self) -> str:
        h = hashlib.sha256(json.dumps([self.prompts, self.steps, self.max_per_stage]).encode())
        for item in [*self.images, *self.audios]:
            h.update(item.tobytes() if isinstance(item, np.ndarray) else Path(item).read_bytes())
        return h.hexdigest()[:24]


def _synthetic_wavs(folder: Path, count: int, sr: int = 16000) -> list[Path]:
    """Seeded chirps and tones with noise: audio the encoders have a range for."""
    rng = np.random.default_rng(1)
    t = np.arange(sr) / sr
    out = []
    for i in range(count):
        f0, f1 = 200 + 150 * i, 800 + 300 * i
        wav = 0.4 * np.sin(2 * np.pi * (f0 + (f1 - f0) * t / 2) * t) + 0.05 * rng.standard_normal(sr)
        out.append(write_wav(folder / f"calib_{i}.wav", wav.astype(np.float32), sr))
    return out


def capture(
    build: str | Path,
    dest: str | Path,
    inputs: CalibrationInputs | None = None,
    salt: str = "",
    log: Callable[[str], None] = print,
) -> Path:
    """Run ``build`` (FP32) on ``inputs`` and write every stage's recorded inputs to ``dest``.

    Reuses ``dest`` when it already holds a capture of the same inputs (and ``salt``: the build's
    fingerprint).
    """
    from omniforge.runtime.pipeline import MODALITIES, DiffusionConfig, Pipeline
    from omniforge.runtime.sampling import GenerationConfig

    inputs = inputs or CalibrationInputs.default()
    dest = Path(dest)
    digest = inputs.digest() + salt
    if (dest / "calibration.json").is_file():
        if json.loads((dest / "calibration.json").read_text()).get("digest") == digest:
            log(f"calibration: reusing {dest}")
            return dest
    if not inputs.prompts:
        raise ConfigError("calibration needs at least one prompt")
    pipe = Pipeline(build, num_slots=1)
    recorded: dict[str, list[Feeds]] = {}
    pipe.recorder = lambda stage, feeds: recorded.setdefault(stage, []).append(
        {k: np.array(v, copy=True) for k, v in feeds.items()}
    )
    produce = sorted(pipe.modalities_in())
    with tempfile.TemporaryDirectory() as td:
        audios = list(inputs.audios)
        if not audios and pipe.build.has_stage("audio_encoder"):
            audios = _synthetic_wavs(Path(td), max(1, len(inputs.prompts) // 2))
        for i, prompt in enumerate(inputs.prompts):
            image = inputs.images[i % len(inputs.images)] if inputs.images and i % 2 == 0 else None
            audio = audios[i % len(audios)] if audios and i % 2 == 1 else None
            if image is not None and not pipe.build.has_stage("image_encoder"):
                image = None
            pipe.run(
                prompt,
                image=image,
                audio=audio,
                generation=GenerationConfig(max_new_tokens=8),
                diffusion=DiffusionConfig(steps=inputs.steps, seed=i),
                force=[m for m in produce if m in MODALITIES],
            )
    with atomic_folder(dest) as tmp:
        counts = {}
        for stage, calls in recorded.items():
            if len(calls) > inputs.max_per_stage:
                keep = np.linspace(0, len(calls) - 1, inputs.max_per_stage).round().astype(int)
                calls = [calls[k] for k in keep]
            arrays = {f"{i}/{name}": v for i, feeds in enumerate(calls) for name, v in feeds.items()}
            np.savez(tmp / f"{stage}.npz", **arrays)
            counts[stage] = len(calls)
        (tmp / "calibration.json").write_text(
            json.dumps({"digest": digest, "steps": inputs.steps, "calls": counts}, indent=2) + "\n"
        )
    log(f"calibration: captured {sum(counts.values())} stage calls over {len(counts)} stages into {dest}")
    return dest


def load(folder: str | Path, stage: str) -> tuple[list[Feeds], list[Feeds]]:
    """(calibration feeds, held-out feeds) recorded for ``stage``; empty lists when none were.
    With fewer than four recorded calls nothing is held out and the last calibration feed stands in."""
    path = Path(folder) / f"{stage}.npz"
    if not path.is_file():
        return [], []
    with np.load(path) as z:
        calls: dict[int, Feeds] = {}
        for key in z.files:
            i, name = key.split("/", 1)
            calls.setdefault(int(i), {})[name] = z[key]
    ordered = [calls[i] for i in sorted(calls)]
    held = [f for i, f in enumerate(ordered) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    calib = [f for i, f in enumerate(ordered) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    return calib, held or calib[-1:]
