"""Lazy attribute loading for the public sub-packages, and the modules kept at an old import path.

Each sub-package maps its public names to the module that defines them, so ``import lightning_stability.callbacks``
stays cheap and a name is imported only when it is first used. A module that moved (``lightning_stability.nn.quantize``
is now ``lightning_stability.reference.codec.quantize``) stays importable at its old path as a thin module whose
names resolve, on first use, in the new one (:func:`moved_module`).
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


def moved_module(old: str, new: str) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` of the module left at the old path ``old``: every name resolves in ``new``
    (imported on first use), so ``from old import Name`` keeps working after a move."""

    def __getattr__(attr: str) -> Any:
        try:
            return getattr(importlib.import_module(new), attr)
        except AttributeError:
            raise AttributeError(f"module {old!r} (now {new!r}) has no attribute {attr!r}") from None

    def __dir__() -> list[str]:
        return sorted(set(dir(importlib.import_module(new))))

    return __getattr__, __dir__
