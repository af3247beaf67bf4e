"""``omniforge``: one entry point, one module per subcommand (``add_parser`` + ``run``)."""

from __future__ import annotations

import argparse
import sys

from omniforge import __version__
from omniforge.cli import (
    bench,
    build,
    check_trt,
    compare,
    create_default,
    describe,
    export,
    inspect,
    optimize,
    quantize,
    run,
)
from omniforge.cli._common import add_verbose_arg, console
from omniforge.errors import OmniforgeError

COMMANDS = (
    build,
    export,
    optimize,
    quantize,
    run,
    compare,
    bench,
    describe,
    inspect,
    check_trt,
    create_default,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omniforge",
        description="Compile NExT-GPT-style any-to-any pipelines to ONNX / TensorRT and run them.",
    )
    parser.add_argument("--version", action="version", version=f"omniforge {__version__}")
    add_verbose_arg(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        cmd.add_parser(sub)
    for p in sub.choices.values():  # also after the subcommand; absent there, the top-level value stands
        add_verbose_arg(p, default=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with console(args.verbose):
            return int(args.run(args) or 0)
    except OmniforgeError as exc:
        print(f"omniforge: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("omniforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
