"""``Build``: a verified build folder and the engines, tokenizer and configs it holds."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from omniforge.errors import ManifestError, StageError
from omniforge.pipeline.contracts import Role
from omniforge.pipeline.manifest import (
    Manifest,
    Variant,
    check_relative,
    load_manifest,
    read_verified,
    verify_file,
)
from omniforge.runtime.engine import Engine, GraphSource, SessionConfig
from omniforge.runtime.tokenizer import TextTokenizer


class Build:
    """Open a build folder; the manifest and every artifact's SHA-256 are checked first.

    Engines are created on first use and shared by all threads; ``release`` drops one (an edge
    device cannot keep every decoder resident). Every file is verified again when it is read for
    use: a session is created from the graph's bytes as hashed, so a file replaced after the build
    was opened is refused, never used.
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

    def read(self, rel: str) -> bytes:
        """An artifact's bytes, verified against the manifest as they are read."""
        return read_verified(self.path, self.manifest, rel)

    def json(self, role: str) -> dict[str, Any]:
        self.file(role)  # a clear error for a role the build does not have
        try:
            return json.loads(self.read(self.manifest.files[role]))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # also huge numbers, deep nesting
            raise ManifestError(
                f"'{self.manifest.files[role]}' is not valid JSON ({type(exc).__name__}: {str(exc)[:120]})"
            ) from None

    def graph(self, variant: Variant) -> GraphSource:
        """``variant``'s graph for a session: its verified bytes, and the folder its external data
        lies in (each external file must be one of the variant's listed, verified data files)."""
        data = self.read(variant.file)
        refs = external_data_refs(data, variant.file)
        unlisted = sorted(set(refs) - set(variant.data_files))
        if unlisted:
            raise ManifestError(
                f"graph '{variant.file}' reads external data {unlisted} that the manifest does not list for it"
            )
        for rel in refs:
            verify_file(self.path, self.manifest, rel)
        return GraphSource(data, (self.path / variant.file).parent if refs else None, variant.file)

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

    def verify_graphs(self) -> int:
        """Check every ONNX variant's external-data references against the manifest; how many graphs."""
        graphs = [v for sb in self.manifest.stages.values() for v in sb.variants if v.file.endswith(".onnx")]
        for v in graphs:
            self.graph(v)
        return len(graphs)

    def engine(self, name: str) -> Engine:
        """The stage's engine: its served variant (ORT-lowered or quantized when the build has one)."""
        with self._lock:
            if name not in self._engines:
                spec = self.pipeline.stage(name)
                served = self.manifest.stage_build(name).served()
                self._engines[name] = Engine(
                    self.graph(served), spec, self.session, self.manifest.contract(name, served)
                )
            return self._engines[name]

    def loaded(self) -> list[str]:
        return list(self._engines)

    def release(self, name: str) -> None:
        with self._lock:
            self._engines.pop(name, None)

    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            files = self.manifest.files  # read through the verifying reader, not reopened by path
            cfg = self.read(files["tokenizer_config"]) if "tokenizer_config" in files else None
            template = self.read(files["chat_template"]) if "chat_template" in files else None
            self.file("tokenizer")  # a clear error for a build without one
            self._tokenizer = TextTokenizer(self.read(files["tokenizer"]), cfg, template)
        return self._tokenizer


def external_data_refs(graph: bytes, rel: str) -> list[str]:
    """Build-relative paths of the external-data files a serialized graph reads."""
    import posixpath

    import onnx

    try:
        model = onnx.load_model_from_string(graph)  # external data is never read from bytes
    except Exception:  # protobuf raises several types for bytes that are not a model
        raise ManifestError(f"'{rel}' is not an ONNX graph") from None
    refs: set[str] = set()

    def visit(g: onnx.GraphProto) -> None:
        tensors = list(g.initializer)
        for node in g.node:
            for a in node.attribute:
                tensors += [a.t, *a.tensors]
                for sub in (a.g, *a.graphs):
                    visit(sub)
        for t in tensors:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                location = next((e.value for e in t.external_data if e.key == "location"), "")
                ref = posixpath.normpath(posixpath.join(posixpath.dirname(rel), location))
                check_relative(ref)
                refs.add(ref)

    visit(model.graph)
    return sorted(refs)
