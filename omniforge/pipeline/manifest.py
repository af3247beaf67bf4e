"""``manifest.json``: the versioned description of a build folder (torch-free).

It names every artifact with its SHA-256, the pipeline description (stages, I/O contracts, how
stages connect), the files the runtime needs beside the engines, and the tool versions. It is
what the runtime and non-Python services load.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from omniforge.errors import ManifestError, StageError
from omniforge.pipeline.atomic import temp_file
from omniforge.pipeline.contracts import Contract, Role, llm_inplace_contract
from omniforge.pipeline.spec import PipelineSpec, StageKind, StageSpec

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 is upgraded in memory when read, never rewritten
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
class Variant:
    """One graph (or engine) of a stage: its file, what it is for, its precision and its contract.

    ``contract`` None means the stage's own contract (``"contract": "stage"`` in the file)."""

    role: Role
    file: str
    precision: str = "fp32"
    data_files: tuple[str, ...] = ()
    contract: Contract | None = None
    adapter: str | None = None  # a LoRA adapter merged into this variant (the LLM's merged variants)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "role": str(self.role),
            "file": self.file,
            "precision": self.precision,
            "data_files": list(self.data_files),
            "contract": self.contract.to_dict() if self.contract else "stage",
        }
        if self.adapter is not None:
            d["adapter"] = self.adapter
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Variant:
        c = d.get("contract", "stage")
        return cls(
            role=Role(d["role"]),
            file=d["file"],
            precision=d.get("precision", "fp32"),
            data_files=tuple(d.get("data_files", ())),
            contract=None if c == "stage" else Contract.from_dict(c),
            adapter=None if d.get("adapter") is None else str(d["adapter"]),
        )


@dataclass(frozen=True)
class StageBuild:
    """How one stage was built: its variants and the settings that produced the canonical graph.

    ``precision`` is the precision the stage is served at (its quantized variants' precision)."""

    variants: tuple[Variant, ...]
    precision: str = "fp32"
    exporter: str = "torchscript"
    opset: int = 17
    nodes: int = 0

    def variant(self, role: Role) -> Variant | None:
        """The variant of ``role`` (never a variant with a LoRA adapter merged in)."""
        return next((v for v in self.variants if v.role is role and v.adapter is None), None)

    def merged(self) -> dict[str, Variant]:
        """The in-place LLM variants with a LoRA adapter merged in, by adapter."""
        return {v.adapter: v for v in self.variants if v.adapter is not None}

    def require(self, role: Role, stage: str = "") -> Variant:
        v = self.variant(role)
        if v is None:
            have = ", ".join(str(v.role) for v in self.variants)
            raise StageError(f"stage '{stage}' has no '{role}' variant (it has: {have})")
        return v

    def with_variant(self, v: Variant) -> StageBuild:
        """This stage with ``v`` replacing the variant of the same role and adapter (or added)."""
        kept = tuple(x for x in self.variants if (x.role, x.adapter) != (v.role, v.adapter))
        return replace(self, variants=(*kept, v))

    @property
    def canonical(self) -> Variant:
        return self.require(Role.CANONICAL)

    @property
    def file(self) -> str:
        """The canonical graph's file."""
        return self.canonical.file

    @property
    def data_files(self) -> tuple[str, ...]:
        return self.canonical.data_files

    def files(self) -> list[str]:
        return [p for v in self.variants for p in (v.file, *v.data_files)]

    def served(self) -> Variant:
        """The graph ONNX Runtime serves under the stage's own contract: its ``ort`` variant when
        it has one (lowered, FP16 or INT8), else the canonical graph."""
        return self.variant(Role.ORT) or self.canonical

    def runtime_variant(self) -> Variant:
        """What omniforge's runtime loads for this stage: the in-place LLM graph where the stage
        has one, else ``served()``."""
        return self.variant(Role.ORT_INPLACE_LLM) or self.served()

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "exporter": self.exporter,
            "opset": self.opset,
            "nodes": self.nodes,
            "variants": [v.to_dict() for v in self.variants],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageBuild:
        return cls(
            variants=tuple(Variant.from_dict(v) for v in d["variants"]),
            precision=d.get("precision", "fp32"),
            exporter=d.get("exporter", "torchscript"),
            opset=int(d.get("opset", 17)),
            nodes=int(d.get("nodes", 0)),
        )


def canonical_stage(
    file: str,
    data_files: tuple[str, ...] = (),
    exporter: str = "torchscript",
    opset: int = 17,
    nodes: int = 0,
) -> StageBuild:
    """A freshly exported stage: one canonical FP32 variant."""
    return StageBuild(
        (Variant(Role.CANONICAL, file, "fp32", tuple(data_files)),), "fp32", exporter, opset, nodes
    )


@dataclass
class Manifest:
    pipeline: PipelineSpec
    stages: dict[str, StageBuild]
    artifacts: dict[str, Artifact]  # path -> artifact
    files: dict[str, str] = field(default_factory=dict)  # role (e.g. "tokenizer") -> path
    source: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    read_version: int = SCHEMA_VERSION  # the version the file had (1 is upgraded in memory)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "source": self.source,
            "tools": self.tools,
            "pipeline": self.pipeline.to_dict(),
            "stages": {k: v.to_dict() for k, v in self.stages.items()},
            "files": self.files,
            "artifacts": [asdict(a) for a in self.artifacts.values()],
        }

    def stage_build(self, name: str) -> StageBuild:
        if name not in self.stages:
            raise StageError(f"this build has no stage '{name}' (it has: {', '.join(self.stages)})")
        return self.stages[name]

    def served_bytes(self, name: str) -> int:
        """The bytes of the graph the runtime serves for stage ``name``, external data included."""
        v = self.stage_build(name).runtime_variant()
        return sum(self.artifacts[p].size for p in (v.file, *v.data_files))

    def variant(self, name: str, role: Role) -> Variant:
        """The stage's variant of ``role``; ``StageError`` when it has none."""
        return self.stage_build(name).require(role, name)

    def contract(self, name: str, variant: Variant) -> Contract:
        """The I/O contract ``variant`` of stage ``name`` is bound by."""
        return variant.contract or Contract.of_stage(self.pipeline.stage(name))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if not isinstance(d, dict):
            raise ManifestError("manifest must be a JSON object")
        version = d.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise ManifestError(
                f"manifest schema version {version!r} is not supported (this omniforge reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}); rebuild with this version"
            )
        try:
            pipeline = PipelineSpec.from_dict(d["pipeline"])
            if version == 1:
                stages = {k: _upgrade_v1_stage(v, pipeline.stage(k)) for k, v in d["stages"].items()}
            else:
                stages = {k: StageBuild.from_dict(v) for k, v in d["stages"].items()}
            artifacts = {a["path"]: Artifact(**a) for a in d["artifacts"]}
            files = dict(d.get("files", {}))
        except (KeyError, TypeError, ValueError, AttributeError, StageError) as exc:
            raise ManifestError(f"manifest is malformed ({type(exc).__name__}: {exc})") from None
        for p in artifacts:
            check_relative(p)
        for name, sb in stages.items():
            if name not in pipeline.stage_names:
                raise ManifestError(f"manifest builds stage '{name}', which its pipeline does not describe")
            if sb.variant(Role.CANONICAL) is None:
                raise ManifestError(f"stage '{name}' has no canonical variant")
            roles = [(v.role, v.adapter) for v in sb.variants]
            if len(set(roles)) != len(roles):
                raise ManifestError(f"stage '{name}' lists a variant role twice")
            if any(v.adapter is not None and v.role is not Role.ORT_INPLACE_LLM for v in sb.variants):
                raise ManifestError(
                    f"stage '{name}' has a merged-adapter variant that is not an in-place LLM"
                )
            for p in sb.files():
                if p not in artifacts:
                    raise ManifestError(f"stage '{name}' names '{p}', which is not among the artifacts")
        for role, p in files.items():
            if p not in artifacts:
                raise ManifestError(f"file '{role}' -> '{p}' is not among the artifacts")
        check_pipeline(pipeline)
        for name, sb in stages.items():
            for v in sb.variants:
                if v.contract is not None:
                    _check_tensors(v.contract, f"the {v.role} variant of stage '{name}'", bounded=False)
        return cls(
            pipeline,
            stages,
            artifacts,
            files,
            dict(d.get("source", {})),
            dict(d.get("tools", {})),
            SCHEMA_VERSION,
            version,
        )


MAX_TENSOR_ELEMENTS = 1 << 26  # of one tensor of a stage, its named dims at their opt size
MIN_RUNTIME_IO = {StageKind.DECODER: (3, 1)}  # sample, timestep, conditioning; other kinds: (1, 1)


def check_pipeline(pipeline: PipelineSpec) -> None:
    """``ManifestError`` unless the pipeline description is one the runtime can bind: stage names
    unique; every stage's tensors named once, their named dims declared, their size bounded; each
    stage with the inputs and outputs its kind is bound by; the LLM stage with its geometry; a
    signal-token list for each modality that has an output projector."""
    seen: set[str] = set()
    for spec in pipeline.stages:
        if spec.name in seen:
            raise ManifestError(f"the pipeline describes stage '{spec.name}' twice")
        seen.add(spec.name)
        what = f"stage '{spec.name}'"
        _check_tensors(spec, what)
        ins, outs = MIN_RUNTIME_IO.get(spec.kind, (1, 1))
        if len(spec.inputs) < ins or len(spec.outputs) < outs:
            raise ManifestError(
                f"{what} ({spec.kind}) has {len(spec.inputs)} inputs and {len(spec.outputs)} outputs; "
                f"the runtime binds at least {ins} and {outs}"
            )
        if spec.kind is StageKind.LLM:
            g = spec.llm
            if g is None:
                raise ManifestError(f"{what} is an LLM stage without its geometry ('llm')")
            zero = [k for k, v in asdict(g).items() if v < 1]
            if zero:
                raise ManifestError(f"the LLM geometry of {what} has {', '.join(zero)} below 1")
        if spec.kind is StageKind.OUTPUT_PROJECTOR and spec.name.endswith("_output_projector"):
            modality = spec.name.removesuffix("_output_projector")
            if not pipeline.signal_tokens.get(modality):
                raise ManifestError(f"{what} has no signal tokens for '{modality}' in the pipeline")


def _check_tensors(t: StageSpec | Contract, what: str, bounded: bool = True) -> None:
    """Tensor and dim names unique, every named dim of a shape declared (sums of declared dims), and,
    if ``bounded``, no tensor of more than ``MAX_TENSOR_ELEMENTS`` elements with its dims at their
    opt size (a stage's; a variant's contract may hold a whole KV cache, which the runtime sizes
    from the LLM geometry against the machine's memory)."""
    dims = {d.name: d for d in t.dims}
    if len(dims) != len(t.dims):
        raise ManifestError(f"{what} declares a dim twice")
    for d in t.dims:
        unknown = [s for s in d.sum_of if s not in dims or dims[s].sum_of]
        if unknown:
            raise ManifestError(
                f"dim '{d.name}' of {what} sums {unknown}, which are not plain dims it declares"
            )
    for kind, tensors in (("input", t.inputs), ("output", t.outputs)):
        names = [x.name for x in tensors]
        if len(set(names)) != len(names):
            raise ManifestError(f"{what} names an {kind} twice")
        for x in tensors:
            undeclared = [s for s in x.shape if isinstance(s, str) and s not in dims]
            if undeclared:
                raise ManifestError(
                    f"{kind} '{x.name}' of {what} has dims {undeclared} that it does not declare"
                )
            elements = 1
            for s in x.shape if bounded else ():
                elements *= dims[s].opt if isinstance(s, str) else s
            if elements > MAX_TENSOR_ELEMENTS:
                raise ManifestError(
                    f"{kind} '{x.name}' {list(x.shape)} of {what} holds {elements} elements at its opt "
                    f"sizes, more than {MAX_TENSOR_ELEMENTS}"
                )


def _upgrade_v1_stage(d: dict[str, Any], spec: StageSpec) -> StageBuild:
    """A version-1 stage entry (``file`` + ``variants: {backend: path}``) as version 2."""
    precision = d.get("precision", "fp32")
    variants = [Variant(Role.CANONICAL, d["file"], "fp32", tuple(d.get("data_files", ())))]
    llm = spec.kind is StageKind.LLM
    for key, path in dict(d.get("variants", {})).items():
        if key == "onnxruntime" and llm:
            assert spec.llm is not None
            variants.append(
                Variant(Role.ORT_INPLACE_LLM, path, precision, contract=llm_inplace_contract(spec.llm))
            )
        elif key == "onnxruntime":
            variants.append(Variant(Role.ORT, path, precision))
        elif key == "qdq":
            variants.append(Variant(Role.WEIGHT_ONLY_DQ if llm else Role.QDQ, path, precision))
        elif key == "tensorrt":
            variants.append(Variant(Role.TENSORRT, path, precision))
        else:
            raise ValueError(f"unknown version-1 variant '{key}'")
    return StageBuild(
        tuple(variants),
        precision,
        d.get("exporter", "torchscript"),
        int(d.get("opset", 17)),
        int(d.get("nodes", 0)),
    )


def check_relative(p: str) -> None:
    """Artifact paths must stay inside the build folder."""
    pp = PurePosixPath(p)
    if pp.is_absolute() or ".." in pp.parts or "\\" in p or not p:
        raise ManifestError(f"artifact path '{p}' leaves the build folder")


def stage_files(stages: dict[str, StageBuild]) -> list[str]:
    """Every file the stages name: every variant's graph and external data."""
    return [p for sb in stages.values() for p in sb.files()]


def runtime_file(manifest: Manifest, name: str) -> str:
    """The graph ONNX Runtime serves for a stage under the stage's own contract."""
    return manifest.stage_build(name).served().file


def collect_artifacts(build: Path, paths: list[str]) -> dict[str, Artifact]:
    out = {}
    for p in sorted(set(paths)):
        f = build / p
        out[p] = Artifact(p, sha256_file(f), f.stat().st_size)
    return out


def schema_path() -> Path:
    """The JSON Schema of the manifest this omniforge writes (shipped in the package)."""
    return Path(__file__).with_name("manifest.schema.json")


@functools.cache
def _validator():
    import jsonschema

    return jsonschema.Draft202012Validator(json.loads(schema_path().read_text()))


def validate_schema(data: dict[str, Any]) -> None:
    """``ManifestError`` unless ``data`` matches the shipped JSON Schema."""
    import jsonschema

    error = jsonschema.exceptions.best_match(_validator().iter_errors(data))
    if error is not None:
        where = "/".join(map(str, error.absolute_path)) or "top level"
        what = error.message[:200]
        if error.validator == "pattern" and "(?!/)" in str(error.validator_value):  # a path's rules
            what = f"path {str(error.instance)[:80]!r} leaves the build folder or holds characters a path may not"
        raise ManifestError(f"manifest does not match its schema at {where}: {what}")


def write_manifest(build: Path, manifest: Manifest) -> Path:
    """Check ``manifest`` against the shipped JSON Schema and write ``manifest.json`` atomically."""
    text = json.dumps(manifest.to_dict(), indent=2) + "\n"
    validate_schema(json.loads(text))
    path = build / MANIFEST
    atomic_write_text(path, text)
    return path


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = temp_file(path.parent, f".{path.name}.")  # 0o666 less the umask, not mkstemp's 0o600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


MAX_MANIFEST_BYTES = 64 << 20


def parse_manifest(data: Any) -> Manifest:
    """A manifest from its JSON value, checked against the shipped JSON Schema (with its bounds)
    before any value is used; a version-1 manifest is upgraded first and checked as version 2."""
    if isinstance(data, dict) and data.get("schema_version") == 2:
        validate_schema(data)
    manifest = Manifest.from_dict(data)
    if manifest.read_version != SCHEMA_VERSION:
        validate_schema(json.loads(json.dumps(manifest.to_dict())))
    return manifest


def load_manifest(build: str | Path, verify: bool = True) -> Manifest:
    """Read and validate a build's manifest; with ``verify``, check every artifact's SHA-256."""
    build = Path(build)
    path = build / MANIFEST
    if not path.is_file():
        raise ManifestError(f"'{build}' is not a build folder (no {MANIFEST})")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(
                f"{path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; not a manifest omniforge writes"
            )
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSON, huge numbers
        raise ManifestError(f"{path} is not valid JSON ({type(exc).__name__})") from None
    manifest = parse_manifest(data)
    if verify:
        verify_artifacts(build, manifest)
    return manifest


def _checked_path(build: Path, rel: str) -> Path:
    """``build/rel`` after checking that it is a regular file inside the build folder."""
    f = build / rel
    try:
        inside = f.resolve().is_relative_to(build.resolve())
    except (OSError, RuntimeError):  # a symlink loop, a name too long for the file system
        raise ManifestError(f"artifact '{rel}' cannot be resolved inside {build}") from None
    if not inside:
        raise ManifestError(f"artifact '{rel}' resolves outside the build folder")
    if not f.is_file():  # missing, a folder, a FIFO or a device: never opened
        raise ManifestError(f"artifact '{rel}' is missing from {build} or is not a regular file")
    return f


def _mismatch(rel: str) -> ManifestError:
    return ManifestError(
        f"artifact '{rel}' does not match its SHA-256 in the manifest (corrupted or modified)"
    )


def verify_artifacts(build: Path, manifest: Manifest) -> None:
    for a in manifest.artifacts.values():
        f = _checked_path(build, a.path)
        if f.stat().st_size != a.size or sha256_file(f) != a.sha256:
            raise _mismatch(a.path)


def read_verified(build: Path, manifest: Manifest, rel: str) -> bytes:
    """The bytes of artifact ``rel``, hashed as they are read: what is returned is what the
    manifest vouches for, whatever happened to the file since the build was opened."""
    a = manifest.artifacts.get(rel)
    if a is None:
        raise ManifestError(f"'{rel}' is not among the build's artifacts")
    with open(_checked_path(build, rel), "rb") as f:
        data = f.read(a.size + 1)
    if len(data) != a.size or hashlib.sha256(data).hexdigest() != a.sha256:
        raise _mismatch(rel)
    return data


def verify_file(build: Path, manifest: Manifest, rel: str) -> Path:
    """Check artifact ``rel``'s size and SHA-256 now; its path."""
    a = manifest.artifacts.get(rel)
    if a is None:
        raise ManifestError(f"'{rel}' is not among the build's artifacts")
    f = _checked_path(build, rel)
    if f.stat().st_size != a.size or sha256_file(f) != a.sha256:
        raise _mismatch(rel)
    return f
