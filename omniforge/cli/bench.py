"""``omniforge bench``: latency per stage and end to end, LLM metrics, memory, PyTorch side by side;
with ``--server``, load on a running omniforge Triton server (``omniforge.serving.load``)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from omniforge.cli._common import log
from omniforge.errors import ConfigError, OmniforgeError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark builds (stages, LLM, end to end, memory, vs PyTorch eager) or a running server",
        description="Measure every stage (min/p50/p90/p99/mean at its opt shapes), the LLM (time to first "
        "token, time per token, tokens/s at batch 1 and 4, tokens/s vs context, the bandwidth roofline), "
        "the end-to-end run (image + prompt in, text + image out) with peak memory, and the same run in "
        "PyTorch eager on the same weights. Writes bench.json, bench.md and PNG plots to --out. "
        "With --server instead of builds: load a running `omniforge serve` over gRPC with 1, 4 and 16 "
        "concurrent clients sending text (streamed from `llm`) and image requests (to `any2any`), and "
        "print requests/s, time to first token, per-token latency, end-to-end p50/p99 and errors.",
    )
    p.add_argument("builds", nargs="*", help="one or more build folders (e.g. fp32, int8, auto)")
    p.add_argument(
        "--out",
        default="bench-results",
        help="folder for bench.json, bench.md and plots (default bench-results)",
    )
    p.add_argument("--runs", type=int, default=20, help="timed runs per stage after warm-up (default 20)")
    p.add_argument(
        "--steps", type=int, default=20, help="denoising steps end to end and per image request (default 20)"
    )
    p.add_argument(
        "--new-tokens", type=int, default=16, help="generated tokens end to end and per request (default 16)"
    )
    p.add_argument("--threads", type=int, default=2, help="threads for every runtime (default 2)")
    p.add_argument("--no-reference", action="store_true", help="skip the PyTorch eager reference")
    p.add_argument("--compare", help="an earlier bench.json to print the change against")
    load = p.add_argument_group("load on a running server (instead of builds)")
    load.add_argument(
        "--server",
        metavar="URL",
        help="the gRPC address (HOST:PORT) of a server started by `omniforge serve`",
    )
    load.add_argument("--clients", help="comma-separated numbers of concurrent clients (default 1,4,16)")
    load.add_argument(
        "--kind",
        help="request kinds, comma-separated: text, image (default text,image; image only when the "
        "server has the any2any model)",
    )
    load.add_argument(
        "--requests", type=int, help="requests per client at each number of clients (default 8)"
    )
    load.add_argument(
        "--timeout", type=float, help="seconds a request may take before it counts as an error (default 300)"
    )
    load.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
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
    load_only = ("clients", "kind", "requests", "timeout", "json")
    if args.server is not None:
        if args.builds:
            raise ConfigError("give build folders or --server, not both")
        return run_server(args)
    given = [f"--{n}" for n in load_only if getattr(args, n) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} {'goes' if len(given) == 1 else 'go'} with --server URL")
    if not args.builds:
        raise ConfigError("give one or more build folders, or --server URL for a running server")
    return run_builds(args)


def _list(value: str | None, default: tuple, what: str, convert: Callable[[str], object] = str) -> tuple:
    """A comma-separated option as a tuple (``default`` when not given)."""
    if value is None:
        return default
    items = [v.strip() for v in value.split(",") if v.strip()]
    try:
        return tuple(convert(v) for v in items)
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated numbers, got {value!r}") from None


def run_server(args: argparse.Namespace) -> int:
    """``--server``: load on a running server; the table on stdout, progress only with -v."""
    from omniforge.serving.load import KINDS, LoadOptions, run_load

    requests = 8 if args.requests is None else args.requests
    if args.new_tokens < 1 or args.steps < 1 or requests < 1:
        raise ConfigError("--new-tokens, --steps and --requests must be >= 1")
    options = LoadOptions(
        server=args.server,
        clients=_list(args.clients, (1, 4, 16), "--clients", int),
        kinds=_list(args.kind, KINDS, "--kind"),
        requests=requests,
        max_new_tokens=args.new_tokens,
        steps=args.steps,
        timeout_s=300.0 if args.timeout is None else args.timeout,
    )
    report = run_load(options, log=log if getattr(args, "verbose", False) else lambda _m: None)
    print(report.table())
    if args.json:
        try:
            report.write_json(args.json)
        except OSError as exc:
            raise ConfigError(f"cannot write --json {args.json} ({exc.strerror})") from None
    return 0


def run_builds(args: argparse.Namespace) -> int:
    from omniforge.bench.measure import IMAGE_REQUEST
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
    mirrored = any(
        b["e2e"].get("request") == IMAGE_REQUEST for b in data["builds"]
    )  # what the reference runs
    if not args.no_reference and mirrored and model and Path(model).is_dir():
        log("measuring the PyTorch eager reference ...")
        ref = _child(
            "omniforge.bench.reference", [model, str(args.steps), str(args.new_tokens), str(args.threads)]
        )
        if "skipped" in ref:
            log(f"no PyTorch eager reference: {ref['skipped']}")
        else:
            data["reference"] = ref
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
