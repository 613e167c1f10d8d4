"""The argument checks of every public constructor, with one contract.

A wrong type is a ``TypeError``, a wrong value a ``ValueError``; the message names the argument in backticks and shows
the value received (``repr``): ``"`max_norm` must be a finite number > 0, got -1.0"``. Each check returns the value
normalised (``float`` for numbers), so a constructor writes ``self.alpha = check_number("alpha", alpha, ...)``.

This module imports nothing from the package (every layer may use it: callbacks, losses, metrics, ``nn``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any, TypeVar

T = TypeVar("T")


def _or_none(allow_none: bool) -> str:
    return " or None" if allow_none else ""


def check_int(
    name: str, value: Any, minimum: int | None = None, *, maximum: int | None = None, allow_none: bool = False
) -> Any:
    """An ``int`` (not a bool) in ``[minimum, maximum]``; ``None`` passes when ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int{_or_none(allow_none)}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{name}` must be <= {maximum}, got {value!r}")
    return int(value)


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    exclusive: bool = False,
    maximum: float | None = None,
    allow_none: bool = False,
    noun: str = "a number",
) -> Any:
    """A finite real number (not a bool), as a ``float``: ``>= minimum`` (``> minimum`` when ``exclusive``) and
    ``<= maximum`` when given; ``None`` passes when ``allow_none``. ``noun`` names the expected type in the
    ``TypeError`` (``"a float"``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be {noun}{_or_none(allow_none)}, got {value!r}")
    bound = "" if minimum is None else f" {'>' if exclusive else '>='} {minimum:g}"
    if maximum is not None:
        bound += f"{' and' if bound else ''} <= {maximum:g}"
    value = float(value)
    if (
        not math.isfinite(value)
        or (minimum is not None and (value <= minimum if exclusive else value < minimum))
        or (maximum is not None and value > maximum)
    ):
        raise ValueError(f"`{name}` must be a finite number{bound}, got {value!r}")
    return value


def check_positive(name: str, value: Any, *, allow_none: bool = False, noun: str = "a number") -> Any:
    """A finite number ``> 0``, as a ``float`` (``None`` passes when ``allow_none``)."""
    return check_number(name, value, minimum=0, exclusive=True, allow_none=allow_none, noun=noun)


def check_bool(name: str, value: Any, *, allow_none: bool = False) -> Any:
    """A ``bool`` (``None`` passes when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool{_or_none(allow_none)}, got {value!r}")
    return value


def check_choice(name: str, value: T, choices: Collection[Any]) -> T:
    """One of ``choices`` (a ``ValueError`` otherwise, whatever the type: the choices say what is accepted)."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}")
    return value


__all__ = ["check_bool", "check_choice", "check_int", "check_number", "check_positive"]
