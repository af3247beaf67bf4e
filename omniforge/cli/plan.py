"""``omniforge plan``: the peak memory of each request type and which stages to keep resident."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    from omniforge.runtime.plan import ANY, REQUESTS

    p = sub.add_parser(
        "plan",
        help="peak memory per request type, and which stages to keep resident under a budget",
        description="From the manifest alone: each stage's weights, session and arena, the LLM's KV "
        "pool, the peak resident memory of each request type, and (with --memory) which stages stay "
        "resident and which are opened per request so that every peak fits. The model and its "
        "measured constants are in docs/plan.md.",
    )
    p.add_argument("build", help="build folder")
    p.add_argument("--memory", help="the memory budget, e.g. 8GiB, 512MiB or 8GB (default: none)")
    p.add_argument(
        "--request",
        action="append",
        default=[],
        choices=[*REQUESTS, ANY],
        help="request type to plan for (repeatable; default: any, every type the build serves)",
    )
    p.add_argument("--slots", type=int, default=1, help="KV-cache slots, as `run` uses (default 1)")
    p.add_argument(
        "--llm-backend",
        default="auto",
        choices=["auto", "native", "python"],
        help="the LLM's decode loop, as LlmRuntime's backend: native adds its library and a second "
        "LLM session (default auto: native where libomniforge is found, as `run` does)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from omniforge.errors import ConfigError
    from omniforge.pipeline.manifest import load_manifest
    from omniforge.runtime.plan import format_bytes, native_decoding, parse_memory, plan_memory

    budget = None if args.memory is None else parse_memory(args.memory)
    if not 1 <= args.slots <= 4096:
        raise ConfigError(f"--slots must lie in [1, 4096], got {args.slots}")
    native = native_decoding(args.llm_backend)
    plan = plan_memory(load_manifest(args.build), budget, args.request or ["any"], args.slots, native=native)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return 0
    mib = 1 << 20
    fits = "" if budget is None else f", budget {format_bytes(budget)}"
    print(
        f"plan for {args.build}{fits}: fixed {format_bytes(plan.fixed)} (runtime, LLM, KV pool "
        f"{format_bytes(plan.kv_pool)} for {args.slots} slot(s){', native decoding' if native else ''}); "
        f"largest peak {format_bytes(plan.peak)}"
    )
    print(f"  {'stage':24s} {'weights':>8s} {'session':>8s} {'arena':>8s}  {'keep':9s} requests")
    for name, s in plan.stages.items():
        keep = "resident" if name in plan.resident else "per use"
        users = (
            [r for r, v in plan.needs.items() if name in v]
            if name not in ("llm", "token_embedding")
            else ["all"]
        )
        print(
            f"  {name:24s} {s.weights / mib:8.1f} {s.session / mib:8.1f} {s.activation / mib:8.1f}  "
            f"{keep:9s} {', '.join(users)}"
        )
    print("  peak MiB: " + ", ".join(f"{r} {v / mib:.1f}" for r, v in plan.peaks.items()))
    return 0
