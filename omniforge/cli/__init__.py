"""``omniforge``: one entry point, one module per subcommand (``add_parser`` + ``run``)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from omniforge import __version__
from omniforge.cli import (
    bench,
    build,
    check_trt,
    compare,
    create_default,
    describe,
    export,
    import_,
    inspect,
    optimize,
    plan,
    quantize,
    run,
    serve,
    triton,
)
from omniforge.cli._common import add_verbose_arg, console
from omniforge.errors import OmniforgeError

COMMANDS = (
    import_,
    build,
    export,
    optimize,
    quantize,
    run,
    compare,
    bench,
    plan,
    describe,
    inspect,
    check_trt,
    triton,
    serve,
    create_default,
)


class _Parser(argparse.ArgumentParser):
    """argparse with omniforge's error form: a usage error is one line on stderr and exit 1, like
    every other error a user can cause (``--help`` still prints the full usage)."""

    def error(self, message: str) -> NoReturn:
        line = " ".join(message.split())
        self.exit(1, f"omniforge: error: {line} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
        return _report(f"omniforge: error: {exc}", 1)
    except KeyboardInterrupt:
        return _report("omniforge: interrupted", 130)
    except BrokenPipeError:  # the reader of stdout went away (`omniforge run ... | head -c1`)
        _detach_stdout()
        return 1


def _report(line: str, code: int) -> int:
    """Print ``line`` to stderr (unless stderr is gone too) and return ``code``."""
    try:
        print(line, file=sys.stderr)
    except (BrokenPipeError, ValueError):
        pass
    return code


def _detach_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (captured, closed)
        pass


if __name__ == "__main__":
    sys.exit(main())
