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
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omniforge.calibration.corpus import calibration_lines
from omniforge.errors import ConfigError, InputError
from omniforge.pipeline.atomic import atomic_folder
from omniforge.runtime.media import load_image, load_wav, write_wav

Feeds = dict[str, np.ndarray]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
HOLDOUT_EVERY = 4
MAX_CALIBRATION_PROMPTS = 10_000  # prompts read from a calibration folder
MAX_CALIBRATION_FILES = 10_000  # images, and WAV files, in a calibration folder
MAX_PROMPTS_BYTES = 64 << 20  # size of prompts.jsonl / prompts.txt


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
        """``prompts.jsonl`` ({"prompt": ...} per line) or ``prompts.txt``, images and ``*.wav`` files.

        Everything is checked here, before any capture starts: each prompt line, the counts (at most
        ``MAX_CALIBRATION_PROMPTS`` prompts and ``MAX_CALIBRATION_FILES`` images and WAVs each) and
        every media file (decoded as the runtime will); a problem is one ``InputError`` naming the
        file and, for prompts, the line."""
        folder = Path(folder)
        try:
            if not folder.is_dir():
                raise InputError(f"calibration folder '{folder}' does not exist or is not a folder")
            names = _media_names(folder)
        except OSError as exc:
            raise InputError(
                f"calibration folder '{folder}' cannot be read ({exc.strerror or exc})"
            ) from None
        prompts = _read_prompts(folder)
        images: list[Path | np.ndarray] = []
        audios: list[Path] = []
        for name in sorted(names):
            path = folder / name
            try:
                if path.suffix.lower() == ".wav":
                    load_wav(path, max_seconds=0.01)  # header, format and the first samples
                    audios.append(path)
                else:
                    load_image(path)
                    images.append(path)
            except InputError as exc:
                raise InputError(f"{exc} (calibration folder '{folder}')") from None
        return cls(prompts, images, audios, steps)

    def digest(self) -> str:
        h = hashlib.sha256(json.dumps([self.prompts, self.steps, self.max_per_stage]).encode())
        for item in [*self.images, *self.audios]:
            h.update(item.tobytes() if isinstance(item, np.ndarray) else Path(item).read_bytes())
        return h.hexdigest()[:24]


def _media_names(folder: Path) -> list[str]:
    """Names of the images and WAVs in ``folder``, at most ``MAX_CALIBRATION_FILES`` of each."""
    counts = {"images": 0, "WAV files": 0}
    names = []
    for entry in os.scandir(folder):
        suffix = Path(entry.name).suffix.lower()
        kind = "WAV files" if suffix == ".wav" else "images" if suffix in IMAGE_SUFFIXES else None
        if kind is None:
            continue
        counts[kind] += 1
        if counts[kind] > MAX_CALIBRATION_FILES:
            raise InputError(
                f"calibration folder '{folder}' holds more than {MAX_CALIBRATION_FILES:,} {kind}, "
                "the most calibration takes"
            )
        names.append(entry.name)
    return names


def _read_prompts(folder: Path) -> list[str]:
    """The prompts of ``prompts.jsonl`` or else ``prompts.txt``, every line checked."""
    jsonl = folder / "prompts.jsonl"
    path = jsonl if os.path.lexists(jsonl) else folder / "prompts.txt"
    if not os.path.lexists(path):
        raise InputError(f"calibration folder '{folder}' has no prompts.jsonl or prompts.txt")
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"calibration prompts '{path}' is not a regular file")
        if st.st_size > MAX_PROMPTS_BYTES:
            raise InputError(
                f"calibration prompts '{path}' has {st.st_size:,} bytes, more than {MAX_PROMPTS_BYTES:,}"
            )
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"calibration prompts '{path}' cannot be read ({exc.strerror or exc})") from None
    prompts: list[str] = []
    for n, line in enumerate(raw.removeprefix(b"\xef\xbb\xbf").splitlines(), 1):
        where = f"{path} line {n}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{where} is not UTF-8 text") from None
        if not text.strip():
            continue
        prompt = _jsonl_prompt(text, where) if path == jsonl else text
        if len(prompts) == MAX_CALIBRATION_PROMPTS:
            raise InputError(
                f"{where}: more than {MAX_CALIBRATION_PROMPTS:,} prompts, the most calibration takes"
            )
        prompts.append(prompt)
    if not prompts:
        raise InputError(f"calibration prompts '{path}' holds no prompts")
    return prompts


def _jsonl_prompt(text: str, where: str) -> str:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        raise InputError(f"{where} is not valid JSON") from None
    except ValueError:  # an integer of more digits than Python converts
        raise InputError(f"{where} holds an integer with more digits than can be read") from None
    except RecursionError:
        raise InputError(f"{where} nests arrays or objects too deep to read") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where} is not a JSON object")
    if "prompt" not in obj:
        raise InputError(f"{where} has no 'prompt' key")
    prompt = obj["prompt"]
    if not isinstance(prompt, str):
        kind = "null" if prompt is None else "true or false" if isinstance(prompt, bool) else "not text"
        kind = "a number" if type(prompt) in (int, float) else kind
        raise InputError(f"{where} has a 'prompt' that is {kind}, not a string")
    if not prompt.strip():
        raise InputError(f"{where} has an empty 'prompt'")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{where} has a 'prompt' that is not valid Unicode (a lone surrogate)") from None
    return prompt


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
