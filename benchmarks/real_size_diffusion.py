"""Real size, media half: NExT-GPT's encoders (ImageBind-huge) and decoders (Stable Diffusion 1.5,
AudioLDM) exported and timed.

usage: python benchmarks/real_size_diffusion.py [--size real|tiny] [--work DIR] [--runs 3] [--threads 2]
                                                [--stages a,b] [--variants a,b] [--sequential]

Writes a NExT-GPT model folder whose encoders and decoders have the released shapes with seeded
random weights saved as FP16 safetensors (``real``: ImageBind-huge's vision and audio encoders in
ImageBind's key names, as ``omniforge import nextgpt`` writes them, with a 1024-wide input projector;
Stable Diffusion 1.5's UNet2DConditionModel and AutoencoderKL, AudioLDM's (audioldm-s-full-v2) UNet,
VAE and SpeechT5HifiGan vocoder; ``tiny``: small configs, a check that runs in seconds) and every
other part the tiny default's. Then, one stage at a time, each step in its own process with its wall
time and peak RSS (``wait4``):

- ``omniforge`` export of that stage alone (``export_pipeline(..., ExportOptions(stages=[stage]),
  parity_points=1)``: the exporter's parity check at the stage's first check shape, under its
  tolerance);
- ``omniforge optimize`` of the one-stage build (graph passes and the ONNX Runtime-lowered graph)
  when the graph is a single protobuf (``optimize`` writes each graph as one file, so a graph with
  external data is measured as exported);
- omniforge's stage quantizers (``select_quantizer``, what ``omniforge quantize`` runs per stage):
  static QDQ INT8 and dynamic INT8 (accuracy fallback off: each trial re-quantizes the whole graph),
  calibrated on the stage's seeded inputs (a one-stage build has no pipeline to capture from), and
  FP16 with norms kept FP32.

Latency: the encoders per call at batch 1 (an image as ImageBind's 2-frame clip of 224 x 224; 128 x
204 fbank frames of audio), the UNets per denoising step at batch 2 (classifier-free guidance; Stable
Diffusion at 64 x 64 latents, AudioLDM at 8 x 128 x 16 latents, 5.12 s of audio), the VAE decoders
and the vocoder per call at batch 1, for ONNX Runtime FP32 / INT8 static / INT8 dynamic / FP16 and PyTorch
eager FP32 (the same module the export traced, ``torch.inference_mode``), each in its own worker
process with the same threads, median of ``--runs`` interleaved rounds; each worker's peak RSS; then
one profiled run per worker (ONNX Runtime's profiler, ``torch.profiler``): per-op totals.
ZeroScope's UNet3DConditionModel (zeroscope_v2_576w) is sized from its config, and left out when
it cannot fit. Results: ``benchmarks/results/real_size_diffusion.{json,md}`` (``tiny``:
``real_size_diffusion-tiny``); a run of some ``--stages`` keeps the other stages' earlier results,
each stage with the date and CPU it was measured on.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import machine, median, spread, write_results  # noqa: E402
from real_size import cpu_features, cpu_flags, run_measured, versions  # noqa: E402

GIB = 2**30
COMPLETE = ".complete"

# Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5 unet/ and vae/ configs)
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
# AudioLDM (cvssp/audioldm-s-full-v2): FiLM conditioning on one 512-wide CLAP vector through
# class_labels; sample_size is its latent (frames, mel bins / 4): 128 x 16 is 5.12 s at 16 kHz
AUDIOLDM_UNET = dict(
    sample_size=(128, 16),
    in_channels=8,
    out_channels=8,
    layers_per_block=2,
    block_out_channels=(128, 256, 384, 640),
    down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
    cross_attention_dim=(128, 256, 384, 640),
    class_embed_type="simple_projection",
    projection_class_embeddings_input_dim=512,
    class_embeddings_concat=True,
    attention_head_dim=8,
    norm_num_groups=32,
)
AUDIOLDM_VAE = dict(
    in_channels=1,
    out_channels=1,
    latent_channels=8,
    block_out_channels=(128, 256, 512),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.9227914214134216,
)
AUDIOLDM_VOCODER = dict(
    model_in_dim=64,
    sampling_rate=16000,
    upsample_initial_channel=1024,
    upsample_rates=[5, 4, 2, 2, 2],
    upsample_kernel_sizes=[16, 16, 8, 4, 4],
    resblock_kernel_sizes=[3, 7, 11],
    resblock_dilation_sizes=[[1, 3, 5]] * 3,
    leaky_relu_slope=0.1,
    normalize_before=True,
)
# ZeroScope v2 576w (cerspense/zeroscope_v2_576w unet/): 24 frames of 320 x 576 -> 40 x 72 latents
ZEROSCOPE_UNET = dict(
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
    up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3,
    cross_attention_dim=1024,
    attention_head_dim=64,
    norm_num_groups=32,
)
ZEROSCOPE_SHAPE = (24, 40, 72)  # frames, latent rows, latent columns

TINY = {
    "image_unet": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
    ),
    "image_vae": dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
    ),
    "audio_unet": dict(
        sample_size=(16, 8),
        in_channels=8,
        out_channels=8,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=(32, 64),
        class_embed_type="simple_projection",
        class_embeddings_concat=True,
        attention_head_dim=8,
        norm_num_groups=8,
    ),
    "audio_vae": dict(
        in_channels=1,
        out_channels=1,
        latent_channels=8,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
    ),
    "vocoder": dict(
        model_in_dim=16,
        sampling_rate=16000,
        upsample_initial_channel=32,
        upsample_rates=[4, 4],
        upsample_kernel_sizes=[8, 8],
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]],
        normalize_before=False,
    ),
}
# ImageBind-huge is omniforge.model.imagebind.IMAGEBIND_HUGE; the tiny check's:
TINY_IMAGEBIND = dict(
    vision_width=32,
    vision_layers=1,
    vision_heads=4,
    audio_width=32,
    audio_layers=1,
    audio_heads=4,
    embed_dim=32,
    image_size=28,
    n_mels=32,
    audio_frames=36,
)
STAGES = (
    "image_encoder",
    "audio_encoder",
    "audio_unet",
    "audio_vae_decoder",
    "vocoder",
    "image_unet",
    "image_vae_decoder",
)
VARIANTS = ("ort_fp32", "ort_int8_static", "ort_int8_dynamic", "ort_fp16", "torch_fp32")
QUANTIZED = {
    "ort_int8_static": ("int8", "static"),
    "ort_int8_dynamic": ("int8", "dynamic"),
    "ort_fp16": ("fp16", ""),
}
NAMES = {
    "ort_fp32": "ONNX Runtime FP32",
    "ort_int8_static": "ONNX Runtime INT8 static QDQ",
    "ort_int8_dynamic": "ONNX Runtime INT8 dynamic",
    "ort_fp16": "ONNX Runtime FP16",
    "torch_fp32": "PyTorch eager FP32",
}


# ---- the model folder ------------------------------------------------------------------------------


def _save_fp16(module, folder: Path) -> int:
    """Save ``module`` as FP16 safetensors with its library's ``save_pretrained``; the parameter
    count of what its stage runs (a VAE's decoder side only)."""
    import torch

    parts = [module.post_quant_conv, module.decoder] if hasattr(module, "decoder") else [module]
    n = sum(p.numel() for m in parts for p in m.parameters())
    module.to(torch.float16).save_pretrained(folder)
    return n


def write_decoders(root: Path, size: str, seed: int = 0) -> dict[str, int]:
    """Replace the folder's image and audio decoders' networks (keeping their schedulers) with
    seeded ones of ``size``; parameters per part."""
    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    desc = json.loads((root / "nextgpt.json").read_text())
    tiny = desc.get("tiny_config", {})
    if size == "real":
        cfgs = {
            "image_unet": SD15_UNET,
            "image_vae": SD15_VAE,
            "audio_unet": AUDIOLDM_UNET,
            "audio_vae": AUDIOLDM_VAE,
            "vocoder": AUDIOLDM_VOCODER,
        }
    else:  # conditioning widths of the folder's output projectors
        cfgs = {k: dict(v) for k, v in TINY.items()}
        cfgs["image_unet"]["cross_attention_dim"] = tiny["cond_dim"]
        cfgs["audio_unet"]["projection_class_embeddings_input_dim"] = tiny["audio_cond_dim"]
    params = {}
    for i, (part, make) in enumerate(
        [
            ("image_unet", lambda c: UNet2DConditionModel(**c)),
            ("image_vae", lambda c: AutoencoderKL(**c)),
            ("audio_unet", lambda c: UNet2DConditionModel(**c)),
            ("audio_vae", lambda c: AutoencoderKL(**c)),
            ("vocoder", lambda c: SpeechT5HifiGan(SpeechT5HifiGanConfig(**c))),
        ]
    ):
        modality, sub = part.split("_") if part != "vocoder" else ("audio", "vocoder")
        folder = root / desc["decoders"][modality] / sub
        shutil.rmtree(folder, ignore_errors=True)
        torch.manual_seed(seed + 1000 + i)
        module = make(cfgs[part]).eval()
        params[part] = _save_fp16(module, folder)
        del module
        gc.collect()
    return params


def _imagebind_state(module, prefixes) -> dict:
    """``module``'s tensors in FP16 under ImageBind's own key names."""
    import torch

    from omniforge.model.imagebind import original_key

    return {original_key(k, prefixes): v.to(torch.float16) for k, v in module.state_dict().items()}


def write_encoders(root: Path, size: str, seed: int = 0) -> dict[str, int]:
    """Replace the folder's image and audio encoders with one seeded ImageBind folder of ``size``
    (``imagebind/``, as the NExT-GPT importer writes it) and the input projector with one as wide as
    its embedding; parameters per encoder."""
    import torch

    from omniforge.model.imagebind import (
        IMAGEBIND_HUGE,
        ImageBindAudio,
        ImageBindConfig,
        ImageBindVision,
        save_imagebind,
    )
    from omniforge.model.projectors import InputProjector, InputProjectorConfig, save_module

    cfg = IMAGEBIND_HUGE if size == "real" else ImageBindConfig(**TINY_IMAGEBIND)
    desc = json.loads((root / "nextgpt.json").read_text())
    state, params = {}, {}
    for i, (part, cls) in enumerate((("image_encoder", ImageBindVision), ("audio_encoder", ImageBindAudio))):
        torch.manual_seed(seed + 2000 + i)
        module = cls(cfg)
        params[part] = sum(p.numel() for p in module.parameters())
        state.update(_imagebind_state(module, cls.PREFIXES))
        del module
        gc.collect()
    save_imagebind(state, cfg, root / "imagebind")
    del state
    for old in set(desc["encoders"].values()):
        shutil.rmtree(root / old, ignore_errors=True)
    desc["encoders"] = {"image": "imagebind", "audio": "imagebind"}
    desc.pop("audio_frontend", None)  # ImageBind's own fbank front end
    proj_dir = root / desc["input_projector"]
    hidden = json.loads((proj_dir / "config.json").read_text())["out_dim"]
    shutil.rmtree(proj_dir)
    torch.manual_seed(seed + 2002)
    save_module(InputProjector(InputProjectorConfig(in_dim=cfg.embed_dim, out_dim=hidden)), proj_dir)
    (root / "nextgpt.json").write_text(json.dumps(desc, indent=2) + "\n")
    return params


def write_model(folder: Path, size: str, base: Path | None) -> dict:
    """The model folder: the tiny default's parts (written by ``create_default``, with output
    projectors as wide as the real decoders' conditioning; ``tiny``: a copy of ``base`` or the
    default) and the encoders and decoders of ``size``. Reused when complete."""
    from omniforge.model.tiny import TinyConfig, create_default, ensure_default

    info_path = folder / COMPLETE
    if info_path.is_file():
        return json.loads(info_path.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    if size == "real":  # SD's cross-attention width and AudioLDM's CLAP width
        create_default(folder, TinyConfig(cond_dim=768, audio_cond_dim=512))
    else:
        shutil.copytree(base or ensure_default(), folder)
    params = {**write_encoders(folder, size), **write_decoders(folder, size)}
    info = {"parameters": params, "seconds": round(time.perf_counter() - t0, 1)}
    info_path.write_text(json.dumps(info))
    return info


def zeroscope_note(mem_available: int) -> dict:
    """ZeroScope v2 576w's UNet3D sized from its config (meta tensors, no memory): parameters, FP32
    bytes, and one spatial attention layer's score matrix at its latent shape."""
    import torch
    from diffusers import UNet3DConditionModel

    with torch.device("meta"):
        unet = UNet3DConditionModel(**ZEROSCOPE_UNET)
    params = sum(p.numel() for p in unet.parameters())
    frames, h, w = ZEROSCOPE_SHAPE
    heads = ZEROSCOPE_UNET["attention_head_dim"]  # UNet3D reads it as the head count
    scores = 2 * frames * heads * (h * w) ** 2 * 4  # guided batch of 2, float32
    line = (
        f"ZeroScope v2 576w UNet3D not exported: {params / 1e9:.2f}B parameters ({4 * params / GIB:.1f} GiB FP32); "
        f"one first-level spatial attention at its {h} x {w} latents holds {heads} heads x {h * w}^2 scores per "
        f"frame, {scores / GIB:.0f} GiB for a guided step of {frames} frames, against {mem_available / GIB:.0f} GiB "
        "available here (a computed size, not a measurement)"
    )
    return {"parameters": params, "fp32_bytes": 4 * params, "attention_scores_bytes": scores, "note": line}


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# ---- phases, each run in its own process -------------------------------------------------------------


def phase_model(args: argparse.Namespace) -> None:
    """The model folder, and ZeroScope's sizes (in ``--out``)."""
    write_model(Path(args.model), args.size, Path(args.base) if args.base else None)
    Path(args.out).write_text(json.dumps(zeroscope_note(mem_available())))


def phase_export(args: argparse.Namespace) -> None:
    from omniforge.errors import ExportError
    from omniforge.export.exporter import ExportOptions, export_pipeline

    opts = ExportOptions(stages=[args.stage], threads=args.threads)
    try:
        export_pipeline(args.model, args.out, opts, log=lambda m: print(m, flush=True), parity_points=1)
    except ExportError as exc:  # recorded, and exported again unchecked so that it can still be timed
        if "parity tolerance" not in str(exc):
            raise
        Path(f"{args.out}.parity-failed").write_text(str(exc))
        opts.parity = False
        export_pipeline(args.model, args.out, opts, log=lambda m: print(m, flush=True))


def phase_optimize(args: argparse.Namespace) -> None:
    from omniforge.passes.build import optimize_build

    optimize_build(args.build, args.out, log=lambda m: print(m, flush=True))


def phase_quantize(args: argparse.Namespace) -> None:
    """One precision of one stage by omniforge's stage quantizer, without a calibration capture."""
    from dataclasses import asdict

    from omniforge.calibration.quantize import QuantizeContext, QuantizeOptions, select_quantizer
    from omniforge.pipeline.manifest import load_manifest
    from omniforge.pipeline.precision import Precision

    build, out = Path(args.build), Path(args.out)
    precision, mode = QUANTIZED[args.variant]
    manifest = load_manifest(build, verify=True)
    opts = QuantizeOptions(int8_mode=mode or "auto", max_fp32_layers=0, end_to_end=False)
    ctx = QuantizeContext(build, manifest, opts, None, None, lambda m: print(m, flush=True))
    shutil.rmtree(out, ignore_errors=True)
    (out / "stages").mkdir(parents=True)
    kind = manifest.pipeline.stage(args.stage).kind
    sb, report = select_quantizer(kind, precision).quantize(ctx, args.stage, Precision(precision), out)
    result = {"file": sb.served().file, "report": asdict(report)}
    (out / "result.json").write_text(json.dumps(result, indent=2))


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _ort_profile(path: str, feeds: dict, threads: int, prefix: str, warm: bool) -> dict[str, float]:
    """Per-op-type milliseconds of one run (after a warm-up if ``warm``) under ONNX Runtime's profiler."""
    import onnxruntime as ort

    from omniforge.runtime.engine import SessionConfig, session_options

    opts = session_options("one_shot", SessionConfig(threads=threads))
    opts.enable_profiling = True
    opts.profile_file_prefix = prefix
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    if warm:
        sess.run(None, feeds)
    sess.run(None, feeds)
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    runs = [e for e in events if e.get("name") == "model_run"]
    start = runs[-1]["ts"]
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            totals[e["args"]["op_name"]] += e["dur"] / 1000
    totals["(run)"] = runs[-1]["dur"] / 1000
    return dict(totals)


def _torch_profile(fn, warm: bool) -> dict[str, float]:
    """Per-op milliseconds (self CPU time) of one run under ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    if warm:
        fn()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    totals = {e.key: e.self_cpu_time_total / 1000 for e in prof.key_averages()}
    totals["(run)"] = (time.perf_counter() - t0) * 1000
    return totals


def phase_worker(args: argparse.Namespace) -> None:
    """Load one variant, answer ``run`` (seconds), ``rss`` (peak so far), ``profile``, ``quit``."""
    from omniforge.pipeline.describe import describe
    from omniforge.pipeline.model_config import load_model_config

    cfg = load_model_config(args.model)
    stage = describe(cfg).stage(args.stage)
    feeds = stage.sample_inputs({}, seed=7)  # the stage's opt shape: batch 2 for the UNets
    if args.variant == "torch_fp32":
        import torch

        from omniforge.export.stages import export_module
        from omniforge.model.loader import load_component

        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(1)
        module = export_module(stage, load_component(cfg, stage.component)).eval()
        inputs = [torch.from_numpy(feeds[n]) for n in stage.input_names]

        def once() -> None:
            with torch.inference_mode():
                module(*inputs)

        def profile() -> dict[str, float]:
            return _torch_profile(once, warm)
    else:
        from omniforge.runtime.engine import SessionConfig, open_session

        sess = open_session(args.path, "one_shot", SessionConfig(threads=args.threads))

        def once() -> None:
            sess.run(None, feeds)

        def profile() -> dict[str, float]:
            nonlocal sess
            del sess
            gc.collect()
            return _ort_profile(args.path, feeds, args.threads, str(Path(args.out) / "profile"), warm)

    t0 = time.perf_counter()
    once()
    warm = time.perf_counter() - t0 < 2.0  # a profile of a long call needs no warm-up run
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "run":
            t0 = time.perf_counter()
            once()
            print(json.dumps(time.perf_counter() - t0), flush=True)
        elif cmd == "rss":
            print(json.dumps(_peak_rss()), flush=True)
        elif cmd == "profile":
            print(json.dumps(profile()), flush=True)
        else:
            break


class Worker:
    def __init__(self, variant: str, path: str, stage: str, args: argparse.Namespace, work: Path) -> None:
        cmd = [sys.executable, __file__, "--phase", "worker", "--variant", variant, "--stage", stage]
        cmd += [
            "--model",
            str(args.model_dir),
            "--path",
            path,
            "--threads",
            str(args.threads),
            "--out",
            str(work),
        ]
        self.log = open(work / f"worker-{stage}-{variant}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            code = self.proc.wait()
            self.log.close()
            tail = (work / f"worker-{stage}-{variant}.log").read_text().strip().splitlines()
            killed = " (killed: out of memory?)" if code == -9 else ""
            raise RuntimeError(f"exit {code}{killed}: {tail[-1] if tail else ''}")

    def ask(self, cmd: str):
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            code = self.proc.wait()
            self.log.close()
            raise RuntimeError(f"exit {code}{' (killed: out of memory?)' if code == -9 else ''} during {cmd}")
        return json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait()
        self.log.close()


# ---- one stage: export, passes, quantization, latency ----------------------------------------------


def _phase(args: argparse.Namespace, work: Path, name: str, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--phase", *extra, "--threads", str(args.threads)]
    res = run_measured(cmd, log=work / f"{name}.log")
    print(
        f"  {name}: {res['seconds']:.0f}s, peak RSS {res['peak_rss_bytes'] / GIB:.2f} GiB"
        + (f", FAILED {res['failed']}" if "failed" in res else ""),
        file=sys.stderr,
    )
    return res


def _graph_bytes(build: Path, stage: str) -> tuple[int, bool]:
    m = json.loads((build / "manifest.json").read_text())
    sb = m["stages"][stage]
    v = next(v for v in sb["variants"] if v["role"] == "canonical")
    files = [v["file"], *v.get("data_files", [])]
    return sum((build / f).stat().st_size for f in files), bool(v.get("data_files"))


def _served(build: Path, stage: str) -> str:
    from omniforge.pipeline.manifest import load_manifest, runtime_file

    return str(build / runtime_file(load_manifest(build, verify=False), stage))


def run_stage(stage: str, args: argparse.Namespace, work: Path) -> dict:
    out: dict = {}
    builds = work / "builds"
    builds.mkdir(exist_ok=True)
    fp32 = builds / stage
    shutil.rmtree(fp32, ignore_errors=True)
    print(f"{stage}: export ...", file=sys.stderr)
    ex = _phase(
        args,
        work,
        f"export-{stage}",
        ["export", "--stage", stage, "--model", str(args.model_dir), "--out", str(fp32)],
    )
    out["export"] = ex
    if "failed" in ex:
        return out
    failed = Path(f"{fp32}.parity-failed")
    if failed.is_file():  # the peak and time then cover the checked export and the unchecked one
        ex["parity_failed"] = failed.read_text()
        failed.unlink()
    ex["parity"] = json.loads((fp32 / "parity.json").read_text())[0]["parity"]
    ex["graph_bytes"], ex["external_data"] = _graph_bytes(fp32, stage)
    source = fp32
    if ex["external_data"]:
        out["optimize"] = {
            "skipped": "the graph has external data; omniforge optimize saves each graph as one protobuf"
        }
    else:
        opt = builds / f"{stage}-optimized"
        shutil.rmtree(opt, ignore_errors=True)
        res = _phase(args, work, f"optimize-{stage}", ["optimize", "--build", str(fp32), "--out", str(opt)])
        if "failed" not in res:
            res["report"] = json.loads((opt / "optimize.json").read_text())
            source = opt
        out["optimize"] = res
    paths = {"ort_fp32": _served(source, stage)}
    out["quantize"] = {}
    for variant in QUANTIZED:
        if variant not in args.variants:
            continue
        q = work / "quant" / stage / variant
        res = _phase(
            args,
            work,
            f"quantize-{stage}-{variant}",
            ["quantize", "--variant", variant, "--stage", stage, "--build", str(source), "--out", str(q)],
        )
        if "failed" not in res:
            result = json.loads((q / "result.json").read_text())
            res.update(result)
            paths[variant] = str(q / result["file"])
        out["quantize"][variant] = res
    if "torch_fp32" in args.variants:
        paths["torch_fp32"] = ""
    paths = {k: v for k, v in paths.items() if k in args.variants}
    out["graphs"] = {k: str(Path(v).relative_to(work)) for k, v in paths.items() if v}
    out["latency"] = measure(stage, paths, args, work)
    return out


def measure(stage: str, paths: dict[str, str], args: argparse.Namespace, work: Path) -> dict:
    """Interleaved rounds over one worker per variant (or one at a time with ``--sequential``); a
    worker that dies among the others (out of memory) is measured again alone afterwards."""
    print(f"{stage}: timing {', '.join(paths)} ...", file=sys.stderr)
    result: dict[str, dict] = {}

    def rounds(variants: list[str]) -> list[str]:
        """Measure ``variants`` side by side; the ones whose worker died."""
        samples: dict[str, list[float]] = {v: [] for v in variants}
        workers: dict[str, Worker] = {}
        for v in variants:
            try:
                workers[v] = Worker(v, paths[v], stage, args, work)
            except RuntimeError as exc:
                result[v] = {"failed": str(exc)}
        for _ in range(args.runs):
            for v, w in list(workers.items()):
                try:
                    if samples[v] and samples[v][-1] < 1.0:
                        w.ask("run")  # warm again after the others ran (short calls only)
                    samples[v].append(w.ask("run"))
                except RuntimeError as exc:
                    result[v] = {"failed": str(exc)}
                    del workers[v]
        for v, w in workers.items():
            try:
                rss, prof = w.ask("rss"), w.ask("profile")
            except RuntimeError as exc:
                result[v] = {"failed": f"profiling: {exc}"}
                continue
            w.close()
            result[v] = {
                "median_ms": 1000 * median(samples[v]),
                "spread": spread(samples[v]),
                "runs_ms": [1000 * x for x in samples[v]],
                "peak_rss_bytes": rss,
                "profile_ms": dict(sorted(prof.items(), key=lambda kv: -kv[1])[:15]),
                "side_by_side": len(variants) > 1,
            }
        return [v for v in variants if "failed" in result.get(v, {})]

    if args.sequential:
        for v in paths:
            rounds([v])
    else:
        died = rounds(list(paths))
        for v in died if len(paths) > 1 else []:
            first = result[v]["failed"]
            rounds([v])
            result[v]["among_the_others"] = first
    ref = result.get("torch_fp32", {}).get("median_ms")
    for r in result.values():
        if ref and "median_ms" in r:
            r["speedup_vs_torch"] = ref / r["median_ms"]
    return {k: result[k] for k in paths if k in result}


# ---- report ------------------------------------------------------------------------------------------


def auto_choice(name: str, stage: dict) -> tuple[str, str]:
    """What ``--precision auto`` would serve: the fastest of FP32 / INT8 / FP16 whose cosine to FP32
    meets the auto plan's budget, by this run's measurements. INT8 in the mode ``auto`` quantizes
    the stage with (``_int8_mode``): static for the convolutional stages, dynamic for the encoders."""
    from omniforge.build import AUTO_BUDGETS

    budget = AUTO_BUDGETS["cosine_min"]
    int8 = "ort_int8_dynamic" if name.endswith("_encoder") else "ort_int8_static"
    lat = stage.get("latency", {})
    if "median_ms" not in lat.get("ort_fp32", {}):
        return "", "not measured"
    best, why = "ort_fp32", []
    for v in (int8, "ort_fp16"):
        q = stage.get("quantize", {}).get(v, {})
        cos = q.get("report", {}).get("metrics", {}).get("cosine_min")
        t = lat.get(v, {}).get("median_ms")
        if cos is None or t is None:
            continue
        speed = lat["ort_fp32"]["median_ms"] / t
        ok = cos >= budget
        why.append(f"{NAMES[v]} {speed:.2f}x FP32, cosine {cos:.4f} ({'meets' if ok else 'misses'} {budget})")
        if ok and t < lat[best]["median_ms"]:
            best = v
    return best, "; ".join(why)


def report(data: dict) -> str:
    s = data["settings"]
    cpu = data["cpu"]
    has = cpu_features(cpu)
    lines = [
        f"# Real-size encoder and diffusion stages ({s['size']}): export, quantization and latency",
        "",
        f"Seeded random weights, FP16 safetensors, {'in the released shapes' if s['size'] == 'real' else 'small configs'}. Machine: "
        f"{cpu.get('model') or data['machine'].get('cpu', '?')}, {s['threads']} threads everywhere; {has}. "
        f"Encoders per call at batch 1, UNets per denoising step at batch 2 (classifier-free guidance), VAE "
        f"decoders and vocoder per call at batch 1; median of {s['runs']} runs per variant, in rounds interleaved with the other variants "
        "(side by side) or one variant at a time (alone).",
        "",
        f"Model folder written in {data['model']['write']['seconds']:.0f}s, peak RSS "
        f"{data['model']['write']['peak_rss_bytes'] / GIB:.2f} GiB (each network built in FP32, saved FP16).",
        "",
        "## Export (each stage alone, in its own process)",
        "",
        "| stage | parameters | export time (s) | export peak RSS (GiB) | FP32 graph (GiB) | external data | parity (max abs / scale, shape) | optimize |",
        "|---|---:|---:|---:|---:|---|---|---|",
    ]
    for stage, r in data["stages"].items():
        ex = r["export"]
        params = data["model"]["parameters"].get(PARTS[stage], 0)
        if "failed" in ex:
            lines.append(
                f"| {stage} | {params / 1e6:.1f}M | {ex['seconds']:.0f} | {ex['peak_rss_bytes'] / GIB:.2f} | | | failed: {ex['failed']} | |"
            )
            continue
        p = ex["parity"][0] if ex["parity"] else None
        opt = r.get("optimize", {})
        o = opt.get("skipped") or (
            f"failed: {opt['failed']}"
            if "failed" in opt
            else f"{opt['seconds']:.0f}s, {opt['peak_rss_bytes'] / GIB:.2f} GiB"
        )
        checked = (
            f"{p['max_abs']:.1e} / {p['ref_scale']:.2g} at {p['point']}, {'ok' if p['passed'] else 'FAIL'}"
            if p
            else f"FAIL: {ex.get('parity_failed', 'not checked')}"
        )
        lines.append(
            f"| {stage} | {params / 1e6:.1f}M | {ex['seconds']:.0f} | {ex['peak_rss_bytes'] / GIB:.2f} | "
            f"{ex['graph_bytes'] / GIB:.2f} | {'yes' if ex['external_data'] else 'no'} | {checked} | {o} |"
        )
    lines += [
        "",
        "## Quantization (omniforge's stage quantizers, each in its own process)",
        "",
        "| stage | variant | time (s) | peak RSS (GiB) | size (GiB) | cosine min vs FP32 | SNR min (dB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for stage, r in data["stages"].items():
        for v, q in r.get("quantize", {}).items():
            if "failed" in q:
                lines.append(
                    f"| {stage} | {NAMES[v]} | {q['seconds']:.0f} | {q['peak_rss_bytes'] / GIB:.2f} | failed: {q['failed']} | | |"
                )
                continue
            m = q["report"]["metrics"]
            lines.append(
                f"| {stage} | {NAMES[v]} | {q['seconds']:.0f} | {q['peak_rss_bytes'] / GIB:.2f} | "
                f"{q['report']['size_after'] / GIB:.2f} | {m['cosine_min']:.4f} | {m['snr_db_min']:.1f} |"
            )
    lines += [
        "",
        "## Latency",
        "",
        "| stage | variant | median (ms) | spread | vs PyTorch eager | worker peak RSS (GiB) | timed |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for stage, r in data["stages"].items():
        for v, t in r.get("latency", {}).items():
            if "failed" in t:
                lines.append(f"| {stage} | {NAMES[v]} | failed: {t['failed']} | | | | |")
                continue
            vs = f"{t['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in t else ""
            timed = "side by side" if t.get("side_by_side") else "alone"
            if "among_the_others" in t:
                timed = "alone (it died beside the others)"
            lines.append(
                f"| {stage} | {NAMES[v]} | {t['median_ms']:.1f} | {t['spread']:.0%} | {vs} | "
                f"{t['peak_rss_bytes'] / GIB:.2f} | {timed} |"
            )
    lines += ["", "## What `--precision auto` would serve (by these measurements)", ""]
    for stage, r in data["stages"].items():
        best, why = auto_choice(stage, r)
        if best:
            lines.append(f"- {stage}: **{NAMES[best]}** ({why or 'no quantized variant measured'}).")
    lines += ["", "## Profiles: top ops per run (ms)", ""]
    for stage, r in data["stages"].items():
        for v, t in r.get("latency", {}).items():
            if "profile_ms" in t:
                ops = ", ".join(f"{k} {ms:.0f}" for k, ms in list(t["profile_ms"].items())[:8])
                lines.append(f"- {stage}, {NAMES[v]}: {ops}")
    lines += ["", f"- {data['zeroscope']['note']}."]
    measured = {k: r["measured"] for k, r in data["stages"].items() if "measured" in r}
    if len({(m["date"], m["cpu"]) for m in measured.values()}) > 1:
        lines += ["", "## Where each stage was measured", ""]
        lines += [f"- {k}: {m['date']}, {m['cpu']}" for k, m in measured.items()]
    return "\n".join(lines)


PARTS = {
    "image_encoder": "image_encoder",
    "audio_encoder": "audio_encoder",
    "image_unet": "image_unet",
    "image_vae_decoder": "image_vae",
    "audio_unet": "audio_unet",
    "audio_vae_decoder": "audio_vae",
    "vocoder": "vocoder",
}


def earlier_results(path: Path, running: list[str]) -> tuple[dict[str, dict], list[dict]]:
    """The stages of an earlier run's results at ``path`` that this run does not measure again, and
    the settings of the runs that made them."""
    if not path.is_file():
        return {}, []
    old = json.loads(path.read_text())
    cpu = old.get("cpu", {})
    where = {
        "date": old.get("date", "an earlier run"),
        "cpu": f"{cpu.get('model', '?')}; {cpu_features(cpu)}",
    }
    settings = old.get("settings", {})
    runs = settings.get("invocations") or [{k: v for k, v in settings.items() if k != "invocations"}]
    stages = {k: {"measured": where, **v} for k, v in old.get("stages", {}).items() if k not in running}
    return stages, runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("real", "tiny"), default="real")
    ap.add_argument("--work", default="/tmp/omniforge-bench/real-size-diffusion")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--sequential", action="store_true", help="one variant resident at a time")
    ap.add_argument(
        "--base", help="tiny: the model folder to take the other parts from (default: the default's)"
    )
    ap.add_argument("--results", help="where to write the results (default: benchmarks/results)")
    ap.add_argument("--keep", action="store_true", help="keep the exported and quantized graphs")
    phases = {
        "model": phase_model,
        "export": phase_export,
        "optimize": phase_optimize,
        "quantize": phase_quantize,
        "worker": phase_worker,
    }
    ap.add_argument("--phase", choices=sorted(phases), help=argparse.SUPPRESS)
    for hidden in ("--stage", "--model", "--out", "--build", "--variant", "--path"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.phase:
        phases[args.phase](args)
        return
    args.stages = [s for s in args.stages.split(",") if s]
    args.variants = [v for v in args.variants.split(",") if v]
    for s in args.stages:
        if s not in STAGES:
            ap.error(f"unknown stage {s!r} (choose from {', '.join(STAGES)})")
    for v in args.variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r} (choose from {', '.join(VARIANTS)})")
    if args.results:
        _common.RESULTS = Path(args.results)
    work = Path(args.work) / args.size
    work.mkdir(parents=True, exist_ok=True)
    args.model_dir = work / "model"
    # every step that holds weights runs in a child process: a child's peak RSS (wait4) starts from
    # its parent's, so this process stays small
    print(f"model folder {args.model_dir} ...", file=sys.stderr)
    base = ["--base", args.base] if args.base else []
    zeroscope = work / "zeroscope.json"
    cmd = ["model", "--model", str(args.model_dir), "--size", args.size, "--out", str(zeroscope), *base]
    written = _phase(args, work, "model", cmd)
    if "failed" in written:
        sys.exit(f"writing the model folder failed: {written['failed']}")
    model = {**json.loads((args.model_dir / COMPLETE).read_text()), "write": written}
    stages: dict[str, dict] = {}
    cpu = cpu_flags()
    if "has" in cpu:  # FP16 arithmetic, beside the flags the LLM benchmark records
        cpu["has"]["avx512_fp16"] = "avx512_fp16" in cpu["flags"]
    data = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "cpu": cpu,
        "versions": {**versions(), **{p: md.version(p) for p in ("diffusers", "onnx")}},
        "settings": {
            "size": args.size,
            "runs": args.runs,
            "threads": args.threads,
            "sequential": args.sequential,
            "stages": args.stages,
            "variants": args.variants,
        },
        "model": model,
        "zeroscope": json.loads(zeroscope.read_text()),
        "stages": stages,
    }
    name = "real_size_diffusion" if args.size == "real" else "real_size_diffusion-tiny"
    kept, runs = earlier_results(_common.RESULTS / f"{name}.json", args.stages)
    stages.update(kept)
    data["settings"]["invocations"] = [*runs, dict(data["settings"])] if kept else [dict(data["settings"])]
    where = f"{cpu.get('model') or data['machine'].get('cpu', '?')}; {cpu_features(cpu)}"
    for stage in STAGES:  # the report's order
        if stage in args.stages:
            stages[stage] = {"measured": {"date": time.strftime("%Y-%m-%d"), "cpu": where}}
            stages[stage].update(run_stage(stage, args, work))
        elif stage in stages:
            stages[stage] = stages.pop(stage)
        if not args.keep:  # free the disk before the next stage
            shutil.rmtree(work / "builds", ignore_errors=True)
            shutil.rmtree(work / "quant", ignore_errors=True)
        j, m = write_results(name, data, report(data))  # after every stage: a stopped run keeps its results
    print(report(data))
    print(f"\nwritten: {j}, {m}", file=sys.stderr)


if __name__ == "__main__":
    main()
