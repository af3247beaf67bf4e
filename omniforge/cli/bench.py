"""``omniforge bench``: latency per stage and end to end, LLM metrics, memory, PyTorch side by side."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from omniforge.cli._common import log
from omniforge.errors import ConfigError, OmniforgeError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark builds: stages, LLM, end to end, memory, vs PyTorch eager",
        description="Measure every stage (min/p50/p90/p99/mean at its opt shapes), the LLM (time to first "
        "token, time per token, tokens/s at batch 1 and 4, tokens/s vs context, the bandwidth roofline), "
        "the end-to-end run (image + prompt in, text + image out) with peak memory, and the same run in "
        "PyTorch eager on the same weights. Writes bench.json, bench.md and PNG plots to --out.",
    )
    p.add_argument("builds", nargs="+", help="one or more build folders (e.g. fp32, int8, auto)")
    p.add_argument(
        "--out",
        default="bench-results",
        help="folder for bench.json, bench.md and plots (default bench-results)",
    )
    p.add_argument("--runs", type=int, default=20, help="timed runs per stage after warm-up (default 20)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps end to end (default 20)")
    p.add_argument("--new-tokens", type=int, default=16, help="generated tokens end to end (default 16)")
    p.add_argument("--threads", type=int, default=2, help="threads for every runtime (default 2)")
    p.add_argument("--no-reference", action="store_true", help="skip the PyTorch eager reference")
    p.add_argument("--compare", help="an earlier bench.json to print the change against")
    p.set_defaults(run=run)


def _child(module: str, args: list[str]) -> dict:
    """Run a measurement in its own process (clean peak memory, no thread pools shared)."""
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "out.json"
        res = subprocess.run([sys.executable, "-m", module, *args, str(out)], capture_output=True, text=True)
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise OmniforgeError(f"{module} failed: {last}")
        return json.loads(out.read_text())


def run(args: argparse.Namespace) -> int:
    from omniforge.bench.report import compare_runs, markdown, plots, write_json
    from omniforge.pipeline.manifest import load_manifest

    if args.runs < 1 or args.steps < 1 or args.new_tokens < 1 or args.threads < 1:
        raise ConfigError("--runs, --steps, --new-tokens and --threads must be >= 1")
    manifests = [load_manifest(b) for b in args.builds]  # fail fast on a bad build
    old = None
    if args.compare:
        try:
            old = json.loads(Path(args.compare).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--compare {args.compare} is not a readable bench.json ({exc})") from None
    import platform

    data: dict = {
        "machine": {"cpu": _cpu(), "platform": platform.platform()},
        "settings": {
            "runs": args.runs,
            "steps": args.steps,
            "new_tokens": args.new_tokens,
            "threads": args.threads,
        },
        "builds": [],
    }
    for path, m in zip(args.builds, manifests, strict=True):
        name = f"{Path(path).name} ({m.source.get('precision', 'fp32')})"
        log(f"measuring {name} ...")
        data["builds"].append(
            _child(
                "omniforge.bench.measure",
                [str(path), name, str(args.threads), str(args.runs), str(args.steps), str(args.new_tokens)],
            )
        )
    model = manifests[0].source.get("model")
    if not args.no_reference and model and Path(model).is_dir():
        log("measuring the PyTorch eager reference ...")
        data["reference"] = _child(
            "omniforge.bench.reference", [model, str(args.steps), str(args.new_tokens), str(args.threads)]
        )
    out = Path(args.out)
    write_json(out / "bench.json", data)
    md = markdown(data)
    (out / "bench.md").write_text(md + "\n")
    written = plots(data, out / "plots")
    print(md)
    if old is not None:
        print("\n## Change against " + args.compare + "\n")
        print(compare_runs(old, data))
    log(f"wrote {out / 'bench.json'}, {out / 'bench.md'} and {len(written)} plots in {out / 'plots'}")
    return 0


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
