"""Export a model folder, stage by stage, into a build folder with a manifest and a parity report.

The build is written into a temporary sibling folder and moved into place only when every stage
exported and passed parity, so a failed or interrupted export never leaves a half-written build.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import torch

from omniforge import __version__
from omniforge.errors import ExportError, OmniforgeError
from omniforge.export.llm_ort import TorchWeights, build_llama_gqa
from omniforge.export.lora import export_adapters
from omniforge.export.opsets import DEFAULT_OPSET, check_opset
from omniforge.export.parity import ParityResult, check_llm_inplace, check_stage
from omniforge.export.stages import export_module, reference_module
from omniforge.model.loader import load_component
from omniforge.pipeline.atomic import atomic_folder
from omniforge.pipeline.contracts import Role, llm_inplace_contract
from omniforge.pipeline.describe import describe, encoder_kind, is_imagebind
from omniforge.pipeline.manifest import (
    Manifest,
    StageBuild,
    Variant,
    atomic_write_text,
    canonical_stage,
    collect_artifacts,
    write_manifest,
)
from omniforge.pipeline.model_config import ModelConfig, load_model_config
from omniforge.pipeline.spec import PipelineSpec, StageKind, StageSpec

EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with margin


@dataclass
class ExportOptions:
    stages: list[str] | None = None  # None: every stage of the pipeline
    adapter: str | None = "default"  # LoRA adapter merged into the LLM; "default": the model's choice
    opset: int = DEFAULT_OPSET  # see omniforge.export.opsets
    parity: bool = True
    threads: int = 2


@dataclass
class StageReport:
    stage: str
    seconds: float
    nodes: int
    size: int
    parity: list[ParityResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.parity)


def trace_point(stage: StageSpec) -> dict[str, int]:
    """Shapes to trace at: non-empty past and no size-1 dims, so nothing gets specialised."""
    return {d.name: max(d.opt, min(2, d.max)) for d in stage.dims if not d.sum_of}


def export_stage(module: torch.nn.Module, stage: StageSpec, path: Path, opset: int) -> onnx.ModelProto:
    """Trace ``module`` to ONNX at ``path`` with the stage's names and dynamic axes."""
    feeds = stage.sample_inputs(trace_point(stage), seed=1234)
    args = tuple(torch.from_numpy(feeds[n]) for n in stage.input_names)
    raw = path.with_suffix(".raw")
    raw.mkdir(parents=True, exist_ok=True)
    # nn.Transformer's fused fast path has no ONNX symbolic; the plain path is the same math
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks
            torch.onnx.export(
                module,
                args,
                str(raw / "model.onnx"),
                input_names=stage.input_names,
                output_names=stage.output_names,
                dynamic_axes=stage.dynamic_axes(),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    raw_bytes = sum(f.stat().st_size for f in raw.iterdir())
    model = onnx.load(str(raw / "model.onnx"))
    model.producer_name = "omniforge"
    model.producer_version = __version__
    meta = {"omniforge.stage": stage.name, "omniforge.kind": str(stage.kind)}
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    save_model(model, path, raw_bytes)
    shutil.rmtree(raw)
    return model


def save_model(model: onnx.ModelProto, path: Path, nbytes: int | None = None) -> None:
    """Save one ONNX file, with its weights in ``<file>.data`` beside it when over protobuf's limit."""
    if nbytes is None:
        nbytes = sum(t.ByteSize() for t in model.graph.initializer)
    big = nbytes > EXTERNAL_DATA_BYTES
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=big,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data" if big else None,
    )
    if big:  # onnx creates the data file owner-only; give it the graph's mode (the umask's)
        shutil.copymode(path, path.with_name(f"{path.name}.data"))


def _copy(src: Path, build: Path, rel: str, files: dict[str, str], role: str) -> None:
    dst = build / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    files[role] = rel


def copy_runtime_files(cfg: ModelConfig, spec: PipelineSpec, build: Path) -> dict[str, str]:
    """Configs the runtime needs beside the engines: tokenizer, schedulers, preprocessing."""
    files: dict[str, str] = {}
    names = set(spec.stage_names)
    if names & {"llm", "token_embedding"}:
        for f in (
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",  # newer transformers save the chat template here, not in the config
            "config.json",
            "generation_config.json",
        ):
            if (cfg.llm / f).is_file():
                role = {"config.json": "llm_config"}.get(f, f.split(".")[0])
                _copy(cfg.llm / f, build, f"llm/{f}", files, role)
    if "image_encoder" in names and encoder_kind(cfg.encoders["image"]) == "blip-2":
        _write_json(build, "image_preprocessor", blip_frontend(cfg.encoders["image"]), files)
    elif "image_encoder" in names and is_imagebind(cfg.encoders["image"]):
        _write_json(build, "image_preprocessor", imagebind_vision_frontend(cfg.encoders["image"]), files)
    elif "image_encoder" in names and (cfg.encoders["image"] / "preprocessor_config.json").is_file():
        _copy(
            cfg.encoders["image"] / "preprocessor_config.json",
            build,
            "configs/image_preprocessor.json",
            files,
            "image_preprocessor",
        )
    if "audio_encoder" in names:
        if encoder_kind(cfg.encoders["audio"]) == "whisper":
            c = json.loads((cfg.encoders["audio"] / "config.json").read_text())
            fe = {
                "kind": "whisper",
                "n_mels": int(c["num_mel_bins"]),
                "window_s": cfg.audio_frontend.window_s,
            }
            _write_json(build, "audio_frontend", fe, files)
        elif encoder_kind(cfg.encoders["audio"]) == "clap":
            from omniforge.pipeline.clap_folder import read_clap_folder

            clap = read_clap_folder(cfg.encoders["audio"]).frontend.to_config()
            _write_json(build, "audio_frontend", clap, files)
        elif is_imagebind(cfg.encoders["audio"]):
            _write_json(build, "audio_frontend", imagebind_audio_frontend(cfg.encoders["audio"]), files)
        else:
            _write_json(build, "audio_frontend", asdict(cfg.audio_frontend), files)
    if cfg.video_audio is not None and {"image_encoder", "audio_encoder"} <= names:
        _write_json(build, "video_audio", cfg.video_audio.to_config(), files)
    if cfg.protocol is not None and "llm" in names:
        _write_json(build, "protocol", cfg.protocol.to_dict(), files)
    for modality, src in cfg.uncond.items():
        if f"{modality}_unet" in names:
            _copy(src, build, f"configs/{modality}_uncond.npy", files, f"{modality}_uncond")
    for modality, folder in cfg.decoders.items():
        if f"{modality}_unet" in names or f"{modality}_vae_decoder" in names:
            rel = f"configs/{modality}_scheduler.json"
            (build / "configs").mkdir(parents=True, exist_ok=True)
            (build / rel).write_text(json.dumps(scheduler_config(folder / "scheduler"), indent=2) + "\n")
            files[f"{modality}_scheduler"] = rel
            _copy(
                folder / "vae" / "config.json",
                build,
                f"configs/{modality}_vae.json",
                files,
                f"{modality}_vae",
            )
        if modality == "audio" and "vocoder" in names:
            _copy(folder / "vocoder" / "config.json", build, "configs/vocoder.json", files, "vocoder")
    return files


def _write_json(build: Path, role: str, data: dict, files: dict[str, str]) -> None:
    rel = f"configs/{role}.json"
    (build / "configs").mkdir(parents=True, exist_ok=True)
    (build / rel).write_text(json.dumps(data, indent=2) + "\n")
    files[role] = rel


def blip_frontend(folder: Path) -> dict:
    """BLIP's image processor: resize to the exact size (no crop), rescale, normalise."""
    c = json.loads((folder / "config.json").read_text())
    size = int(c.get("vision_config", {}).get("image_size", 224))
    pre = folder / "preprocessor_config.json"
    p = json.loads(pre.read_text()) if pre.is_file() else {}
    return {
        "kind": "resize",
        "height": size,
        "width": size,
        "resample": int(p.get("resample", 3)),
        "mean": list(p.get("image_mean", [0.48145466, 0.4578275, 0.40821073])),
        "std": list(p.get("image_std", [0.26862954, 0.26130258, 0.27577711])),
    }


def imagebind_vision_frontend(folder: Path) -> dict:
    """What the runtime's ImageBind image and video transforms need (``runtime.imagebind_media``)."""
    c = json.loads((folder / "config.json").read_text())
    return {
        "kind": "imagebind",
        "size": int(c["image_size"]),
        "frames_per_clip": int(c["frames_per_clip"]),
        "video_clips": 5,
        "clip_seconds": 2.0,
    }


def imagebind_audio_frontend(folder: Path) -> dict:
    """ImageBind's audio transform settings: 16 kHz, 3 clips of 2 s, 128-bin fbank of 204 frames."""
    c = json.loads((folder / "config.json").read_text())
    return {
        "kind": "imagebind",
        "sample_rate": 16000,
        "clips": 3,
        "clip_seconds": 2.0,
        "n_mels": int(c["n_mels"]),
        "target_frames": int(c["audio_frames"]),
        "mean": -4.268,
        "std": 9.138,
    }


def scheduler_config(folder: Path) -> dict:
    """The diffusers scheduler config plus the alphas_cumprod table diffusers computes from it."""
    from diffusers import DDIMScheduler

    cfg = json.loads((folder / "scheduler_config.json").read_text())
    if str(cfg.get("_class_name", "")).startswith("CogVideoX"):  # its own table: SNR shift, zero-SNR rescale
        from omniforge.export.cogvideox import scheduler_table

        return {**cfg, "alphas_cumprod": scheduler_table(cfg)}
    alphas = DDIMScheduler.from_config(cfg).alphas_cumprod  # same betas for every beta-based scheduler
    return {**cfg, "alphas_cumprod": [float(a) for a in alphas.tolist()]}


def tool_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"omniforge": __version__}
    for pkg in ("torch", "onnx", "onnxruntime", "transformers", "diffusers", "peft", "tokenizers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def write_report(build: Path, reports: list[StageReport]) -> None:
    data = [
        {
            "stage": r.stage,
            "seconds": round(r.seconds, 3),
            "nodes": r.nodes,
            "size": r.size,
            "passed": r.passed,
            "parity": [asdict(p) for p in r.parity],
        }
        for r in reports
    ]
    atomic_write_text(build / "parity.json", json.dumps(data, indent=2) + "\n")
    atomic_write_text(build / "parity.md", parity_table(reports) + "\n")


def parity_table(reports: list[StageReport]) -> str:
    rows = [
        "| stage | nodes | size (KiB) | shapes checked | max abs err | max rel err | result |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in reports:
        worst_abs = max((p.max_abs for p in r.parity), default=0.0)
        worst_rel = max((p.max_rel for p in r.parity), default=0.0)
        result = "ok" if r.passed else "FAIL"
        if not r.parity:
            result = "not checked"
        rows.append(
            f"| {r.stage} | {r.nodes} | {r.size / 1024:.0f} | {len(r.parity)} | {worst_abs:.2e} | {worst_rel:.2e} | {result} |"
        )
    return "\n".join(rows)


def export_pipeline(
    model_path: str | Path,
    out: str | Path,
    options: ExportOptions | None = None,
    log: Callable[[str], None] = print,
    parity_points: int | None = None,
) -> tuple[Manifest, list[StageReport]]:
    """Export every (selected) stage of ``model_path`` into the build folder ``out``;
    ``parity_points``: check each stage at only the first N of its parity shapes (real-size stages)."""
    options = options or ExportOptions()
    check_opset(options.opset)
    cfg = load_model_config(model_path)
    spec = describe(cfg).select(options.stages)
    adapter = cfg.merge_adapter if options.adapter == "default" else options.adapter
    out = Path(out)
    if out.exists() and not (out / "manifest.json").is_file() and any(out.iterdir()):
        raise ExportError(f"'{out}' exists and is not a build folder; refusing to replace it")
    with atomic_folder(out) as tmp:
        manifest, reports = _export_into(cfg, spec, adapter, tmp, options, log, parity_points)
    return manifest, reports


def _export_into(
    cfg: ModelConfig,
    spec: PipelineSpec,
    adapter: str | None,
    build: Path,
    options: ExportOptions,
    log: Callable[[str], None],
    parity_points: int | None = None,
) -> tuple[Manifest, list[StageReport]]:
    (build / "stages").mkdir(parents=True)
    adapter_files: dict[str, str] = {}
    loaded: dict[str, torch.nn.Module] = {}
    reports: list[StageReport] = []
    builds: dict[str, StageBuild] = {}
    paths: list[str] = []
    n = len(spec.stages)
    for i, stage in enumerate(spec.stages, 1):
        t0 = time.perf_counter()
        if stage.component not in loaded:
            loaded = {
                stage.component: load_component(
                    cfg, stage.component, adapter if stage.component == "llm" else None
                )
            }
        module = loaded[stage.component]
        rel = f"stages/{stage.name}.onnx"
        try:
            model = export_stage(export_module(stage, module), stage, build / rel, options.opset)
        except OmniforgeError:
            raise
        except Exception as exc:  # a tracer failure is a user-facing export error, named by stage
            raise ExportError(
                f"exporting stage '{stage.name}' failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
            ) from exc
        data = (
            [f"stages/{stage.name}.onnx.data"] if (build / f"stages/{stage.name}.onnx.data").exists() else []
        )
        nodes = len(model.graph.node)
        report = StageReport(stage.name, 0.0, nodes, sum((build / p).stat().st_size for p in [rel, *data]))
        sb = canonical_stage(rel, tuple(data), opset=options.opset, nodes=nodes)
        inplace = None
        if stage.kind is StageKind.LLM:  # the in-place ONNX Runtime graph beside the canonical one
            assert stage.llm is not None
            contract = llm_inplace_contract(stage.llm)
            ort_rel = f"stages/{stage.name}.ort.onnx"
            slots = None
            if adapter is None and cfg.adapters:  # no adapter merged: each one switched at run time
                slots, adapter_files = export_adapters(
                    cfg.adapters, TorchWeights(module), stage.llm.num_layers, build, cfg.adapter_auto
                )
            save_model(
                build_llama_gqa(module, stage.llm.max_context, contract, lora_slots=slots), build / ort_rel
            )
            ort_data = (f"{ort_rel}.data",) if (build / f"{ort_rel}.data").exists() else ()
            inplace = Variant(Role.ORT_INPLACE_LLM, ort_rel, "fp32", ort_data, contract)
            sb = sb.with_variant(inplace)
        if options.parity:
            report.parity = check_stage(
                stage,
                str(build / rel),
                reference_module(stage, module),
                options.threads,
                parity_points,
            )
            if inplace is not None:
                report.parity += check_llm_inplace(
                    str(build / inplace.file), inplace.contract, module, stage, options.threads
                )
        report.seconds = time.perf_counter() - t0
        reports.append(report)
        builds[stage.name] = sb
        paths += sb.files()
        worst = max((p.max_abs for p in report.parity), default=float("nan"))
        status = "ok" if report.passed else "FAIL"
        log(
            f"[{i}/{n}] {stage.name}: {nodes} nodes, {report.seconds:.1f}s, parity max abs {worst:.1e} {status if report.parity else ''}".rstrip()
        )
    failed = [r for r in reports if not r.passed]
    if failed:
        detail = "; ".join(f"{r.stage} max abs {max(p.max_abs for p in r.parity):.2e}" for r in failed)
        raise ExportError(f"{len(failed)} stage(s) missed their parity tolerance: {detail}")
    files = {**copy_runtime_files(cfg, spec, build), **adapter_files}
    write_report(build, reports)
    paths += list(files.values()) + ["parity.json", "parity.md"]
    manifest = Manifest(
        pipeline=spec,
        stages=builds,
        artifacts=collect_artifacts(build, paths),
        files={**files, "parity_report": "parity.json"},
        source={"model": str(cfg.root), "adapter": adapter, "kind": "llm" if cfg.is_llm_only else "nextgpt"},
        tools=tool_versions(),
    )
    write_manifest(build, manifest)
    return manifest, reports
