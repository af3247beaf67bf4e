"""The build's tokenizer through the ``tokenizers`` library (no transformers at run time)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from omniforge.errors import InputError, ManifestError


class TextTokenizer:
    """Encode prompts, decode generations, and name the special tokens of the build."""

    def __init__(self, tokenizer_json: Path, config_json: Path | None = None) -> None:
        try:
            self.tok = Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise ManifestError(f"cannot read tokenizer {tokenizer_json.name}: {exc}") from None
        cfg = json.loads(config_json.read_text()) if config_json and config_json.is_file() else {}
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False))
        self.vocab_size = self.tok.get_vocab_size()

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token) if self.eos_token else None

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise InputError(f"a prompt must be a string, got {type(text).__name__}")
        ids = self.tok.encode(text, add_special_tokens=True).ids
        bos = self.token_id(self.bos_token) if self.bos_token else None
        if self.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def _token_str(v: object) -> str | None:
    if isinstance(v, dict):  # {"content": "</s>", ...} in some tokenizer_config files
        v = v.get("content")
    return v if isinstance(v, str) else None
