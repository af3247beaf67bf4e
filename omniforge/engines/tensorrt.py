"""TensorRT engines through Polygraphy's loaders, kept thin; imported only when used.

TensorRT >= 10.12 (and 11, which removed weak typing): ``NetworkFromOnnxPath(strongly_typed=True)``
-> ``CreateConfig`` with no precision flag (the graph carries its precisions: FP16 graphs with FP32
norms, Q/DQ graphs) -> ``EngineFromNetwork``. Older TensorRT (JetPack 6's 10.3): the norm layers
named by ``profiles.fp32_layers`` pinned to FP32 (the same list the emitted trtexec lines carry)
and precision flags. Both take the optimization profile from the stage description and a
persistent timing cache; a precision the installed TensorRT cannot build from omniforge's graph
(INT4 before 10.6: ``profiles.require_buildable``) is refused before the build. Engine metadata
(TensorRT version, GPU name, compute capability, hardware-compatibility level, precision, typing,
profiles) goes into the build's ``engines/engines.json`` (the manifest's ``tensorrt_engines``
file), and loading an engine on another TensorRT or a GPU its level does not cover fails with one
sentence. Without TensorRT, every entry point says so and points at ONNX Runtime.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from omniforge._lazy import lazy_import
from omniforge.engines.profiles import PRECISIONS, profile_for, require_buildable, strongly_typed
from omniforge.errors import ConfigError, EngineError, MissingDependencyError
from omniforge.pipeline.contracts import Role
from omniforge.pipeline.spec import StageSpec

HINT = "TensorRT needs an NVIDIA GPU with TensorRT installed; use --backend onnxruntime on this machine."
trt = lazy_import("tensorrt", extra="gpu", hint=HINT)
polygraphy_trt = lazy_import("polygraphy.backend.trt", extra="gpu", hint=HINT)


# TensorRT's HardwareCompatibilityLevel, lower-cased: none (the default) and same_compute_capability
# engines run on GPUs of the compute capability they were built on; ampere_plus on any GPU from
# Ampere (8.0) on
HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")
AMPERE = (8, 0)


@dataclass(frozen=True)
class EngineMetadata:
    """What an engine can run on, as recorded when it was built (``engines/engines.json``)."""

    tensorrt: str  # the exact TensorRT version: a plan file loads only there
    gpu: str
    compute_capability: str  # "major.minor" of the GPU it was built on
    precision: str
    profile: list[dict]
    hardware_compatibility: str = "none"  # one of HARDWARE_COMPATIBILITY; "none" for older metadata
    strongly_typed: bool | None = None  # None: written before it was recorded

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, stage: str = "") -> EngineMetadata:
        """Metadata read back from ``engines.json``; keys it does not know are ignored, a missing
        required one is one sentence."""
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(data)) if isinstance(data, dict) else sorted(required)
        if missing:
            raise EngineError(
                f"the engine metadata of stage '{stage}' lacks {', '.join(missing)}; rebuild the engines"
            )
        return cls(**{k: v for k, v in data.items() if k in known})


def hardware_compatibility_name(level) -> str:
    """``trt.HardwareCompatibilityLevel.AMPERE_PLUS`` (or its name) -> "ampere_plus"."""
    name = str(getattr(level, "name", level)).rsplit(".", 1)[-1].lower()
    if name not in HARDWARE_COMPATIBILITY:
        raise ConfigError(
            f"hardware compatibility '{name}' is not one of {', '.join(HARDWARE_COMPATIBILITY)}"
        )
    return name


def engine_metadata(
    engine,
    tensorrt_version: str,
    gpu: tuple[str, str],
    precision: str,
    stage: StageSpec,
    requested: str = "none",
) -> EngineMetadata:
    """The metadata of a built ``engine``: its own hardware-compatibility level where TensorRT
    reports it (``ICudaEngine.hardware_compatibility_level``), else the level requested."""
    level = getattr(engine, "hardware_compatibility_level", None)
    return EngineMetadata(
        tensorrt_version,
        gpu[0],
        gpu[1],
        precision,
        [
            {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(i).items()}
            for i in profile_for(stage)
        ],
        hardware_compatibility_name(level) if level is not None else hardware_compatibility_name(requested),
        strongly_typed(tensorrt_version),
    )


def require_tensorrt() -> None:
    """Raise one clear sentence when TensorRT or a GPU is missing."""
    if not trt.available():
        raise MissingDependencyError(
            f"TensorRT is not installed (the 'tensorrt' Python package is missing). {HINT}"
        )
    if gpu_info() is None:
        raise MissingDependencyError(f"no NVIDIA GPU is visible (nvidia-smi found none). {HINT}")


def gpu_info() -> tuple[str, str] | None:
    """(name, compute capability) of the first GPU, from nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = (
            subprocess.run(
                [exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            )
            .stdout.strip()
            .splitlines()
        )
    except (subprocess.SubprocessError, OSError):
        return None
    if not out:
        return None
    name, cc = (x.strip() for x in out[0].split(",", 1))
    return name, cc


def _capability(cc: str) -> tuple[int, int] | None:
    try:
        major, _, minor = cc.strip().partition(".")
        return int(major), int(minor or 0)
    except ValueError:
        return None


def check_compatible(meta: EngineMetadata, tensorrt_version: str, gpu: tuple[str, str]) -> None:
    """An engine runs only on the TensorRT version it was built with, and on the GPUs its
    hardware-compatibility level covers: the compute capability it was built on (none,
    same_compute_capability), or any from Ampere on (ampere_plus)."""
    if meta.tensorrt != tensorrt_version:
        raise EngineError(
            f"this engine was built with TensorRT {meta.tensorrt} but TensorRT {tensorrt_version} is "
            "installed; rebuild it with `omniforge build --backend tensorrt`"
        )
    level = hardware_compatibility_name(meta.hardware_compatibility)
    if level == "ampere_plus":
        here = _capability(gpu[1])
        if here is None or here < AMPERE:
            raise EngineError(
                f"this engine was built for Ampere and later GPUs (hardware compatibility ampere_plus, on "
                f"{meta.gpu}) but this GPU is {gpu[0]} (compute capability {gpu[1]}); rebuild it on this GPU"
            )
        return
    if meta.compute_capability != gpu[1]:
        raise EngineError(
            f"this engine was built for compute capability {meta.compute_capability} ({meta.gpu}, "
            f"hardware compatibility {level}) but this GPU is {gpu[0]} ({gpu[1]}); rebuild it on this GPU"
        )


def build_engine(
    stage: StageSpec,
    onnx_path: Path,
    engine_path: Path,
    precision: str,
    timing_cache: Path,
    fp32_layers: list[str] | tuple[str, ...] = (),
    hardware_compatibility: str = "none",
    refittable: bool = False,
) -> EngineMetadata:
    """Build and save one stage's engine (GPU only); ``fp32_layers`` (ONNX node names, see
    ``profiles.fp32_layers``) compute and store in FP32 when ``precision`` is lower;
    ``hardware_compatibility``: TensorRT's level (``HARDWARE_COMPATIBILITY``), recorded with the
    TensorRT version and the GPU's compute capability in the returned metadata; ``refittable``:
    weights may be replaced later (an LLM whose LoRA adapters are refitted in, ``lora_refit``)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    level = hardware_compatibility_name(hardware_compatibility)
    require_tensorrt()
    require_buildable(precision, trt.__version__)
    p = polygraphy_trt
    profile = p.Profile()
    for i in profile_for(stage):
        profile.add(i.name, min=i.min, opt=i.opt, max=i.max)
    common = {"load_timing_cache": str(timing_cache) if timing_cache.exists() else None}
    if refittable:
        common["refittable"] = True
    if level != "none":
        common["hardware_compatibility_level"] = getattr(trt.HardwareCompatibilityLevel, level.upper())
    if strongly_typed(trt.__version__):  # no per-layer precision and no precision flag exist here
        builder, network, parser = p.network_from_onnx_path(str(onnx_path), strongly_typed=True)
        config = p.CreateConfig(profiles=[profile], **common)
    else:
        builder, network, parser = p.network_from_onnx_path(str(onnx_path))
        if precision != "fp32":
            pin_fp32(network, set(fp32_layers))
        config = p.CreateConfig(
            fp16=precision in ("fp16", "int8", "int4"),
            int8=precision == "int8",  # explicit quantization: scales come from the graph's Q/DQ nodes
            bf16=precision == "bf16",
            profiles=[profile],
            precision_constraints="obey" if precision != "fp32" else None,
            **common,
        )
    engine = p.engine_from_network(
        (builder, network, parser), config=config, save_timing_cache=str(timing_cache)
    )
    p.save_engine(engine, path=str(engine_path))
    return engine_metadata(
        engine, trt.__version__, gpu_info() or ("unknown", "unknown"), precision, stage, level
    )


def pin_fp32(network, names: set[str]) -> None:
    """Compute and outputs in FP32 for the layers named ``names`` (obeyed: see ``precision_constraints``);
    weakly typed builds only (TensorRT < 10.12)."""
    for idx in range(network.num_layers):
        layer = network.get_layer(idx)
        if layer.name in names:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)


def load_engine_checked(build: Path, manifest, name: str):
    """A Polygraphy engine loader for a build's stage, refused with one sentence when the engine
    was built for another TensorRT version or GPU architecture."""
    import json

    require_tensorrt()
    if "tensorrt_engines" not in manifest.files:
        raise EngineError(
            f"this build has no TensorRT engine metadata for stage '{name}'; rebuild the engines"
        )
    meta_all = json.loads((build / manifest.files["tensorrt_engines"]).read_text())
    if name not in meta_all:
        raise EngineError(
            f"the TensorRT engine metadata has no entry for stage '{name}'; rebuild the engines"
        )
    meta = EngineMetadata.from_dict(meta_all[name], name)
    gpu = gpu_info()
    assert gpu is not None
    check_compatible(meta, trt.__version__, gpu)
    variant = manifest.stage_build(name).require(Role.TENSORRT, name)
    data = (build / variant.file).read_bytes()
    try:  # deserialized now, so a mismatch is reported here in one sentence rather than at first use
        engine = polygraphy_trt.engine_from_bytes(data)
    except Exception as exc:
        raise EngineError(
            f"the TensorRT engine of stage '{name}' cannot be deserialized by TensorRT {trt.__version__} on "
            f"{gpu[0]} ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}); "
            "rebuild it on this device"
        ) from None
    if engine is None:
        raise EngineError(
            f"the TensorRT engine of stage '{name}' cannot be deserialized here; rebuild it on this device"
        )
    return engine
