"""``omniforge create-default``: write the embedded tiny NExT-GPT to a folder."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "create-default",
        help="write the tiny seeded NExT-GPT model folder",
        description="Build the tiny NExT-GPT (real transformers/diffusers/peft classes, seeded "
        "weights) and save it in the libraries' on-disk formats. Nothing is downloaded.",
    )
    p.add_argument("folder", help="where to write the model folder (replaced if it exists)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    p.add_argument(
        "--family",
        action="append",
        default=[],
        metavar="NAME[,NAME]",
        help="swap a part for a tiny member of another family, at most one per slot: "
        "qwen2 or qwen3 (LLM), whisper or clap (audio encoder), blip2 (image encoder), "
        "cogvideox (video decoder); repeatable",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from omniforge.errors import ConfigError
    from omniforge.model.families import check_families
    from omniforge.model.tiny import TinyConfig, create_default

    target = Path(args.folder)
    if target.exists() and not (target / "nextgpt.json").is_file() and any(target.iterdir()):
        raise ConfigError(f"'{target}' exists and is not a model folder; refusing to replace it")
    names = [n.strip() for arg in args.family for n in arg.split(",") if n.strip()]
    names = check_families(names)  # before anything is written
    create_default(target, TinyConfig(seed=args.seed), names)
    with_ = f" with {', '.join(names)}" if names else ""
    print(f"tiny NExT-GPT{with_} written to {target}")
    return 0
