"""``omniforge check-trt``: check each stage's TensorRT graph against TensorRT's documented ONNX
rules for a version, without a GPU; exit 1 when anything is found."""

from __future__ import annotations

import argparse

from omniforge.engines.trt_check.versions import VERSIONS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-trt",
        help="check a build's TensorRT graphs against TensorRT's ONNX rules (no GPU needed)",
        description="For each stage, check the graph a TensorRT engine would be built from (qdq / "
        "weight_only_dq for INT8/INT4 stages, the FP16 graph, else canonical) against the operators, "
        "Q/DQ and block-quantization rules, strong typing and profile bounds TensorRT documents. "
        "Exits 1 when any violation is found.",
    )
    p.add_argument("build", help="build folder")
    p.add_argument(
        "--trt-version",
        action="append",
        choices=list(VERSIONS),
        help="TensorRT version to check for (repeatable; default: all of " + ", ".join(VERSIONS) + ")",
    )
    p.add_argument("--stage", action="append", help="only this stage (repeatable)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from omniforge.engines.trt_check import check_build

    versions = args.trt_version or list(VERSIONS)
    findings = check_build(args.build, versions, args.stage)
    rows = [
        (f.trt_version, f.stage, v.node, v.op_type, v.rule, v.message) for f in findings for v in f.violations
    ]
    for f in findings:
        status = f"{len(f.violations)} violation(s)" if f.violations else "ok"
        print(f"TensorRT {f.trt_version:5s} {f.stage:24s} {f.variant.role:15s} {f.variant.file}: {status}")
    if rows:
        print()
        print(_table(("trt", "stage", "node", "op", "rule", "violation"), rows))
    print(
        f"\n{len(rows)} violation(s) in {len({(f.stage, f.trt_version) for f in findings if f.violations})} "
        f"stage graph(s) for TensorRT {', '.join(versions)}"
    )
    return 1 if rows else 0


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [min(48, max(len(str(r[i])) for r in (header, *rows))) for i in range(len(header) - 1)]
    lines = []
    for r in (header, *rows):
        cells = [str(c)[:w].ljust(w) for c, w in zip(r, widths, strict=False)]
        lines.append("  ".join([*cells, str(r[-1])]))
    return "\n".join(lines)
