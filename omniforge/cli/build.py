"""``omniforge build``: one command from a model folder to a runnable build."""

from __future__ import annotations

import argparse
import logging

from omniforge.cli._common import (
    add_quantize_args,
    check_folder_arg,
    check_out,
    exportable_model,
    log,
    model_arg,
    quantize_options,
    stage_precisions,
)
from omniforge.export.opsets import DEFAULT_OPSET, SUPPORTED_OPSETS, check_opset
from omniforge.pipeline.precision import BUILD_PRECISIONS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build",
        help="export, optimize, quantize and build engines in one cached, atomic step",
        description="Export every stage, run the graph passes, quantize to the chosen precision and "
        "assemble the build. Steps are cached by the content hash of their inputs and options, so a "
        "second identical run reuses everything; the build replaces --out only when complete.",
    )
    p.add_argument("model", nargs="?", help="model folder (default: the embedded tiny NExT-GPT)")
    p.add_argument("--out", "-o", required=True, help="build folder to write")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    p.add_argument(
        "--precision",
        choices=[str(p) for p in BUILD_PRECISIONS],
        default="fp32",
        help="auto: per stage, the fastest precision meeting its accuracy budget",
    )
    p.add_argument(
        "--emit-trtexec", action="store_true", help="write trtexec/build_engines.sh for the target device"
    )
    p.add_argument(
        "--trt-version",
        default="11",
        metavar="VERSION",
        help="TensorRT version of the device the trtexec lines are for (e.g. 10.3 on JetPack 6, 10.12, 11; "
        "strongly typed from 10.12; default 11)",
    )
    p.add_argument(
        "--stage-precision",
        action="append",
        metavar="STAGE=PRECISION",
        help="per-stage precision on top of --precision (fp32, fp16, int8; int4 for the llm), repeatable; "
        "only the stages whose precision changes are rebuilt",
    )
    p.add_argument(
        "--merge-adapter",
        action="append",
        default=[],
        metavar="NAME",
        help="also write an LLM variant with this LoRA adapter merged in, used for its requests "
        "(repeatable; the other adapters stay switched at run time)",
    )
    p.add_argument(
        "--llm-stream",
        choices=["auto", "always", "never"],
        default="auto",
        help="write the LLM stages from its safetensors shards layer by layer instead of loading the whole "
        "model (the other stages export as usual); auto: when its FP32 export would not fit in the memory "
        "available (see docs/real-size.md)",
    )
    p.add_argument("--cache", help="cache folder (default: $OMNIFORGE_HOME/build-cache)")
    p.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset of the export: {', '.join(map(str, SUPPORTED_OPSETS))} (part of the cache key)",
    )
    add_quantize_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_opset(args.opset)  # before any work
    cache = check_folder_arg(args.cache, "--cache") if args.cache else None
    reads = {"model folder": model_arg(args.model)}
    if cache is not None:
        reads["build cache"] = cache
    out = check_out(args.out, reads)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    from omniforge.build import BuildOptions, build, summary_table

    opts = BuildOptions(
        args.backend,
        args.precision,
        args.emit_trtexec,
        cache,
        stage_precisions(args.stage_precision),
        quantize_options(args, "int4" if args.precision in ("int4", "auto") else "int8"),
        args.opset,
        args.trt_version,
        llm_stream=args.llm_stream,
        merge_adapters=tuple(args.merge_adapter),
    )
    _, rows = build(exportable_model(args.model), out, opts, log=log)
    print(summary_table(rows))
    return 0
