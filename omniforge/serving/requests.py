"""Request tensors -> runtime options, and results -> response tensors (numpy only, no Triton).

A served model hands its request's input tensors here as ``{name: array}`` (one request, batch
axis removed); every value is checked before the runtime sees it, and a bad one is one
``InputError`` or ``ConfigError`` sentence that the server returns as the request's error.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from omniforge.errors import InputError
from omniforge.runtime.pipeline import DiffusionConfig, PipelineResult
from omniforge.runtime.sampling import GenerationConfig

Tensors = Mapping[str, np.ndarray]

MAX_MEDIA_BYTES = 256 << 20  # an encoded media file in a request; the decoders bound pixels and samples
MAX_TEXT_BYTES = 1 << 20  # a prompt or stop string, before it is tokenized (and bounded by the context)

# leading bytes -> file suffix, so the runtime's readers (and their bounds) take the media as files
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", 0, ".png"),
    (b"\xff\xd8\xff", 0, ".jpg"),
    (b"GIF87a", 0, ".gif"),
    (b"GIF89a", 0, ".gif"),
    (b"BM", 0, ".bmp"),
    (b"WEBP", 8, ".webp"),
    (b"WAVE", 8, ".wav"),
    (b"ftyp", 4, ".mp4"),
)
MEDIA_KINDS = {
    "image": (".png", ".jpg", ".gif", ".bmp", ".webp"),
    "audio": (".wav",),
    "video": (".gif", ".webp", ".mp4"),
}


def _one(tensors: Tensors, name: str) -> np.ndarray | None:
    a = tensors.get(name)
    if a is None:
        return None
    a = np.asarray(a)
    if a.size != 1:
        raise InputError(f"input '{name}' must hold exactly one value, got shape {list(a.shape)}")
    return a.reshape(())


def _decode(value: object, name: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, (bytes, np.bytes_)):
        raise InputError(f"input '{name}' must be a string (BYTES), got {type(value).__name__}")
    if len(value) > MAX_TEXT_BYTES:
        raise InputError(f"input '{name}' is {len(value)} bytes; at most {MAX_TEXT_BYTES} are taken")
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"input '{name}' is not valid UTF-8 text") from None


def text(tensors: Tensors, name: str) -> str | None:
    a = _one(tensors, name)
    return None if a is None else _decode(a.item(), name)


def texts(tensors: Tensors, name: str) -> list[str]:
    a = tensors.get(name)
    if a is None:
        return []
    return [_decode(v, name) for v in np.asarray(a).reshape(-1).tolist()]


def number(tensors: Tensors, name: str, kind: str) -> int | float | None:
    """A scalar input as a Python int (``kind`` "i": integer dtypes only) or float ("f")."""
    a = _one(tensors, name)
    if a is None:
        return None
    allowed = "iu" if kind == "i" else "iuf"
    if a.dtype.kind not in allowed:
        want = "an integer" if kind == "i" else "a number"
        raise InputError(f"input '{name}' must be {want}, got {a.dtype}")
    return int(a.item()) if kind == "i" else float(a.item())


def media(tensors: Tensors, name: str) -> bytes | None:
    """An encoded media file (PNG/JPEG/GIF/BMP/WebP image, WAV audio, GIF/WebP/MP4 video)."""
    a = _one(tensors, name)
    if a is None:
        return None
    v = a.item()
    if not isinstance(v, (bytes, np.bytes_)):
        raise InputError(f"input '{name}' must be the bytes of a file, got {type(v).__name__}")
    if len(v) > MAX_MEDIA_BYTES:
        raise InputError(f"input '{name}' is {len(v)} bytes; at most {MAX_MEDIA_BYTES >> 20} MiB are taken")
    return bytes(v)


def media_suffix(data: bytes, kind: str) -> str:
    """The file suffix ``data``'s leading bytes name, if it is a format ``kind`` takes."""
    for magic, at, suffix in _MAGIC:
        if data[at : at + len(magic)] == magic and suffix in MEDIA_KINDS[kind]:
            return suffix
    raise InputError(
        f"input '{kind}' is not a file format it takes ({', '.join(s[1:].upper() for s in MEDIA_KINDS[kind])})"
    )


def generation_config(tensors: Tensors) -> GenerationConfig:
    """The sampling options a request sets (the rest keep ``GenerationConfig``'s defaults)."""
    values: dict[str, object] = {}
    for name, kind in (
        ("max_new_tokens", "i"),
        ("temperature", "f"),
        ("top_k", "i"),
        ("top_p", "f"),
        ("repetition_penalty", "f"),
        ("seed", "i"),
    ):
        v = number(tensors, name, kind)
        if v is not None:
            values[name] = v
    stops = texts(tensors, "stop")
    if stops:
        values["stop_strings"] = tuple(stops)
    return GenerationConfig(**values)  # ConfigError for values out of range


def adapter(tensors: Tensors) -> str:
    """The LoRA adapter a request asks for (``auto`` when it names none)."""
    return text(tensors, "adapter") or "auto"


def prompt(tensors: Tensors) -> str:
    p = text(tensors, "prompt")
    if p is None:
        raise InputError("the request has no 'prompt'")
    return p


@dataclass
class PipelineRequest:
    """One any-to-any request, checked: what ``Pipeline.run`` takes."""

    prompt: str
    generation: GenerationConfig
    diffusion: DiffusionConfig
    force: list[str] = field(default_factory=list)
    media: dict[str, bytes] = field(default_factory=dict)  # modality -> encoded file
    adapter: str = "auto"  # the LoRA adapter: a name, auto or none

    @classmethod
    def parse(cls, tensors: Tensors) -> PipelineRequest:
        gen = generation_config(tensors)
        values: dict[str, object] = {"seed": gen.seed}  # one seed: sampling and the initial noise
        steps = number(tensors, "steps", "i")
        if steps is not None:
            values["steps"] = steps
        g = number(tensors, "guidance_scale", "f")
        if g is not None:
            values["guidance_scale"] = g
        sched = text(tensors, "scheduler")
        if sched is not None:
            values["scheduler"] = sched
        found = {m: media(tensors, m) for m in ("image", "audio", "video")}
        return cls(
            prompt(tensors),
            gen,
            DiffusionConfig(**values),  # ConfigError for values out of range
            texts(tensors, "force"),
            {m: b for m, b in found.items() if b is not None},
            adapter(tensors),
        )

    @contextlib.contextmanager
    def files(self) -> Iterator[dict[str, Path]]:
        """The request's media as files in a private temporary folder (removed afterwards)."""
        with tempfile.TemporaryDirectory(prefix="omniforge-request-") as tmp:
            paths = {}
            for m, data in self.media.items():
                p = Path(tmp) / f"{m}{media_suffix(data, m)}"
                p.write_bytes(data)
                paths[m] = p
            yield paths


def pipeline_outputs(result: PipelineResult) -> dict[str, np.ndarray]:
    """A pipeline result as the any2any model's output tensors (no batch axis)."""

    def stack(items: list[np.ndarray], rank: int) -> np.ndarray:
        if not items:
            return np.zeros((0,) + (0,) * (rank - 2) + ((3,) if rank > 2 else (0,)), np.float32)
        return np.stack(items).astype(np.float32)

    return {
        "text": np.array([result.text.encode()], dtype=object),
        "token_ids": np.asarray(result.generation.token_ids, np.int64),
        "signals": np.array([json.dumps(asdict(s)).encode() for s in result.signals], dtype=object),
        "images": stack(result.images, 4),
        "videos": stack(result.videos, 5),
        "audios": stack(result.audios, 2),
        "sample_rate": np.array([result.sample_rate], np.int32),
        "warnings": np.array([w.encode() for w in result.warnings], dtype=object),
    }
