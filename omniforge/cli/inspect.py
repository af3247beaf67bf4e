"""``omniforge inspect``: validate a build folder (manifest schema + every artifact's SHA-256)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="verify a build folder and list its stages",
        description="Validate manifest.json, check every artifact's SHA-256 and list the stages.",
    )
    p.add_argument("build", help="build folder")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from omniforge.pipeline.manifest import load_manifest
    from omniforge.runtime.build import Build

    m = load_manifest(args.build, verify=True)
    graphs = Build(args.build, verify=False).verify_graphs()  # external data listed and hashed
    upgraded = (
        f" (read as version {m.read_version}, upgraded in memory)"
        if m.read_version != m.schema_version
        else ""
    )
    print(
        f"build {args.build}: schema {m.schema_version}{upgraded}, {len(m.stages)} stages, "
        f"{len(m.artifacts)} artifacts verified, {graphs} graphs read only listed files"
    )
    merged = m.source.get("adapter")
    print(f"source: {m.source.get('model')} (adapter merged at export: {merged or 'none'})")
    if "adapters" in m.files:
        index = Build(args.build, verify=False).json("adapters")
        with_variant = set(m.stage_build("llm").merged()) if "llm" in m.stages else set()
        listed = ", ".join(
            f"{n} (rank {a['rank']}, {a['dtype']}{', merged variant' if n in with_variant else ''})"
            for n, a in sorted(index["adapters"].items())
        )
        print(f"adapters switched per request: {listed}")
    print("tools: " + ", ".join(f"{k} {v}" for k, v in m.tools.items()))
    print(f"  {'stage':24s} {'prec':5s} {'served variant':16s} {'KiB':>9s}  file (other variants)")
    for name, sb in m.stages.items():
        served = sb.runtime_variant()
        size = sum(m.artifacts[p].size for p in (served.file, *served.data_files))
        others = ", ".join(
            f"{v.role}" + (f"+{v.adapter}" if v.adapter else "") for v in sb.variants if v is not served
        )
        print(
            f"  {name:24s} {sb.precision:5s} {served.role:16s} {size / 1024:9.0f}  {served.file} ({others or '-'})"
        )
    return 0
