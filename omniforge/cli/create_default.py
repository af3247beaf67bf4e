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
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from omniforge.errors import ConfigError
    from omniforge.model.tiny import TinyConfig, create_default

    target = Path(args.folder)
    if target.exists() and not (target / "nextgpt.json").is_file() and any(target.iterdir()):
        raise ConfigError(f"'{target}' exists and is not a model folder; refusing to replace it")
    create_default(target, TinyConfig(seed=args.seed))
    print(f"tiny NExT-GPT written to {target}")
    return 0
