"""``omniforge compare``: per-stage comparison of two builds; exits non-zero outside tolerance."""

from __future__ import annotations

import argparse
import logging

from omniforge.cli._common import split_list
from omniforge.errors import OmniforgeError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="compare two builds stage by stage on the same seeded inputs",
        description="Run every stage of two builds (e.g. fp32 and int8) on the same seeded inputs with "
        "Polygraphy's comparator over ONNX Runtime, print max abs/rel error and cosine per stage, and "
        "exit 1 if any stage is outside the tolerance.",
    )
    p.add_argument("build_a")
    p.add_argument("build_b")
    p.add_argument("--atol", type=float, default=1e-3)
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--stages", help="comma-separated stage names (default: all stages both builds have)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    logging.getLogger("polygraphy").setLevel(logging.ERROR)
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    from omniforge.engines.compare import compare_builds, comparison_table

    rows = compare_builds(args.build_a, args.build_b, args.atol, args.rtol, split_list(args.stages))
    print(comparison_table(rows, args.atol, args.rtol))
    failed = [r.stage for r in rows if not r.passed]
    if failed:
        raise OmniforgeError(
            f"{len(failed)} stage(s) outside atol {args.atol:g} / rtol {args.rtol:g}: {', '.join(failed)}"
        )
    return 0
