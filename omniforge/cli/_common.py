"""Small helpers shared by subcommands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def log(msg: str) -> None:
    """Progress goes to stderr so stdout stays clean for results."""
    print(msg, file=sys.stderr, flush=True)


def resolve_model(path: str | None) -> Path:
    """The model folder a command works on: the given path, or the embedded default."""
    if path:
        return Path(path)
    from omniforge.model.tiny import default_model_dir, ensure_default

    if not (default_model_dir() / "nextgpt.json").is_file():
        log(f"creating the embedded tiny NExT-GPT in {default_model_dir()} ...")
    return ensure_default()


def split_list(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    """Options that shape quantized stages, shared by ``quantize`` and ``build``."""
    g = p.add_argument_group("quantization")
    g.add_argument(
        "--block-size", type=int, default=32, help="LLM weight-only block size (16..256, default 32)"
    )
    g.add_argument("--asymmetric", action="store_true", help="asymmetric LLM weight-only quantization (RTN)")
    g.add_argument(
        "--method",
        choices=["rtn", "awq", "gptq"],
        default="rtn",
        help="LLM weight-only method: round-to-nearest; AWQ scales, then RTN; or GPTQ error-correcting "
        "rounding (both calibrated on captured prompts and the shipped text)",
    )
    g.add_argument(
        "--int8-mode",
        choices=["auto", "static", "dynamic"],
        default="auto",
        help="INT8 for the other stages: auto = static QDQ for UNets/VAE/vocoder, dynamic for transformer "
        "stages (static everywhere with --backend tensorrt)",
    )
    g.add_argument(
        "--calibration-method",
        choices=["minmax", "percentile", "entropy"],
        default="minmax",
        help="activation ranges of static INT8 (default minmax)",
    )
    g.add_argument(
        "--smoothquant", type=float, metavar="ALPHA", help="SmoothQuant before static INT8 (alpha 0..1)"
    )
    g.add_argument(
        "--calibration-data",
        metavar="DIR",
        help="folder with prompts.jsonl (or prompts.txt), images and .wav files to calibrate on "
        "(default: prompts and synthetic media shipped with omniforge)",
    )
    g.add_argument(
        "--int8-budget", type=float, default=0.999, help="mean cosine to FP32 the INT8 fallback restores"
    )


def quantize_options(args: argparse.Namespace, precision: str):
    from omniforge.calibration.capture import CalibrationInputs
    from omniforge.calibration.quantize import QuantizeOptions
    from omniforge.calibration.weight_only import WeightOnlyConfig

    return QuantizeOptions(
        weight_only=WeightOnlyConfig(
            bits=4 if precision == "int4" else 8,
            block_size=args.block_size,
            symmetric=not args.asymmetric,
            method=args.method,
        ),
        int8_mode=args.int8_mode,
        calibration_method=args.calibration_method,
        smoothquant_alpha=args.smoothquant,
        budget=args.int8_budget,
        calibration=CalibrationInputs.from_folder(args.calibration_data) if args.calibration_data else None,
    )


def stage_precisions(values: list[str] | None) -> dict[str, str]:
    """``["llm=int4", "image_unet=fp32"]`` -> {"llm": "int4", "image_unet": "fp32"}."""
    from omniforge.errors import ConfigError

    out = {}
    for v in values or []:
        name, sep, prec = v.partition("=")
        if not sep or not name or not prec:
            raise ConfigError(f"--stage-precision takes STAGE=PRECISION, got '{v}'")
        out[name.strip()] = prec.strip()
    return out
