"""The build cache's plumbing: the model folder's content digest, entries shared safely between
concurrent builds, and the removal of temporary folders that killed builds left behind.

File hashes are indexed by path with the file's (size, mtime_ns, ctime_ns, inode), so an unchanged
file is never read again while any change to it (an in-place edit with the same size included:
writing updates mtime and ctime) is re-hashed. The index is replaced atomically and a damaged one
counts as empty. Each entry is made under a per-entry lock, so a second build waits for the first
instead of redoing the step, and an entry that appears while a step ran is accepted.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from omniforge.pipeline.manifest import MANIFEST, atomic_write_text, sha256_file

INDEX_VERSION = 1
# a file modified this recently may be modified again within the same mtime tick: hash it, do not index it
RACY_S = 2.0
STALE_S = 3600.0  # a temporary folder without a recorded owner is stale after this long
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?:(?P<pid>\d+)-)?")


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def read_index(path: Path) -> dict[str, list]:
    """The file-hash index: absolute path -> [size, mtime_ns, ctime_ns, inode, sha256]; empty when
    missing, truncated or otherwise unreadable (it is only a memo)."""
    try:
        data = json.loads(path.read_text())
        files = data["files"] if data.get("version") == INDEX_VERSION else {}
        return {k: v for k, v in files.items() if isinstance(v, list) and len(v) == 5}
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError, KeyError):
        return {}


def folder_digest(root: Path, index_path: Path) -> str:
    """SHA-256 over every file of a model folder (relative paths and contents), reading only the
    files whose stamp differs from the index."""
    index = read_index(index_path)
    changed = False
    h = hashlib.sha256()
    now = time.time_ns()
    for f in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        st = f.stat()
        key, stamp = str(f.resolve()), _stamp(st)
        entry = index.get(key)
        if entry is not None and entry[:4] == stamp:
            digest = entry[4]
        else:
            digest = sha256_file(f)
            if now - st.st_mtime_ns > RACY_S * 1e9:
                index[key] = [*stamp, digest]
                changed = True
        h.update(f"{f.relative_to(root).as_posix()}:{digest}\n".encode())
    if changed:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(index_path, json.dumps({"version": INDEX_VERSION, "files": index}))
    return h.hexdigest()


def temp_folder(parent: Path, name: str, kind: str = "tmp") -> Path:
    """A new hidden folder beside ``parent / name`` whose name records this process's id."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}.{kind}-{os.getpid()}-", dir=parent))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _is_stale(path: Path, pid: str | None, now: float) -> bool:
    if pid is not None and int(pid) != os.getpid():
        return not _pid_alive(int(pid))
    if pid is not None:
        return False
    try:
        return now - path.stat().st_mtime > STALE_S
    except FileNotFoundError:
        return False


def clean_stale(folder: Path, name: str | None = None, log: Callable[[str], None] = print) -> list[Path]:
    """Remove the hidden ``.NAME.tmp-*`` / ``.NAME.old-*`` folders in ``folder`` (of ``name`` only,
    if given) whose owning process is gone, or, without a recorded owner, older than an hour."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if not m or (name is not None and m["name"] != name) or not p.is_dir() or p.is_symlink():
            continue
        if _is_stale(p, m["pid"], now):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        log(f"removed {len(removed)} stale temporary folder(s) in {folder}")
    return removed


@contextmanager
def entry_lock(root: Path, name: str) -> Iterator[None]:
    """An exclusive lock on one cache entry; released when the holder exits, even by SIGKILL."""
    locks = root / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_entry(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def cached(root: Path, name: str, make: Callable[[Path], None], log: Callable[[str], None]) -> Path:
    """The cache entry ``name``, made by ``make(path)`` into a temporary folder when missing.

    Concurrent builds wait on the entry's lock; the one that finds the entry made meanwhile reuses it."""
    path = root / name
    step = name.split("-")[0]
    if is_entry(path):
        log(f"{step}: up to date (cached)")
        return path
    with entry_lock(root, name):
        if is_entry(path):
            log(f"{step}: up to date (made meanwhile by another build)")
            return path
        tmp = temp_folder(root, name)
        log(f"{step}: running")  # one line per long step; its items update a status line
        try:
            make(tmp / "build")
            _discard(path)  # a leftover without a manifest is not an entry
            (tmp / "build").rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _discard(path: Path) -> None:
    """Move ``path`` aside (one rename) and delete it."""
    if not path.exists():
        return
    old = temp_folder(path.parent, path.name, "old")
    path.rename(old / "entry")
    shutil.rmtree(old, ignore_errors=True)


def discard_entry(path: Path) -> None:
    """Drop a damaged entry so that the next lookup remakes it."""
    with entry_lock(path.parent, path.name):
        _discard(path)
