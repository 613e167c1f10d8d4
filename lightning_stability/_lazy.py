"""Lazy attribute loading for the public sub-packages.

Each sub-package maps its public names to the module that defines them, so ``import lightning_stability.callbacks``
stays cheap and a name is imported only when it is first used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """Return a module-level ``__getattr__`` resolving ``names[attr]`` (a module relative to ``package``)."""

    def __getattr__(attr: str) -> Any:
        try:
            module = names[attr]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {attr!r}") from None
        value = getattr(importlib.import_module(module, package), attr)
        return value

    return __getattr__
