"""The memory plan against measured peak RSS: for each build given, each request type served in a
fresh process (``omniforge.bench.peak``), its peak RSS above the interpreter's against
``omniforge plan``'s prediction for that request alone.

    python benchmarks/plan_accuracy.py BUILD [BUILD ...] [--request text] [--backend python]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, write_results  # noqa: E402

from omniforge.bench.peak import measure_requests  # noqa: E402
from omniforge.pipeline.manifest import load_manifest  # noqa: E402
from omniforge.runtime.plan import MiB, plan_memory, servable  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("builds", nargs="+")
    ap.add_argument("--request", action="append", help="request types (default: every one the build serves)")
    ap.add_argument("--backend", action="append", choices=["python", "native"], help="default: python")
    ap.add_argument(
        "--fill-context",
        action="store_true",
        help="prompts as long as the context holds (the plan's worst case)",
    )
    ap.add_argument("--name", default="plan_accuracy", help="results file name under benchmarks/results/")
    args = ap.parse_args()
    rows = []
    for build in args.builds:
        manifest = load_manifest(build)
        llm_bytes = manifest.served_bytes("llm")
        for request in args.request or servable(manifest):
            for backend in args.backend or ["python"]:
                got = measure_requests(
                    build, request, backend=backend, fill_context=args.fill_context, timeout=3600
                )
                measured = got["peak"] - got["base"]
                plan = plan_memory(manifest, None, [request], native=backend == "native")
                predicted = plan.peaks[request]
                rows.append(
                    {
                        "build": str(build),
                        "llm_served_bytes": llm_bytes,
                        "request": request,
                        "backend": got["backend"],
                        "prompt": "fills the context" if args.fill_context else "2 words",
                        "measured_bytes": measured,
                        "predicted_bytes": predicted,
                        "error": predicted / measured - 1,
                    }
                )
                print(
                    f"{Path(build).name} {request} {got['backend']}: measured {measured / MiB:.0f} MiB, "
                    f"predicted {predicted / MiB:.0f} MiB ({predicted / measured - 1:+.1%})",
                    file=sys.stderr,
                )
    lines = [
        "# The memory plan against measured peak RSS",
        "",
        f"Each request served once in a fresh process (prompt {'filling the context' if args.fill_context else 'of 2 words'}, "
        "16 new tokens, 4 denoising steps); peak RSS above the "
        "interpreter's with the runtime imported, against `omniforge plan`'s peak for that request alone.",
        "",
        "| build | LLM graph (MiB) | request | decode loop | measured (MiB) | predicted (MiB) | error |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {Path(r['build']).name} | {r['llm_served_bytes'] / MiB:.0f} | {r['request']} | {r['backend']} | "
            f"{r['measured_bytes'] / MiB:.0f} | {r['predicted_bytes'] / MiB:.0f} | {r['error']:+.1%} |"
        )
    j, m = write_results(args.name, {"machine": machine(), "rows": rows}, "\n".join(lines))
    print("\n".join(lines))
    print(f"\nwritten: {j}, {m}", file=sys.stderr)


if __name__ == "__main__":
    main()
