"""``omniforge quantize``: INT4/INT8 variants of a build, with an accuracy report."""

from __future__ import annotations

import argparse
import logging

from omniforge.cli._common import log


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="write an INT4 or INT8 copy of a build with an accuracy report",
        description="Quantize an FP32 build: the LLM weight-only (block-wise INT4 or INT8, MatMulNBits; "
        "the LM head too; the embedding table INT8 per row), encoders and projectors dynamic INT8 with "
        "per-channel weights; decoders stay FP32 for now. Each stage is measured against FP32 and the "
        "report is written to quantize.md in the new build.",
    )
    p.add_argument("build", help="FP32 build folder (from `omniforge export`, optionally optimized)")
    p.add_argument("--out", required=True, help="where to write the quantized build (replaced atomically)")
    p.add_argument(
        "--precision", choices=["int4", "int8"], default="int4", help="LLM weight precision (default int4)"
    )
    p.add_argument("--block-size", type=int, default=32, help="weight-only block size (16..256, default 32)")
    p.add_argument(
        "--asymmetric", action="store_true", help="asymmetric weight-only quantization (zero points)"
    )
    p.add_argument(
        "--method",
        choices=["rtn", "awq", "gptq"],
        default="rtn",
        help="LLM weight-only method: round-to-nearest; AWQ scales, then RTN; or GPTQ error-correcting "
        "rounding (both calibrated on text)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    from omniforge.calibration.quantize import quantize_build, quantize_table
    from omniforge.calibration.weight_only import WeightOnlyConfig

    cfg = WeightOnlyConfig(
        bits=4 if args.precision == "int4" else 8,
        block_size=args.block_size,
        symmetric=not args.asymmetric,
        method=args.method,
    )
    _, results = quantize_build(args.build, args.out, args.precision, cfg, log=log)
    print(quantize_table(results))
    print(f"\nquantized build written to {args.out} (quantize.md)")
    return 0
