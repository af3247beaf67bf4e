"""``omniforge optimize``: graph passes over every stage of a build, each proven by parity."""

from __future__ import annotations

import argparse

from omniforge.cli._common import check_out, check_path, end_status_line, log


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "optimize",
        help="run the graph passes on every stage of a build",
        description="Fold constants, clean Reshape/Transpose chains, recognise norms, fold norm affines "
        "into the following Linear layers, fuse MatMul+Add; each stage is kept only if it matches "
        "the original within 1e-5, and an ONNX Runtime-lowered graph is saved beside it. The build "
        "is replaced atomically (or written to --out).",
    )
    p.add_argument("build", help="build folder (from `omniforge export`)")
    p.add_argument("--out", help="write the optimized build here instead of replacing BUILD")
    p.add_argument("--no-lower", action="store_true", help="do not save ONNX Runtime-lowered graphs")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    build = check_path(args.build, "build path")
    # without --out the build itself is replaced, so it gets the same checks
    out = check_out(
        args.out or args.build, {"build": build}, "--out" if args.out else "BUILD", replace_read=True
    )
    from omniforge.passes.build import optimize_build, optimize_table

    log(f"optimizing {args.build} ...")
    _, results = optimize_build(build, out, lower=not args.no_lower, log=log)
    end_status_line()
    print(optimize_table(results))
    print(f"\noptimized build written to {args.out or args.build} (optimize.md)")
    return 0
