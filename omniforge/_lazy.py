"""Lazy handles for optional heavy dependencies.

``trt = lazy_import("tensorrt", extra="gpu")`` costs nothing at import time; the first
attribute access imports the module or raises one clear ``MissingDependencyError``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from omniforge.errors import MissingDependencyError


class LazyModule:
    """A module imported on first attribute access."""

    def __init__(self, name: str, extra: str, hint: str = "") -> None:
        self._name = name
        self._extra = extra
        self._hint = hint
        self._module: ModuleType | None = None

    def load(self) -> ModuleType:
        if self._module is None:
            try:
                self._module = importlib.import_module(self._name)
            except ImportError as exc:
                hint = f" {self._hint}" if self._hint else ""
                raise MissingDependencyError(
                    f"'{self._name}' is not installed ({exc}); install it with "
                    f"`pip install 'omniforge[{self._extra}]'`.{hint}"
                ) from None
        return self._module

    def available(self) -> bool:
        try:
            self.load()
        except MissingDependencyError:
            return False
        return True

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.load(), attr)


def lazy_import(name: str, extra: str, hint: str = "") -> LazyModule:
    return LazyModule(name, extra, hint)
