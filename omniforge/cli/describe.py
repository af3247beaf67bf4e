"""``omniforge describe``: print the pipeline description of a model or build folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from omniforge.cli._common import resolve_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "describe",
        help="print the stages, their tensors and dynamic axes",
        description="Print the pipeline description (stages, inputs/outputs, dynamic axes with "
        "min/opt/max) of a model folder or a build folder.",
    )
    p.add_argument(
        "path", nargs="?", help="model folder or build folder (default: the embedded tiny NExT-GPT)"
    )
    p.set_defaults(run=run)


def _shape(shape: tuple) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def run(args: argparse.Namespace) -> int:
    from omniforge.pipeline.describe import describe
    from omniforge.pipeline.manifest import load_manifest
    from omniforge.pipeline.model_config import load_model_config

    if args.path and (Path(args.path) / "manifest.json").is_file():
        spec = load_manifest(args.path, verify=False).pipeline
    else:
        spec = describe(load_model_config(resolve_model(args.path)))
    print(f"pipeline {spec.name}: {len(spec.stages)} stages")
    for s in spec.stages:
        print(f"\n{s.name} [{s.kind}] <- {s.component}")
        for t in s.inputs[:4]:
            print(f"  in  {t.name}: {t.dtype}{_shape(t.shape)}")
        if len(s.inputs) > 4:
            print(f"  in  ... {len(s.inputs) - 4} more (KV cache)")
        for t in s.outputs[:3]:
            print(f"  out {t.name}: {t.dtype}{_shape(t.shape)}")
        if len(s.outputs) > 3:
            print(f"  out ... {len(s.outputs) - 3} more (KV cache)")
        dims = ", ".join(f"{d.name}={d.min}/{d.opt}/{d.max}" for d in s.dims)
        print(f"  dims (min/opt/max): {dims}")
    if spec.edges:
        print("\nconnections:")
        for e in spec.edges:
            print(f"  {e.src} -> {e.dst}" + (f"  ({e.via})" if e.via else ""))
    return 0
