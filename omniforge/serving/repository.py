"""``omniforge triton``: a Triton Inference Server model repository for a build.

Per stage, up to three models, one per backend (Triton serves whichever the host has):

- ``<stage>_onnx``: Triton's ``onnxruntime`` backend on the stage's served graph (the stage's own
  tensors: the ORT-lowered or quantized graph where the build has one; for the LLM, its plain graph
  with explicit past/present tensors);
- ``<stage>_trt``: Triton's ``tensorrt_plan`` backend, where the build has a TensorRT engine;
- ``<stage>_py``: the Python backend running omniforge's own engine (hosts without those backends,
  such as the ``tritonserver`` bundled with ``nvidia-pytriton``).

Batch, dims and dynamic batching come from the stage description: a stage whose every tensor
starts with the same dynamic ``batch`` dim gets ``max_batch_size`` = that dim's max and dynamic
batching; other dynamic axes are -1. Then three Python-backend models over the whole build:

- ``llm``: text generation, decoupled (streamed responses), on the runtime's KV-cache slot pool;
- ``any2any``: prompt + optional image/audio/video in; text, signal events and media out (the
  whole ``Pipeline.run``, its stages in process or called through BLS on the per-stage models);
- ``omniforge_build``: returns the build's manifest; with ``--copy`` its folder holds the copy of
  the build that every Python model serves.

The Python models open the build with omniforge's ``Build``, which checks the SHA-256 of every
file they read, and check that the manifest is the one this repository was written for, so a
tampered artifact keeps the model that reads it from loading. The repository is written to a
temporary sibling and moved into place when complete, like a build.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omniforge.errors import ConfigError, ManifestError
from omniforge.pipeline.atomic import atomic_folder
from omniforge.pipeline.contracts import Role
from omniforge.pipeline.manifest import MANIFEST, Manifest, Variant
from omniforge.pipeline.spec import Dim, StageKind, StageSpec, TensorSpec
from omniforge.serving import pbtxt
from omniforge.serving.pbtxt import Sym

REPOSITORY_FILE = "omniforge_repository.json"  # at the top of the repository: Triton reads only folders
BUILD_MODEL = "omniforge_build"
LLM_MODEL = "llm"
ANY2ANY_MODEL = "any2any"
COPY_FOLDER = "build"  # inside the omniforge_build model's folder (not a version number: Triton skips it)

# per-stage model name suffix, by backend
SUFFIX = {"onnxruntime": "_onnx", "tensorrt": "_trt", "python": "_py"}
ANY2ANY_STAGES = ("process", "python", "onnxruntime", "tensorrt")
ONNX_VARIANTS = ("served", "canonical")

TRITON_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "float64": "TYPE_FP64",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}

MODEL_PY = '''"""Triton Python-backend model '{name}', written by `omniforge triton`: {what}."""

import os
import sys

# The Python backend's stub starts its interpreter without reading PYTHONPATH; apply it here,
# before numpy is imported, so that a server can hand its models another numpy (the stub bundled
# with nvidia-pytriton needs numpy < 2; `omniforge serve` sets this up).
for _p in reversed(os.environ.get("PYTHONPATH", "").split(os.pathsep)):
    if _p and _p not in sys.path:
        sys.path.insert(0, _p)

from omniforge.serving.triton_backend import {cls} as TritonPythonModel  # noqa: E402,F401
'''


@dataclass(frozen=True)
class RepositoryOptions:
    """How the repository is written."""

    copy: bool = False  # copy the build's files in (else: refer to the build folder where it lies)
    llm_slots: int = 4  # KV-cache slots of the llm model: requests generating at once
    llm_queue: int = 64  # requests that may wait for a slot before the llm model refuses more
    any2any_stages: str = "process"  # process: stages in the any2any model; else: BLS to <stage>_<backend>
    any2any_workers: int = 4  # any2any requests run at once
    onnx_variant: str = "served"  # served: the graph the runtime serves; canonical: the exported FP32 graph
    max_queue_delay_us: int = 500  # dynamic batching: how long a request may wait for others
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # ONNX Runtime providers of the Python models
    threads: int = 0  # ONNX Runtime intra-op threads per Python model (0: one per core)

    def __post_init__(self) -> None:
        for name in ("llm_slots", "llm_queue", "any2any_workers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1024:
                raise ConfigError(f"{name.replace('_', '-')} must be an integer in [1, 1024], got {v!r}")
        d = self.max_queue_delay_us
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 10_000_000:
            raise ConfigError(f"max-queue-delay-us must be an integer in [0, 10000000], got {d!r}")
        if self.any2any_stages not in ANY2ANY_STAGES:
            raise ConfigError(
                f"any2any stages '{self.any2any_stages}' is not one of {', '.join(ANY2ANY_STAGES)}"
            )
        if not self.providers or not all(isinstance(p, str) and p.isidentifier() for p in self.providers):
            raise ConfigError(f"providers must be ONNX Runtime provider names, got {self.providers!r}")
        t = self.threads
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= 1024:
            raise ConfigError(f"threads must be an integer in [0, 1024], got {t!r}")
        if self.onnx_variant not in ONNX_VARIANTS:
            raise ConfigError(f"onnx variant '{self.onnx_variant}' is not one of {', '.join(ONNX_VARIANTS)}")


@dataclass(frozen=True)
class ModelEntry:
    """One model of the repository: its name, Triton backend, what it serves."""

    name: str
    backend: str  # onnxruntime | tensorrt | python
    kind: str  # stage | llm | any2any | build
    stage: str = ""


@dataclass
class Repository:
    """What ``write_repository`` wrote (also read back from ``omniforge_repository.json``)."""

    path: Path
    build: str  # the build the Python models serve: absolute, or relative to a model's folder
    manifest_sha256: str
    options: RepositoryOptions
    models: list[ModelEntry] = field(default_factory=list)
    checked: bool = False  # configs parsed with Triton's ModelConfig message

    def names(self, backend: str | None = None, kind: str | None = None) -> list[str]:
        return [
            m.name
            for m in self.models
            if (backend is None or m.backend == backend) and (kind is None or m.kind == kind)
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "build": self.build,
            "manifest_sha256": self.manifest_sha256,
            "options": asdict(self.options),
            "models": [asdict(m) for m in self.models],
        }


def read_repository(path: str | Path) -> Repository:
    """A repository written by ``omniforge triton`` (``ConfigError`` for any other folder)."""
    path = Path(path)
    f = path / REPOSITORY_FILE
    if not f.is_file():
        raise ConfigError(
            f"'{path}' is not a repository written by `omniforge triton` (no {REPOSITORY_FILE})"
        )
    try:
        d = json.loads(f.read_text())
        return Repository(
            path,
            str(d["build"]),
            str(d["manifest_sha256"]),
            RepositoryOptions(**{**d["options"], "providers": tuple(d["options"]["providers"])}),
            [ModelEntry(**m) for m in d["models"]],
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{f} is not readable ({type(exc).__name__}: {exc})") from None


# ---- configs ------------------------------------------------------------------------------------
def batch_dim(spec: StageSpec) -> Dim | None:
    """The dim Triton may batch along: the first axis of every input and output, a free dynamic
    dim starting at 1 that appears nowhere else; None when the stage has no such dim."""
    tensors = (*spec.inputs, *spec.outputs)
    firsts = {t.shape[0] if t.shape else None for t in tensors}
    if len(firsts) != 1:
        return None
    (name,) = firsts
    if not isinstance(name, str):
        return None
    if any(name in t.shape[1:] for t in tensors):
        return None
    d = spec.dim(name)
    return d if not d.sum_of and d.min <= 1 else None


def tensor_config(t: TensorSpec, batched: bool) -> dict[str, Any]:
    """One ``input``/``output`` entry: dims without the batch axis when batched, -1 for dynamic axes.
    A tensor with no other axis is declared as [1] and reshaped to [] (Triton's form for (batch,))."""
    if t.dtype not in TRITON_TYPES:
        raise ConfigError(
            f"tensor '{t.name}' has dtype {t.dtype}, which this repository writer cannot declare"
        )
    dims = list(t.shape[1:] if batched else t.shape)
    entry: dict[str, Any] = {
        "name": t.name,
        "data_type": Sym(TRITON_TYPES[t.dtype]),
        "dims": [d if isinstance(d, int) else -1 for d in dims] or [1],
    }
    if not dims:
        entry["reshape"] = {"shape": []}
    return entry


def _io(spec: StageSpec) -> dict[str, Any]:
    bd = batch_dim(spec)
    batched = bd is not None
    return {
        "max_batch_size": bd.max if bd is not None else 0,
        "input": [tensor_config(t, batched) for t in spec.inputs],
        "output": [tensor_config(t, batched) for t in spec.outputs],
    }


def _batching(spec: StageSpec, options: RepositoryOptions) -> dict[str, Any] | None:
    """Dynamic batching for batchable stages (not the LLM's stateless graph: its requests carry
    caches of different lengths, which Triton would not batch anyway)."""
    if batch_dim(spec) is None or spec.kind is StageKind.LLM:
        return None
    return {"max_queue_delay_microseconds": options.max_queue_delay_us}


def stage_config(
    name: str, spec: StageSpec, backend: str, options: RepositoryOptions, params: dict[str, str]
) -> dict[str, Any]:
    cfg: dict[str, Any] = {"name": name}
    if backend == "onnxruntime":
        cfg["platform"] = "onnxruntime_onnx"
    elif backend == "tensorrt":
        cfg["platform"] = "tensorrt_plan"
    else:
        cfg["backend"] = "python"
    cfg.update(_io(spec))
    cfg["dynamic_batching"] = _batching(spec, options)
    if backend == "python":
        cfg["instance_group"] = [{"kind": Sym("KIND_CPU"), "count": 1}]
        cfg["parameters"] = pbtxt.parameters({**params, "stage": spec.name})
    return cfg


def _string(name: str, optional: bool = False, dims: tuple[int, ...] = (1,)) -> dict[str, Any]:
    return {"name": name, "data_type": Sym("TYPE_STRING"), "dims": list(dims), "optional": optional or None}


def _number(name: str, dtype: str, optional: bool = True, dims: tuple[int, ...] = (1,)) -> dict[str, Any]:
    return {"name": name, "data_type": Sym(dtype), "dims": list(dims), "optional": optional or None}


GENERATION_INPUTS = (
    ("max_new_tokens", "TYPE_INT32"),
    ("temperature", "TYPE_FP32"),
    ("top_k", "TYPE_INT32"),
    ("top_p", "TYPE_FP32"),
    ("repetition_penalty", "TYPE_FP32"),
    ("seed", "TYPE_UINT64"),
)
DIFFUSION_INPUTS = (("steps", "TYPE_INT32"), ("guidance_scale", "TYPE_FP32"))


def llm_config(options: RepositoryOptions, params: dict[str, str]) -> dict[str, Any]:
    """The streaming text model: one request, many responses (text deltas, then a final response
    with every generated token id and the finish reason)."""
    return {
        "name": LLM_MODEL,
        "backend": "python",
        "max_batch_size": 0,
        "model_transaction_policy": {"decoupled": True},
        "input": [
            _string("prompt"),
            *(_number(n, t) for n, t in GENERATION_INPUTS),
            _string("stop", optional=True, dims=(-1,)),
            _string("adapter", optional=True),
        ],
        "output": [
            _string("text"),
            _number("token_ids", "TYPE_INT64", optional=False, dims=(-1,)),
            _string("finish_reason"),
        ],
        "instance_group": [{"kind": Sym("KIND_CPU"), "count": 1}],
        "parameters": pbtxt.parameters(
            {**params, "num_slots": str(options.llm_slots), "max_queued": str(options.llm_queue)}
        ),
    }


def any2any_config(options: RepositoryOptions, params: dict[str, str]) -> dict[str, Any]:
    """The whole pipeline per request. Batched (one request per batch row, requests that arrive
    together are run at once on worker threads), so that HTTP and gRPC clients alike get one
    response with the text, signal events and media."""
    return {
        "name": ANY2ANY_MODEL,
        "backend": "python",
        "max_batch_size": options.any2any_workers,
        "input": [
            _string("prompt"),
            _string("image", optional=True),
            _string("audio", optional=True),
            _string("video", optional=True),
            _string("force", optional=True, dims=(-1,)),
            *(_number(n, t) for n, t in GENERATION_INPUTS),
            *(_number(n, t) for n, t in DIFFUSION_INPUTS),
            _string("scheduler", optional=True),
            _string("adapter", optional=True),
        ],
        "output": [
            _string("text"),
            _number("token_ids", "TYPE_INT64", optional=False, dims=(-1,)),
            _string("signals", dims=(-1,)),
            _number("images", "TYPE_FP32", optional=False, dims=(-1, -1, -1, 3)),
            _number("videos", "TYPE_FP32", optional=False, dims=(-1, -1, -1, -1, 3)),
            _number("audios", "TYPE_FP32", optional=False, dims=(-1, -1)),
            _number("sample_rate", "TYPE_INT32", optional=False),
            _string("warnings", dims=(-1,)),
        ],
        "dynamic_batching": {"max_queue_delay_microseconds": options.max_queue_delay_us},
        "instance_group": [{"kind": Sym("KIND_CPU"), "count": 1}],
        "parameters": pbtxt.parameters(
            {**params, "stages": options.any2any_stages, "workers": str(options.any2any_workers)}
        ),
    }


def build_model_config(params: dict[str, str]) -> dict[str, Any]:
    """A model that returns the build's manifest (``what``: ``manifest``), for clients that bind
    by the build's own description (stage tensors, signal tokens, hashes)."""
    return {
        "name": BUILD_MODEL,
        "backend": "python",
        "max_batch_size": 0,
        "input": [_string("what")],
        "output": [_string("json")],
        "instance_group": [{"kind": Sym("KIND_CPU"), "count": 1}],
        "parameters": pbtxt.parameters(params),
    }


# ---- writing ------------------------------------------------------------------------------------
def _check_out(build: Path, out: Path) -> None:
    b, o = build.resolve(), out.resolve()
    if o == b or b.is_relative_to(o) or o.is_relative_to(b):
        raise ConfigError(f"--out '{out}' may not be the build folder, a folder above it or inside it")
    if o in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise ConfigError(f"--out '{out}' may not be the current folder or a folder above it")
    if out.exists() and not (out / REPOSITORY_FILE).is_file() and any(out.iterdir()):
        raise ConfigError(
            f"--out '{out}' holds files that are not a repository written by `omniforge triton`; "
            "choose a new or empty folder"
        )


def _place(src: Path, dst: Path, copy: bool) -> None:
    """``dst`` as a copy of ``src`` or a symbolic link to it (absolute)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copyfile(src, dst)
    else:
        os.symlink(src.resolve(), dst)


def _graph_files(variant: Variant, into: Path, model_file: str, build: Path, copy: bool) -> None:
    """The variant's graph as ``into/model_file`` and its external data where the graph looks for it."""
    _place(build / variant.file, into / model_file, copy)
    base = posixpath.dirname(variant.file)
    for rel in variant.data_files:
        where = posixpath.relpath(rel, base)
        if where.startswith(".."):
            raise ManifestError(
                f"external data '{rel}' lies outside the folder of its graph '{variant.file}'"
            )
        _place(build / rel, into / where, copy)


def _write_model(folder: Path, cfg: dict[str, Any]) -> bool:
    text = pbtxt.render(cfg) + "\n"
    checked = pbtxt.check(text, cfg["name"])
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(text)
    return checked


def _python_model(folder: Path, cfg: dict[str, Any], cls: str, what: str) -> bool:
    checked = _write_model(folder, cfg)
    (folder / "1" / "model.py").write_text(MODEL_PY.format(name=cfg["name"], cls=cls, what=what))
    return checked


def plan_models(manifest: Manifest) -> list[ModelEntry]:
    """The models a repository for this build holds, in writing order."""
    models: list[ModelEntry] = []
    for name, sb in manifest.stages.items():
        models.append(ModelEntry(name + SUFFIX["onnxruntime"], "onnxruntime", "stage", name))
        if sb.variant(Role.TENSORRT) is not None:
            models.append(ModelEntry(name + SUFFIX["tensorrt"], "tensorrt", "stage", name))
        if manifest.pipeline.stage(name).kind is not StageKind.LLM:
            models.append(ModelEntry(name + SUFFIX["python"], "python", "stage", name))
    if "llm" in manifest.stages:
        models.append(ModelEntry(LLM_MODEL, "python", "llm"))
        models.append(ModelEntry(ANY2ANY_MODEL, "python", "any2any"))
    models.append(ModelEntry(BUILD_MODEL, "python", "build"))
    return models


def write_repository(
    build_path: str | Path,
    out: str | Path,
    options: RepositoryOptions | None = None,
    log=lambda _msg: None,
) -> Repository:
    """Write a Triton model repository for the build at ``build_path`` to ``out`` (atomically)."""
    from omniforge.runtime.build import Build

    options = options or RepositoryOptions()
    build_path, out = Path(build_path), Path(out)
    build = Build(build_path)  # manifest schema and every artifact's SHA-256
    m = build.manifest
    _check_out(build_path, out)
    if options.any2any_stages == "tensorrt" and not any(
        sb.variant(Role.TENSORRT) for sb in m.stages.values()
    ):
        raise ConfigError(
            "any2any stages 'tensorrt' needs a build with TensorRT engines (omniforge build --backend tensorrt)"
        )
    manifest_sha = hashlib.sha256((build_path / MANIFEST).read_bytes()).hexdigest()
    ref = f"../{BUILD_MODEL}/{COPY_FOLDER}" if options.copy else str(build_path.resolve())
    params = {
        "build": ref,
        "manifest_sha256": manifest_sha,
        "providers": ",".join(options.providers),
        "threads": str(options.threads),
    }
    models = plan_models(m)
    checked = True
    with atomic_folder(out) as tmp:
        if options.copy:
            dest = tmp / BUILD_MODEL / COPY_FOLDER
            for rel in (MANIFEST, *m.artifacts):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(build_path / rel, dest / rel)
        for entry in models:
            folder = tmp / entry.name
            if entry.kind == "stage":
                spec = m.pipeline.stage(entry.stage)
                cfg = stage_config(entry.name, spec, entry.backend, options, params)
                sb = m.stage_build(entry.stage)
                if entry.backend == "python":
                    checked &= _python_model(
                        folder, cfg, "StageModel", f"stage '{entry.stage}' on omniforge's engine"
                    )
                    continue
                checked &= _write_model(folder, cfg)
                if entry.backend == "onnxruntime":
                    variant = sb.served() if options.onnx_variant == "served" else sb.canonical
                    _graph_files(variant, folder / "1", "model.onnx", build_path, options.copy)
                else:
                    _graph_files(
                        sb.require(Role.TENSORRT, entry.stage),
                        folder / "1",
                        "model.plan",
                        build_path,
                        options.copy,
                    )
            elif entry.kind == "llm":
                checked &= _python_model(
                    folder, llm_config(options, params), "LlmModel", "streamed text generation"
                )
            elif entry.kind == "any2any":
                checked &= _python_model(
                    folder, any2any_config(options, params), "Any2AnyModel", "the whole any-to-any pipeline"
                )
            else:
                checked &= _python_model(
                    folder, build_model_config(params), "BuildModel", "the build's manifest"
                )
        repo = Repository(out, ref, manifest_sha, options, models, checked)
        (tmp / REPOSITORY_FILE).write_text(json.dumps(repo.to_dict(), indent=2) + "\n")
    log(
        f"repository {out}: {len(models)} models "
        f"({len(repo.names('onnxruntime'))} onnxruntime, {len(repo.names('tensorrt'))} tensorrt, "
        f"{len(repo.names('python'))} python); build {'copied' if options.copy else 'referenced'}; "
        + (
            "configs parsed as Triton ModelConfig"
            if checked
            else "configs not parsed (tritonclient is not installed)"
        )
    )
    return repo
