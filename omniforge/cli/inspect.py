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

    m = load_manifest(args.build, verify=True)
    print(
        f"build {args.build}: schema {m.schema_version}, {len(m.stages)} stages, {len(m.artifacts)} artifacts verified"
    )
    print(f"source: {m.source.get('model')} (adapter: {m.source.get('adapter')})")
    print("tools: " + ", ".join(f"{k} {v}" for k, v in m.tools.items()))
    for name, sb in m.stages.items():
        size = sum(m.artifacts[p].size for p in (sb.file, *sb.data_files))
        print(f"  {name:24s} {sb.precision:5s} {sb.nodes:6d} nodes {size / 1024:9.0f} KiB  {sb.file}")
    return 0
