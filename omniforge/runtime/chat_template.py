"""Chat templates: the Jinja templates HF tokenizers carry, rendered as transformers renders them.

A template comes from ``chat_template.jinja`` beside the tokenizer (newer transformers save it
there; it wins over the config) or from ``chat_template`` in ``tokenizer_config.json``: one
template, or a list of ``{"name", "template"}`` of which ``default`` is used. It is rendered in
Jinja's immutable sandbox with ``trim_blocks`` and ``lstrip_blocks``, the loop controls, a
``{% generation %}`` block that renders its body, the functions ``raise_exception`` and
``strftime_now``, a ``tojson`` filter that leaves non-ASCII text and HTML characters as they are,
and as variables ``messages``, ``add_generation_prompt`` and the tokenizer's special tokens
(``bos_token``, ``eos_token``, ...). Models' templates come with their folders: the sandbox keeps
them from reaching Python's internals (hence ``jinja2>=3.1.6``, whose sandbox has no known escape).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from omniforge.errors import ConfigError, InputError, MissingDependencyError

CHAT_TEMPLATE_FILE = "chat_template.jinja"
NO_TEMPLATE = "this build has no chat template (neither chat_template.jinja nor one in its tokenizer config)"
SPECIAL_TOKEN_KEYS = tuple(f"{n}_token" for n in ("bos", "eos", "unk", "pad", "sep", "cls", "mask"))


class ChatPrompt(str):
    """Text rendered by a chat template. The template writes the special tokens it needs (a BOS
    included), so the tokenizer adds none to it, as transformers' ``apply_chat_template`` does;
    text built from it by string operations is a plain ``str`` again."""


class ChatTemplate:
    """One chat template and the special-token strings it may read."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_config(cls, config: Mapping[str, Any], jinja: str | None = None) -> ChatTemplate | None:
        """The template of a tokenizer: ``jinja`` (``chat_template.jinja``'s text) when given, else
        the config's ``chat_template``; None when it has neither."""
        source = jinja if jinja is not None else _config_template(config.get("chat_template"))
        if source is None:
            return None
        tokens = {k: t for k in SPECIAL_TOKEN_KEYS if (t := token_text(config.get(k))) is not None}
        return cls(source, tokens)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> ChatPrompt:
        """The conversation as the model reads it; ``add_generation_prompt`` appends the header that
        opens the assistant's reply."""
        checked = _check_messages(messages)
        template = _compile(self.source)
        import jinja2  # present: compiling imported it

        try:
            text = template.render(
                **self.special_tokens,
                messages=checked,
                add_generation_prompt=bool(add_generation_prompt),
            )
        except _TemplateRaised as exc:
            raise InputError(f"the chat template refuses this conversation: {exc}") from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise InputError(
                f"the chat template failed on this conversation ({type(exc).__name__}: {str(exc)[:200]})"
            ) from None
        return ChatPrompt(text)


def use_chat_template(asked: bool | None, has_template: bool, has_protocol: bool) -> bool:
    """Whether a conversation is rendered by the chat template: as ``asked``, or (None) when there
    is one and no conversation protocol (a NExT-GPT protocol lays out its prompts itself)."""
    if asked is None:
        return has_template and not has_protocol
    if asked and not has_template:
        raise ConfigError(NO_TEMPLATE)
    return bool(asked)


class _TemplateRaised(Exception):
    """``raise_exception(message)`` called by a template."""


def _config_template(value: object) -> str | None:
    """``chat_template`` of a tokenizer config: a string, or the ``default`` of a named list."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
        for t in value
    ):
        named = {t["name"]: t["template"] for t in value}
        if "default" not in named:
            raise ConfigError(
                f"the tokenizer config has chat templates named {sorted(named)} but none named 'default'"
            )
        return named["default"]
    raise ConfigError(
        "the tokenizer config's chat_template must be a string or a list of {name, template} objects"
    )


def token_text(value: object) -> str | None:
    if isinstance(value, dict):  # {"content": "</s>", ...} in some tokenizer configs
        value = value.get("content")
    return value if isinstance(value, str) else None


def _check_messages(messages: object) -> list[dict[str, Any]]:
    """Copies of the messages (the template sees plain dicts, not the caller's objects)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InputError(f"messages must be a list of {{role, content}} dicts, got {type(messages).__name__}")
    if not messages:
        raise InputError("a conversation needs at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise InputError(f"message {i} must be a dict with a string 'role', got {type(m).__name__}")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list, dict)):
            raise InputError(f"message {i}'s content must be text, got {type(content).__name__}")
        out.append({k: v for k, v in m.items() if v is not None})  # transformers drops None values too
    return out


@lru_cache(maxsize=8)
def _compile(source: str) -> Any:
    """The compiled template (one per distinct text; compiling costs milliseconds)."""
    env = _environment()
    import jinja2  # present: the environment imported it

    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"the chat template does not parse: line {exc.lineno}: {exc.message}") from None


@lru_cache(maxsize=1)
def _environment() -> Any:
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise MissingDependencyError(
            "chat templates need jinja2: install it with `pip install 'jinja2>=3.1.6'`"
        ) from None

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}`` marks the assistant's text for training
        masks; rendering only needs its body."""

        tags = {"generation"}

        def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise _TemplateRaised(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env
