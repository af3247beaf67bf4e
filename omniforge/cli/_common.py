"""Small helpers shared by subcommands."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

# the libraries whose INFO logs and warnings flood a default run
LIBRARY_LOGGERS = (
    "onnxscript",
    "onnx_ir",
    "torch.onnx",
    "torch",
    "transformers",
    "diffusers",
    "huggingface_hub",
    "peft",
    "onnxruntime",
)
# read by the libraries when they are imported, so they also reach imports made after the setup
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
_ITEM = re.compile(r"^\[\d+/\d+\] ")  # "[3/15] stage: ..." - one item of a long step
_state = {"verbose": False, "transient": False}


def log(msg: str) -> None:
    """Progress goes to stderr so stdout stays clean for results.

    By default a per-item line (``[3/15] ...``) only updates a status line on a terminal (and is
    left out elsewhere), so a long step costs one line; with ``-v`` every line is kept."""
    err = sys.stderr
    tty = err.isatty()
    if _ITEM.match(msg) and not _state["verbose"]:
        if tty:
            err.write("\r\033[K" + msg[: _columns() - 1])
            err.flush()
            _state["transient"] = True
        return
    if _state["transient"]:
        err.write("\r\033[K")
        _state["transient"] = False
    print(msg, file=err, flush=True)


def end_status_line() -> None:
    """Clear a pending per-item status line before results are printed."""
    if _state["transient"]:
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()
        _state["transient"] = False


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 100


@contextlib.contextmanager
def console(verbose: bool = False) -> Iterator[None]:
    """Library logs, warnings and progress bars for one command: silenced unless ``verbose``.

    Everything set here is restored on exit (``main`` may run in a process that goes on)."""
    root = logging.getLogger()
    names = ("", *LIBRARY_LOGGERS)
    levels = {n: logging.getLogger(n).level for n in names}
    env = {k: os.environ.get(k) for k in (*QUIET_ENV, "OMNIFORGE_VERBOSE")}
    # a root handler of our own: a library's later logging.basicConfig(level=INFO) is then a no-op
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s [%(levelname)s] %(message)s"))
    root.addHandler(handler)
    _state["verbose"] = verbose
    with warnings.catch_warnings():
        if verbose:
            os.environ["OMNIFORGE_VERBOSE"] = "1"
            root.setLevel(logging.INFO)
            warnings.simplefilter("default")
        else:
            os.environ.update(QUIET_ENV)
            os.environ.pop("OMNIFORGE_VERBOSE", None)
            for n in names:
                logging.getLogger(n).setLevel(logging.ERROR)
            warnings.simplefilter("ignore")
        restore_bars = _silence_imported_libraries() if not verbose else list
        try:
            yield
        finally:
            end_status_line()
            restore_bars()
            _state["verbose"] = False
            root.removeHandler(handler)
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)
            for k, v in env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _silence_imported_libraries() -> Callable[[], object]:
    """Turn off the progress bars of libraries imported before the setup (the env vars reach later
    imports); returns what turns them back on."""
    undo: list[Callable[[], None]] = []
    for name in ("transformers", "diffusers"):
        lib = sys.modules.get(name)
        if lib is not None and lib.utils.logging.is_progress_bar_enabled():
            lib.utils.logging.disable_progress_bar()
            undo.append(lib.utils.logging.enable_progress_bar)
    hub = sys.modules.get("huggingface_hub")
    if hub is not None and not hub.utils.are_progress_bars_disabled():
        hub.utils.disable_progress_bars()
        undo.append(hub.utils.enable_progress_bars)
    return lambda: [f() for f in undo]


def add_verbose_arg(p: argparse.ArgumentParser, default: object = False) -> None:
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="show library logs, warnings and every progress line",
    )


def model_arg(path: str | None) -> Path:
    """The model folder a command will read, checked as a path but not created or read."""
    if path:
        return check_path(path, "model path")
    from omniforge.pipeline.model_config import default_model_dir

    return default_model_dir()


def resolve_model(path: str | None) -> Path:
    """The model folder a command works on: the given path, or the embedded default."""
    if path:
        return check_path(path, "model path")
    from omniforge.pipeline.model_config import default_model_dir

    folder = default_model_dir()
    if (folder / "nextgpt.json").is_file():
        return folder  # no torch import when the default already exists
    from omniforge.model.tiny import ensure_default

    log(f"creating the embedded tiny NExT-GPT in {folder} ...")
    return ensure_default()


def exportable_model(path: str | None, stages: list[str] | None = None) -> Path:
    """``resolve_model``, refusing a model whose selected stages could not run from text prompts."""
    model = resolve_model(path)
    if stages is None or {"llm", "token_embedding"} & set(stages):
        from omniforge.model.tokenizer import require_tokenizer_json
        from omniforge.pipeline.model_config import load_model_config

        require_tokenizer_json(load_model_config(model).llm)
    return model


PATH_MAX = 4096  # bytes of a whole path, with its terminating NUL (Linux)
NAME_MAX = 255  # bytes of one path component, where the file system does not say


def _shown(value: str) -> str:
    """A path as a message shows it: a very long one is cut."""
    return value if len(value) <= 80 else f"{value[:40]}...{value[-20:]} ({len(value)} characters)"


def _existing_ancestor(path: Path) -> Path | None:
    for folder in (path, *path.parents):
        if os.path.lexists(folder):
            return folder
    return None


def check_path(value: str, what: str) -> Path:
    """``value`` as a path, or one ``ConfigError`` for a path the operating system cannot take (a NUL
    byte, text that is not a file name, longer than ``PATH_MAX`` or a component beyond ``NAME_MAX``)."""
    from omniforge.errors import ConfigError

    if "\x00" in value:
        raise ConfigError(f"{what} '{_shown(value)}' contains a NUL byte")
    try:
        raw = os.fsencode(value)
    except UnicodeEncodeError:
        raise ConfigError(f"{what} '{_shown(value)}' is not a valid file name") from None
    if len(raw) >= PATH_MAX:
        raise ConfigError(f"{what} '{_shown(value)}' is longer than the {PATH_MAX - 1} bytes a path may have")
    path = Path(value)
    longest = max(raw.split(b"/"), key=len)
    try:
        name_max = os.pathconf(_existing_ancestor(path.absolute()) or "/", "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = NAME_MAX
    if len(longest) > name_max:
        raise ConfigError(
            f"{what} '{_shown(value)}' has a name of {len(longest)} bytes, longer than the {name_max} "
            "the file system allows"
        )
    return path


def check_folder_arg(value: str, what: str) -> Path:
    """``check_path`` for a folder to be written: it must not be a file, nor lie under one, and its
    nearest existing folder must be writable."""
    from omniforge.errors import ConfigError

    path = check_path(value, what)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} '{_shown(value)}' is a file, not a folder")
    ancestor = _existing_ancestor(path.absolute().parent)
    if ancestor is not None and not ancestor.is_dir():
        raise ConfigError(f"{what} '{_shown(value)}' lies under '{_shown(str(ancestor))}', which is a file")
    if ancestor is not None and not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{what} '{_shown(value)}' cannot be created: '{_shown(str(ancestor))}' is not writable"
        )
    return path


def check_out(value: str, reads: dict[str, Path], what: str = "--out", replace_read: bool = False) -> Path:
    """``check_folder_arg`` for a build folder that is replaced whole, refused before any work when
    replacing it would delete the caller's files: the current folder or a folder above it, a folder
    holding what the command reads (``reads``: what -> path), or a folder inside it. With
    ``replace_read`` the folder read may itself be the target (an in-place rewrite)."""
    from omniforge.errors import ConfigError

    path = check_folder_arg(value, what)
    target, cwd = path.resolve(), Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        where = "the current folder" if target == cwd else "a folder above the current one"
        raise ConfigError(f"{what} '{_shown(value)}' is {where}; replacing it would delete the files in it")
    for name, src in reads.items():
        src = src.resolve()
        if target == src and replace_read:
            continue
        if target == src or target in src.parents:
            raise ConfigError(
                f"{what} '{_shown(value)}' holds the {name} being read; replacing it would delete the {name}"
            )
        if src in target.parents:
            raise ConfigError(
                f"{what} '{_shown(value)}' lies inside the {name} being read; write it elsewhere"
            )
    return path


def split_list(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    """Options that shape quantized stages, shared by ``quantize`` and ``build``."""
    g = p.add_argument_group("quantization")
    g.add_argument(
        "--block-size",
        type=int,
        default=32,
        help="LLM weight-only block size of the MatMulNBits form (16..256, default 32); TensorRT's form uses 64, or 128 from 128 up",
    )
    g.add_argument(
        "--asymmetric",
        action="store_true",
        help="asymmetric LLM weight-only codes (a zero point per block) in the MatMulNBits form (TensorRT's is symmetric); rtn or awq",
    )
    g.add_argument(
        "--method",
        choices=["rtn", "awq", "gptq"],
        default="rtn",
        help="LLM weight-only method: round-to-nearest; AWQ scales, then RTN; or GPTQ error-correcting "
        "rounding (both calibrated on captured prompts and the shipped text)",
    )
    g.add_argument(
        "--int8-mode",
        choices=["auto", "static", "dynamic"],
        default="auto",
        help="INT8 for the other stages: auto = static QDQ for UNets/VAE/vocoder, dynamic for transformer "
        "stages (static everywhere with --backend tensorrt)",
    )
    g.add_argument(
        "--calibration-method",
        choices=["minmax", "percentile", "entropy"],
        default="minmax",
        help="activation ranges of static INT8 (default minmax)",
    )
    g.add_argument(
        "--smoothquant", type=float, metavar="ALPHA", help="SmoothQuant before static INT8 (alpha 0..1)"
    )
    g.add_argument(
        "--calibration-data",
        metavar="DIR",
        help="folder with prompts.jsonl (or prompts.txt), images and .wav files to calibrate on "
        "(default: prompts and synthetic media shipped with omniforge)",
    )
    g.add_argument(
        "--int8-budget",
        type=float,
        metavar="COSINE",
        help="mean cosine to FP32 on the calibration inputs that the INT8 fallback restores (default 0.999)",
    )
    g.add_argument(
        "--int8-max-fp32-layers",
        type=int,
        metavar="N",
        help="layers the INT8 fallback may keep FP32 to meet its budget (default 8)",
    )


def quantize_options(args: argparse.Namespace, precision: str):
    from omniforge.calibration.capture import CalibrationInputs
    from omniforge.calibration.quantize import QuantizeOptions
    from omniforge.calibration.weight_only import WeightOnlyConfig
    from omniforge.pipeline.precision import weight_bits

    fallback = {"budget": args.int8_budget, "max_fp32_layers": args.int8_max_fp32_layers}
    return QuantizeOptions(
        weight_only=WeightOnlyConfig(
            bits=weight_bits(precision),
            block_size=args.block_size,
            symmetric=not args.asymmetric,
            method=args.method,
        ),
        int8_mode=args.int8_mode,
        calibration_method=args.calibration_method,
        smoothquant_alpha=args.smoothquant,
        calibration=(
            CalibrationInputs.from_folder(check_path(args.calibration_data, "--calibration-data"))
            if args.calibration_data
            else None
        ),
        **{k: v for k, v in fallback.items() if v is not None},  # unset: QuantizeOptions' defaults
    )


def stage_precisions(values: list[str] | None) -> dict[str, str]:
    """``["llm=int4", "image_unet=fp32"]`` -> {"llm": "int4", "image_unet": "fp32"}."""
    from omniforge.errors import ConfigError

    out = {}
    for v in values or []:
        name, sep, prec = v.partition("=")
        if not sep or not name or not prec:
            raise ConfigError(f"--stage-precision takes STAGE=PRECISION, got '{v}'")
        out[name.strip()] = prec.strip()
    return out
