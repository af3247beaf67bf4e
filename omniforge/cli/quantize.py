"""``omniforge quantize``: INT4/INT8 variants of a build, with an accuracy report."""

from __future__ import annotations

import argparse
import logging

from omniforge.cli._common import (
    add_quantize_args,
    check_out,
    check_path,
    log,
    quantize_options,
    stage_precisions,
)
from omniforge.pipeline.precision import QUANTIZED_PRECISIONS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="write an INT4 or INT8 copy of a build with an accuracy report",
        description="Quantize an FP32 build: the LLM weight-only (block-wise INT4 or INT8 as MatMulNBits, "
        "plus TensorRT's W4A16 / W8A16 DequantizeLinear form; the LM head too; the embedding table INT8 "
        "per row), every other stage INT8 with an accuracy-driven fallback, calibrated on inputs captured "
        "from the FP32 pipeline (stored in the new build's calibration/). Each stage is measured against "
        "FP32 on held-out inputs and the report is written to quantize.md in the new build.",
    )
    p.add_argument("build", help="FP32 build folder (from `omniforge export`, optionally optimized)")
    p.add_argument("--out", required=True, help="where to write the quantized build (replaced atomically)")
    p.add_argument(
        "--precision",
        choices=[str(p) for p in QUANTIZED_PRECISIONS],
        default="int4",
        help="int4/int8: the LLM weight-only at that precision, INT8 elsewhere; fp16: every stage but the LLM",
    )
    p.add_argument(
        "--stage-precision",
        action="append",
        metavar="STAGE=PRECISION",
        help="per-stage precision (fp32, fp16, int8; int4 for the llm), repeatable",
    )
    add_quantize_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    build = check_path(args.build, "build path")
    out = check_out(args.out, {"build": build})
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    from omniforge.calibration.quantize import quantize_build, quantize_table

    log(f"quantizing {args.build} to {args.precision} ...")
    _, results = quantize_build(
        build,
        out,
        args.precision,
        log=log,
        options=quantize_options(args, args.precision),
        overrides=stage_precisions(args.stage_precision),
    )
    print(quantize_table(results))
    print(f"\nquantized build written to {args.out} (quantize.md)")
    return 0
