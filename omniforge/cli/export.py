"""``omniforge export``: trace every stage to ONNX, check parity, write the build folder."""

from __future__ import annotations

import argparse

from omniforge.cli._common import check_out, end_status_line, exportable_model, log, model_arg, split_list
from omniforge.errors import ConfigError
from omniforge.export.opsets import DEFAULT_OPSET, SUPPORTED_OPSETS, check_opset


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export every stage to ONNX with parity checks",
        description="Export each stage of a model folder to ONNX (dynamic axes from the pipeline "
        "description), check every stage against PyTorch in ONNX Runtime at several shapes, and "
        "write the build folder with manifest.json and the parity report. Without MODEL, the "
        "embedded tiny NExT-GPT is used.",
    )
    p.add_argument(
        "model",
        nargs="?",
        help="NExT-GPT folder (nextgpt.json) or HF Llama folder; default: the embedded tiny NExT-GPT",
    )
    p.add_argument("--out", "-o", required=True, help="build folder to write (replaced atomically)")
    p.add_argument("--stages", help="comma-separated stage names (default: all); see `omniforge describe`")
    p.add_argument(
        "--adapter",
        default="default",
        help="LoRA adapter to merge into the LLM, or 'none' (default: the model's merge_adapter)",
    )
    p.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset: {', '.join(map(str, SUPPORTED_OPSETS))} (what export, optimize and quantize all support)",
    )
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads for the parity check")
    p.add_argument("--skip-parity", action="store_true", help="do not run the parity check (not recommended)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_opset(args.opset)  # before any work
    if args.threads < 1:
        raise ConfigError("--threads must be at least 1")
    out = check_out(args.out, {"model folder": model_arg(args.model)})
    model = exportable_model(args.model, split_list(args.stages))
    from omniforge.pipeline.describe import describe
    from omniforge.pipeline.model_config import load_model_config

    describe(load_model_config(model)).select(split_list(args.stages))  # fail fast on a bad model or stage
    # torch is imported only here, when an export actually runs
    from omniforge.export.exporter import ExportOptions, export_pipeline, parity_table

    opts = ExportOptions(
        stages=split_list(args.stages),
        adapter=None if args.adapter == "none" else args.adapter,
        opset=args.opset,
        parity=not args.skip_parity,
        threads=args.threads,
    )
    log(f"exporting {model} -> {args.out}")
    manifest, reports = export_pipeline(model, out, opts, log=log)
    end_status_line()
    print(parity_table(reports))
    print(f"\nbuild written to {args.out} ({len(manifest.stages)} stages, manifest.json, parity.md)")
    return 0
