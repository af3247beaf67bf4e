"""The build's tokenizer through the ``tokenizers`` library (no transformers at run time)."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from omniforge.errors import ContextLengthError, InputError, ManifestError
from omniforge.runtime.chat_template import CHAT_TEMPLATE_FILE, ChatPrompt, ChatTemplate, token_text


@dataclass(frozen=True)
class SignalEvent:
    """A signal token the model generated: the modality it asks for, the token, and its position
    among the generated tokens."""

    modality: str
    token: str
    index: int


class TextTokenizer:
    """Encode prompts, decode generations, name the special tokens of the build, and hold its chat
    template (``omniforge.runtime.chat_template``)."""

    def __init__(
        self,
        tokenizer_json: Path | bytes,
        config_json: Path | bytes | None = None,
        chat_template_jinja: Path | bytes | None = None,
    ) -> None:
        """From files, or from bytes already read and verified (a build's ``Build.read``).
        ``chat_template_jinja``: a ``chat_template.jinja`` beside the config (a path that does not
        exist: none), which wins over the config's ``chat_template``."""
        name = tokenizer_json.name if isinstance(tokenizer_json, Path) else "tokenizer.json"
        try:
            data = tokenizer_json.read_bytes() if isinstance(tokenizer_json, Path) else tokenizer_json
            self.tok = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise ManifestError(f"cannot read tokenizer {name}: {str(exc)[:200]}") from None
        cfg_name = config_json.name if isinstance(config_json, Path) else "tokenizer_config.json"
        try:
            if isinstance(config_json, Path):
                config_json = config_json.read_bytes() if config_json.is_file() else None
            cfg = json.loads(config_json) if config_json is not None else {}
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ManifestError(f"cannot read tokenizer config {cfg_name} ({type(exc).__name__})") from None
        if not isinstance(cfg, dict):
            raise ManifestError(f"tokenizer config {cfg_name} is not a JSON object")
        self.eos_token = token_text(cfg.get("eos_token"))
        self.bos_token = token_text(cfg.get("bos_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False))
        self.config = cfg
        self.chat_template_text = _read_template(chat_template_jinja)
        self._chat_template: ChatTemplate | None = None
        self.vocab_size = self.tok.get_vocab_size()
        # the most characters one token stands for: a text longer than a context's worth cannot fit
        self.max_token_chars = max((len(t) for t in self.tok.get_vocab(with_added_tokens=True)), default=1)

    @property
    def has_chat_template(self) -> bool:
        """Whether the tokenizer comes with a chat template (``chat_template`` checks its form)."""
        return self.chat_template_text is not None or self.config.get("chat_template") is not None

    @property
    def chat_template(self) -> ChatTemplate | None:
        """The chat template (None: the tokenizer has none); ``ConfigError`` for a malformed one."""
        if self._chat_template is None:
            self._chat_template = ChatTemplate.from_config(self.config, self.chat_template_text)
        return self._chat_template

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token) if self.eos_token else None

    def encode(self, text: str, max_tokens: int | None = None, special: bool = True) -> list[int]:
        """Token ids of ``text``, which must be valid Unicode; a text too long to fit ``max_tokens``
        however it is split is refused before it is tokenized. ``special=False``: no BOS or other
        special tokens added (a protocol's text segments, and always a ``ChatPrompt``, which holds
        the special tokens its template wrote)."""
        if isinstance(text, ChatPrompt):
            special = False
        if not isinstance(text, str):
            raise InputError(f"a prompt must be a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(
                f"the prompt is not valid Unicode text: character {exc.start} is an unpaired surrogate"
            ) from None
        if max_tokens is not None and len(text) > 4 * max_tokens * self.max_token_chars:
            raise ContextLengthError(
                f"the prompt has {len(text)} characters, too many to fit however it is split: "
                f"the context holds {max_tokens} tokens"
            )
        ids = self.tok.encode(text, add_special_tokens=special).ids
        bos = self.token_id(self.bos_token) if self.bos_token else None
        if special and self.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token(self, token_id: int) -> str:
        return self.tok.id_to_token(token_id) or f"<{token_id}>"

    def visible_text(self, ids: list[int], hidden: Collection[int] = ()) -> str:
        """The text a reader sees: special tokens and the ``hidden`` ids (signal tokens and media
        placeholders, which a model may hold as ordinary added tokens) left out."""
        return self.tok.decode([t for t in ids if t not in hidden], skip_special_tokens=True)

    def signal_events(self, ids: list[int], signal_ids: Mapping[int, str]) -> list[SignalEvent]:
        """The signal tokens among generated ``ids``, in order."""
        return [SignalEvent(signal_ids[t], self.token(t), i) for i, t in enumerate(ids) if t in signal_ids]


def _read_template(source: Path | bytes | None) -> str | None:
    """The text of a ``chat_template.jinja`` (None: not given, or a path with no file)."""
    if isinstance(source, Path):
        if not source.is_file():
            return None
        try:
            source = source.read_bytes()
        except OSError as exc:
            raise ManifestError(f"cannot read {CHAT_TEMPLATE_FILE} ({type(exc).__name__})") from None
    if source is None:
        return None
    try:
        return source.decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestError(f"the chat template {CHAT_TEMPLATE_FILE} is not UTF-8 text") from None
