"""``Build``: a verified build folder and the engines, tokenizer and configs it holds."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from omniforge.errors import ManifestError, StageError
from omniforge.pipeline.contracts import Role
from omniforge.pipeline.manifest import Manifest, Variant, load_manifest
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

    def stage_file(self, name: str, role: Role | str = Role.CANONICAL) -> Path:
        """The file of stage ``name``'s variant of ``role`` (default: its canonical graph)."""
        return self.variant(name, role)[0]

    def variant(self, name: str, role: Role | str) -> tuple[Path, Variant]:
        try:
            role = Role(role)
        except ValueError:
            raise StageError(
                f"'{role}' is not a variant role (roles: {', '.join(r.value for r in Role)})"
            ) from None
        v = self.manifest.variant(name, role)
        return self.path / v.file, v

    def served_file(self, name: str) -> Path:
        """The graph ONNX Runtime serves for stage ``name`` under the stage's own contract."""
        return self.path / self.manifest.stage_build(name).served().file

    def engine(self, name: str) -> Engine:
        """The stage's engine: its served variant (ORT-lowered or quantized when the build has one)."""
        with self._lock:
            if name not in self._engines:
                spec = self.pipeline.stage(name)
                served = self.manifest.stage_build(name).served()
                self._engines[name] = Engine(
                    self.path / served.file, spec, self.session, self.manifest.contract(name, served)
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
