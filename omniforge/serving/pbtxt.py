"""Triton model configs as protobuf text (``config.pbtxt``), written from plain values.

A config is a mapping of field names to values: strings, numbers, booleans, ``Sym`` (an enum
value, written bare), nested mappings (messages) and lists (repeated fields). Map fields such as
``parameters`` are written as repeated ``{ key, value }`` entries. ``check`` parses the text with
Triton's own ``ModelConfig`` message when ``tritonclient`` (which ships it) is installed, so a
field name or value Triton does not know is refused when the repository is written; the server
itself checks the rest under ``--strict-model-config=true``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from omniforge.errors import ConfigError


class Sym(str):
    """An enum value (``TYPE_FP32``, ``KIND_CPU``): written without quotes."""


def _scalar(v: Any) -> str:
    if isinstance(v, Sym):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        escaped = v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    raise TypeError(f"cannot write {type(v).__name__} {v!r} to a config")


def render(msg: Mapping[str, Any], indent: int = 0) -> str:
    """``msg`` as protobuf text, one field per line, nested messages indented by two spaces."""
    pad = "  " * indent
    lines: list[str] = []
    for key, value in msg.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            lines += [f"{pad}{key} {{", render(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, Sequence) and not isinstance(value, str):
            if value and all(isinstance(x, Mapping) for x in value):
                lines.append(f"{pad}{key} [")
                for i, x in enumerate(value):
                    lines += [
                        f"{pad}  {{",
                        render(x, indent + 2),
                        f"{pad}  }}{',' if i < len(value) - 1 else ''}",
                    ]
                lines.append(f"{pad}]")
            else:
                lines.append(f"{pad}{key}: [ {', '.join(_scalar(x) for x in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(line for line in lines if line)


def parameters(values: Mapping[str, str]) -> list[dict[str, Any]]:
    """A ``parameters`` map (string values) as its repeated entries."""
    return [{"key": k, "value": {"string_value": str(v)}} for k, v in values.items()]


def model_config_message() -> Any | None:
    """Triton's ``ModelConfig`` message class from ``tritonclient``, or None when it is not installed."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return None
    return model_config_pb2.ModelConfig


def check(text: str, name: str) -> bool:
    """``ConfigError`` unless ``text`` parses as Triton's ``ModelConfig``; False when the message
    is not available here (nothing was checked)."""
    message = model_config_message()
    if message is None:
        return False
    from google.protobuf import text_format

    try:
        text_format.Parse(text, message())
    except text_format.ParseError as exc:
        raise ConfigError(
            f"the config written for model '{name}' is not a Triton ModelConfig: {exc}"
        ) from None
    return True
