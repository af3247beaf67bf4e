"""``Build``: a verified build folder and the engines, tokenizer and configs it holds."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from omniforge.errors import ManifestError, StageError
from omniforge.pipeline.manifest import Manifest, load_manifest, runtime_file
from omniforge.runtime.engine import Engine, SessionConfig
from omniforge.runtime.tokenizer import TextTokenizer


class Build:
    """Open a build folder; the manifest and every artifact's SHA-256 are checked first.

    Engines are created on first use and shared by all threads; ``release`` drops one (an edge
    device cannot keep every decoder resident).
    """

    def __init__(self, path: str | Path, session: SessionConfig | None = None, verify: bool = True) -> None:
        self.path = Path(path)
        self.manifest: Manifest = load_manifest(self.path, verify=verify)
        self.session = session or SessionConfig()
        self._engines: dict[str, Engine] = {}
        self._lock = threading.Lock()
        self._tokenizer: TextTokenizer | None = None

    @property
    def pipeline(self):
        return self.manifest.pipeline

    def has_stage(self, name: str) -> bool:
        return name in self.manifest.stages

    def artifact(self, rel: str) -> Path:
        return self.path / rel

    def file(self, role: str) -> Path:
        if role not in self.manifest.files:
            raise ManifestError(f"this build has no '{role}' file (it holds: {sorted(self.manifest.files)})")
        return self.path / self.manifest.files[role]

    def json(self, role: str) -> dict[str, Any]:
        return json.loads(self.file(role).read_text())

    def stage_file(self, name: str, variant: str | None = None) -> Path:
        if name not in self.manifest.stages:
            raise StageError(f"this build has no stage '{name}' (it has: {', '.join(self.manifest.stages)})")
        sb = self.manifest.stages[name]
        if variant is None:
            return self.path / sb.file
        if variant not in sb.variants:
            raise StageError(
                f"stage '{name}' has no '{variant}' variant (it has: {sorted(sb.variants) or 'none'})"
            )
        return self.path / sb.variants[variant]

    def engine(self, name: str) -> Engine:
        """The stage's engine; its ONNX Runtime-lowered graph when the build has one (same contract)."""
        with self._lock:
            if name not in self._engines:
                spec = self.pipeline.stage(name)
                self.stage_file(name)  # a clear error for a stage the build does not hold
                self._engines[name] = Engine(
                    self.path / runtime_file(self.manifest, name), spec, self.session.one_shot()
                )
            return self._engines[name]

    def loaded(self) -> list[str]:
        return list(self._engines)

    def release(self, name: str) -> None:
        with self._lock:
            self._engines.pop(name, None)

    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            cfg = self.file("tokenizer_config") if "tokenizer_config" in self.manifest.files else None
            self._tokenizer = TextTokenizer(self.file("tokenizer"), cfg)
        return self._tokenizer
