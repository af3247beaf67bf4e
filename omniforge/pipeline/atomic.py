"""Atomic replacement of files and build folders: write a temporary sibling, swap it in when complete.

The temporaries are created with the modes any other tool would give the final path (folders
0o777 and files 0o666, less the umask), not ``tempfile``'s private 0o700 / 0o600, because they
are renamed into place rather than copied.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_ATTEMPTS = 100
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation


def temp_file(folder: Path, prefix: str) -> tuple[int, Path]:
    """A new empty file in ``folder`` opened for writing (fd, path), mode 0o666 less the umask."""
    for _ in range(_ATTEMPTS):
        path = Path(folder) / f"{prefix}{secrets.token_hex(4)}.tmp"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for '{prefix}' in {folder}")


def temp_folder(parent: Path, prefix: str) -> Path:
    """A new empty folder in ``parent``, mode 0o777 less the umask."""
    for _ in range(_ATTEMPTS):
        path = Path(parent) / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir(0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for '{prefix}' in {parent}")


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; when the block succeeds it replaces
    ``target`` (whose old content is then deleted); when it fails or is interrupted it is removed
    and ``target`` is left exactly as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder(target.parent, f".{target.name}.tmp-")
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{time.time_ns()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
