"""``omniforge triton``: write a Triton Inference Server model repository for a build."""

from __future__ import annotations

import argparse


def add_repository_args(p: argparse.ArgumentParser) -> None:
    """The options of the repository writer (shared with ``omniforge serve``)."""
    p.add_argument(
        "--copy",
        action="store_true",
        help="copy the build's files into the repository (default: refer to the build folder where it lies)",
    )
    p.add_argument(
        "--llm-slots",
        type=int,
        default=4,
        help="KV-cache slots of the llm model: requests generating at once (default 4)",
    )
    p.add_argument(
        "--llm-queue",
        type=int,
        default=64,
        help="requests that may wait for an llm slot before more are refused (default 64)",
    )
    p.add_argument(
        "--any2any-stages",
        default="process",
        choices=["process", "python", "onnxruntime", "tensorrt"],
        help="where the any2any model runs the stages: in its own process (default), or through BLS "
        "on the <stage>_py, <stage>_onnx or <stage>_trt models",
    )
    p.add_argument("--any2any-workers", type=int, default=4, help="any2any requests run at once (default 4)")
    p.add_argument(
        "--onnx-variant",
        default="served",
        choices=["served", "canonical"],
        help="graph of the <stage>_onnx models: the one omniforge's runtime serves (ORT-lowered or "
        "quantized; default) or the exported FP32 graph of standard ops",
    )
    p.add_argument(
        "--providers",
        default="CPUExecutionProvider",
        help="comma-separated ONNX Runtime providers of the Python-backend models, e.g. "
        "CUDAExecutionProvider,CPUExecutionProvider on a GPU host with onnxruntime-gpu (default: CPU)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="ONNX Runtime threads per Python-backend model (default 0: one per core)",
    )
    p.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=500,
        help="dynamic batching: how long a request may wait for others (default 500)",
    )


def repository_options(args: argparse.Namespace):
    from omniforge.serving.repository import RepositoryOptions

    return RepositoryOptions(
        copy=args.copy,
        llm_slots=args.llm_slots,
        llm_queue=args.llm_queue,
        any2any_stages=args.any2any_stages,
        any2any_workers=args.any2any_workers,
        onnx_variant=args.onnx_variant,
        max_queue_delay_us=args.max_queue_delay_us,
        providers=tuple(p.strip() for p in args.providers.split(",") if p.strip()),
        threads=args.threads,
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "triton",
        help="write a Triton Inference Server model repository for a build",
        description="Write a Triton model repository for a build: per stage an onnxruntime model, a "
        "tensorrt_plan model where the build has engines and a Python-backend model on omniforge's "
        "engine; the streaming llm model, the any2any model and omniforge_build (the manifest). "
        "Configs are valid under --strict-model-config=true; the Python models check the build's "
        "SHA-256 at load. Written atomically. See docs/serving.md.",
    )
    p.add_argument("build", help="build folder")
    p.add_argument("--out", required=True, help="repository folder to write (replaced when complete)")
    add_repository_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from omniforge.cli._common import log
    from omniforge.serving.repository import write_repository

    repo = write_repository(args.build, args.out, repository_options(args), log=log)
    by_kind = {k: repo.names(kind=k) for k in ("llm", "any2any", "build")}
    print(f"repository {repo.path}: {len(repo.models)} models")
    for backend in ("onnxruntime", "tensorrt", "python"):
        names = [m.name for m in repo.models if m.backend == backend and m.kind == "stage"]
        if names:
            print(f"  {backend + ' stages':20s} {', '.join(names)}")
    print(f"  {'pipeline':20s} {', '.join(by_kind['llm'] + by_kind['any2any'] + by_kind['build'])} (python)")
    print(f"serve it: omniforge serve --repo {repo.path}")
    return 0
