"""``manifest.json``: the versioned description of a build folder (torch-free).

It names every artifact with its SHA-256, the pipeline description (stages, I/O contracts, how
stages connect), the files the runtime needs beside the engines, and the tool versions. It is
what the runtime and non-Python services load.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from omniforge.errors import ManifestError, StageError
from omniforge.pipeline.spec import PipelineSpec, StageKind

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Artifact:
    """One file of the build, relative to the build folder."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class StageBuild:
    """How one stage was built: its ONNX file(s) and the settings that produced them."""

    file: str
    data_files: tuple[str, ...] = ()
    precision: str = "fp32"
    exporter: str = "torchscript"
    opset: int = 17
    nodes: int = 0
    # backend-specific graphs beside the canonical one, e.g. {"onnxruntime": "stages/llm.ort.onnx"}
    variants: dict[str, str] = field(default_factory=dict)


@dataclass
class Manifest:
    pipeline: PipelineSpec
    stages: dict[str, StageBuild]
    artifacts: dict[str, Artifact]  # path -> artifact
    files: dict[str, str] = field(default_factory=dict)  # role (e.g. "tokenizer") -> path
    source: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "source": self.source,
            "tools": self.tools,
            "pipeline": self.pipeline.to_dict(),
            "stages": {k: asdict(v) for k, v in self.stages.items()},
            "files": self.files,
            "artifacts": [asdict(a) for a in self.artifacts.values()],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if not isinstance(d, dict):
            raise ManifestError("manifest must be a JSON object")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema version {version!r} is not supported (this omniforge reads version "
                f"{SCHEMA_VERSION}); rebuild with this version"
            )
        try:
            pipeline = PipelineSpec.from_dict(d["pipeline"])
            stages = {
                k: StageBuild(**{**v, "data_files": tuple(v.get("data_files", ()))})
                for k, v in d["stages"].items()
            }
            artifacts = {a["path"]: Artifact(**a) for a in d["artifacts"]}
            files = dict(d.get("files", {}))
        except (KeyError, TypeError, ValueError, AttributeError, StageError) as exc:
            raise ManifestError(f"manifest is malformed ({type(exc).__name__}: {exc})") from None
        for p in artifacts:
            check_relative(p)
        for name, sb in stages.items():
            if name not in pipeline.stage_names:
                raise ManifestError(f"manifest builds stage '{name}', which its pipeline does not describe")
            for p in (sb.file, *sb.data_files, *sb.variants.values()):
                if p not in artifacts:
                    raise ManifestError(f"stage '{name}' names '{p}', which is not among the artifacts")
        for role, p in files.items():
            if p not in artifacts:
                raise ManifestError(f"file '{role}' -> '{p}' is not among the artifacts")
        return cls(
            pipeline, stages, artifacts, files, dict(d.get("source", {})), dict(d.get("tools", {})), version
        )


def check_relative(p: str) -> None:
    """Artifact paths must stay inside the build folder."""
    pp = PurePosixPath(p)
    if pp.is_absolute() or ".." in pp.parts or "\\" in p or not p:
        raise ManifestError(f"artifact path '{p}' leaves the build folder")


def stage_files(stages: dict[str, StageBuild]) -> list[str]:
    """Every file the stages name: canonical graphs, external data, backend variants."""
    return [p for sb in stages.values() for p in (sb.file, *sb.data_files, *sb.variants.values())]


def runtime_file(manifest: Manifest, name: str) -> str:
    """The graph ONNX Runtime serves for a stage: its ORT-lowered variant when it has one (same I/O
    contract); the LLM's variant has another contract (in-place cache) and only the LLM runtime uses it."""
    if name not in manifest.stages:
        raise StageError(f"this build has no stage '{name}' (it has: {', '.join(manifest.stages)})")
    sb = manifest.stages[name]
    if "onnxruntime" in sb.variants and manifest.pipeline.stage(name).kind is not StageKind.LLM:
        return sb.variants["onnxruntime"]
    return sb.file


def collect_artifacts(build: Path, paths: list[str]) -> dict[str, Artifact]:
    out = {}
    for p in sorted(set(paths)):
        f = build / p
        out[p] = Artifact(p, sha256_file(f), f.stat().st_size)
    return out


def write_manifest(build: Path, manifest: Manifest) -> Path:
    path = build / MANIFEST
    atomic_write_text(path, json.dumps(manifest.to_dict(), indent=2) + "\n")
    return path


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_manifest(build: str | Path, verify: bool = True) -> Manifest:
    """Read and validate a build's manifest; with ``verify``, check every artifact's SHA-256."""
    build = Path(build)
    path = build / MANIFEST
    if not path.is_file():
        raise ManifestError(f"'{build}' is not a build folder (no {MANIFEST})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc})") from None
    manifest = Manifest.from_dict(data)
    if verify:
        verify_artifacts(build, manifest)
    return manifest


def verify_artifacts(build: Path, manifest: Manifest) -> None:
    root = build.resolve()
    for a in manifest.artifacts.values():
        f = build / a.path
        if not f.resolve().is_relative_to(root):
            raise ManifestError(f"artifact '{a.path}' resolves outside the build folder")
        if not f.is_file():
            raise ManifestError(f"artifact '{a.path}' is missing from {build}")
        if f.stat().st_size != a.size or sha256_file(f) != a.sha256:
            raise ManifestError(
                f"artifact '{a.path}' does not match its SHA-256 in the manifest (corrupted or modified)"
            )
