"""Small helpers shared by subcommands."""

from __future__ import annotations

import sys
from pathlib import Path


def log(msg: str) -> None:
    """Progress goes to stderr so stdout stays clean for results."""
    print(msg, file=sys.stderr, flush=True)


def resolve_model(path: str | None) -> Path:
    """The model folder a command works on: the given path, or the embedded default."""
    if path:
        return Path(path)
    from omniforge.model.tiny import default_model_dir, ensure_default

    if not (default_model_dir() / "nextgpt.json").is_file():
        log(f"creating the embedded tiny NExT-GPT in {default_model_dir()} ...")
    return ensure_default()


def split_list(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]
