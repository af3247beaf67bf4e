"""A model's conversation protocol: how a prompt with media is laid out, how generation stops,
and which hidden states its signal tokens hand to the output projectors (torch-free).

NExT-GPT's generation (``prepare_generation_embedding`` and ``generate_*`` in its
``anyToImageVideoAudio.py``) lays a request out as text segments, each starting with BOS, and media
items wrapped as ``embed('<Img>') + one projected row + embed('</Img>')`` for images, videos and
audio alike; it stops at ``###``; and it takes, for each generated signal token, the last-layer
hidden state of the step that *predicted* that token (one position earlier than in training),
together with the signal tokens' input embeddings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from omniforge.errors import ConfigError

SIGNAL_POSITIONS = ("predicting", "at_token")
MAX_TEXT = 256  # characters of one template string


@dataclass(frozen=True)
class TextPart:
    """Text tokenized without special tokens; ``bos``: a BOS row before it."""

    text: str
    bos: bool


@dataclass(frozen=True)
class MediaPart:
    """The projected rows of the ``index``-th media item of the request."""

    index: int


@dataclass(frozen=True)
class PromptProtocol:
    """The layout of one request. ``signal_position``: ``predicting`` reads the hidden state that
    predicted each signal token (NExT-GPT's generation); ``at_token`` the hidden state at the token."""

    user_prefix: str = "### Human: "
    assistant_prefix: str = "\n### Assistant:"
    media_open: str = "<Img>"
    media_close: str = "</Img>"
    bos_per_text_segment: bool = True
    stop_strings: tuple[str, ...] = ("###",)
    signal_position: str = "predicting"
    style: str = "nextgpt"

    def __post_init__(self) -> None:
        if self.signal_position not in SIGNAL_POSITIONS:
            raise ConfigError(
                f"protocol signal_position must be one of {', '.join(SIGNAL_POSITIONS)}, "
                f"got {self.signal_position!r}"
            )
        for name in ("user_prefix", "assistant_prefix", "media_open", "media_close", "style"):
            v = getattr(self, name)
            if not isinstance(v, str) or len(v) > MAX_TEXT or "\x00" in v:
                raise ConfigError(f"protocol {name} must be text of at most {MAX_TEXT} characters")
        if not isinstance(self.bos_per_text_segment, bool):
            raise ConfigError("protocol bos_per_text_segment must be true or false")
        if not isinstance(self.stop_strings, tuple) or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_TEXT for s in self.stop_strings
        ):
            raise ConfigError("protocol stop_strings must be a list of non-empty strings")

    def layout(self, prompt: str, num_media: int) -> list[TextPart | MediaPart]:
        """The parts of a request: without media, one text segment; with media, the user prefix,
        each item wrapped in ``media_open``/``media_close``, then the prompt and the assistant prefix."""
        bos = self.bos_per_text_segment
        if num_media == 0:
            return [TextPart(self.user_prefix + prompt + self.assistant_prefix, True)]
        parts: list[TextPart | MediaPart] = [TextPart(self.user_prefix.rstrip(), True)]
        for i in range(num_media):
            parts += [TextPart(self.media_open, False), MediaPart(i), TextPart(self.media_close, False)]
        parts.append(TextPart(prompt.lstrip() + self.assistant_prefix, bos))
        return parts

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop_strings"] = list(self.stop_strings)
        return d

    @classmethod
    def from_dict(cls, d: object) -> PromptProtocol:
        if not isinstance(d, dict):
            raise ConfigError(f"a protocol must be a JSON object, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"protocol has unknown keys {unknown[:5]}")
        d = dict(d)
        if "stop_strings" in d:
            if not isinstance(d["stop_strings"], list):
                raise ConfigError("protocol stop_strings must be a list of non-empty strings")
            d["stop_strings"] = tuple(d["stop_strings"])
        return cls(**d)


NEXTGPT = PromptProtocol()
