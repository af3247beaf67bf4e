"""TensorRT engines through Polygraphy's loaders, kept thin; imported only when used.

TensorRT >= 10.12 (and 11, which removed weak typing): ``NetworkFromOnnxPath(strongly_typed=True)``
-> ``CreateConfig`` with no precision flag (the graph carries its precisions: FP16 graphs with FP32
norms, Q/DQ graphs) -> ``EngineFromNetwork``. Older TensorRT (JetPack 6's 10.3): the norm layers
named by ``profiles.fp32_layers`` pinned to FP32 (the same list the emitted trtexec lines carry)
and precision flags. Both take the optimization profile from the stage description and a
persistent timing cache. Engine metadata (TensorRT version, GPU name and compute capability,
profiles) goes into the manifest, and loading an engine on another TensorRT or GPU fails with
one sentence. Without TensorRT, every entry point says so and points at ONNX Runtime.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from omniforge._lazy import lazy_import
from omniforge.engines.profiles import PRECISIONS, profile_for, strongly_typed
from omniforge.errors import ConfigError, EngineError, MissingDependencyError
from omniforge.pipeline.contracts import Role
from omniforge.pipeline.spec import StageSpec

HINT = "TensorRT needs an NVIDIA GPU with TensorRT installed; use --backend onnxruntime on this machine."
trt = lazy_import("tensorrt", extra="gpu", hint=HINT)
polygraphy_trt = lazy_import("polygraphy.backend.trt", extra="gpu", hint=HINT)


@dataclass(frozen=True)
class EngineMetadata:
    tensorrt: str
    gpu: str
    compute_capability: str
    precision: str
    profile: list[dict]


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


def check_compatible(meta: EngineMetadata, tensorrt_version: str, gpu: tuple[str, str]) -> None:
    """An engine runs only on the TensorRT version and GPU architecture it was built with."""
    if meta.tensorrt != tensorrt_version:
        raise EngineError(
            f"this engine was built with TensorRT {meta.tensorrt} but TensorRT {tensorrt_version} is "
            "installed; rebuild it with `omniforge build --backend tensorrt`"
        )
    if meta.compute_capability != gpu[1]:
        raise EngineError(
            f"this engine was built for compute capability {meta.compute_capability} ({meta.gpu}) but "
            f"this GPU is {gpu[0]} ({gpu[1]}); rebuild it on this GPU"
        )


def build_engine(
    stage: StageSpec,
    onnx_path: Path,
    engine_path: Path,
    precision: str,
    timing_cache: Path,
    fp32_layers: list[str] | tuple[str, ...] = (),
) -> EngineMetadata:
    """Build and save one stage's engine (GPU only); ``fp32_layers`` (ONNX node names, see
    ``profiles.fp32_layers``) compute and store in FP32 when ``precision`` is lower."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    require_tensorrt()
    p = polygraphy_trt
    profile = p.Profile()
    for i in profile_for(stage):
        profile.add(i.name, min=i.min, opt=i.opt, max=i.max)
    timing = {"load_timing_cache": str(timing_cache) if timing_cache.exists() else None}
    if strongly_typed(trt.__version__):  # no per-layer precision and no precision flag exist here
        builder, network, parser = p.network_from_onnx_path(str(onnx_path), strongly_typed=True)
        config = p.CreateConfig(profiles=[profile], **timing)
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
            **timing,
        )
    engine = p.engine_from_network(
        (builder, network, parser), config=config, save_timing_cache=str(timing_cache)
    )
    p.save_engine(engine, path=str(engine_path))
    gpu = gpu_info() or ("unknown", "unknown")
    return EngineMetadata(trt.__version__, gpu[0], gpu[1], precision, [asdict(i) for i in profile_for(stage)])


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
    meta_all = json.loads((build / manifest.files["tensorrt_engines"]).read_text())
    meta = EngineMetadata(**meta_all[name])
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
