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


# --- plugin helpers ---


def check_str(name: str, value: Any, *, allow_none: bool = False) -> Any:
    """A non-empty ``str`` (``None`` passes when ``allow_none``): a ``TypeError`` for another type, a ``ValueError``
    for the empty string."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a non-empty string{_or_none(allow_none)}, got {value!r}")
    if not value:
        raise ValueError(f"`{name}` must be a non-empty string{_or_none(allow_none)}, got {value!r}")
    return value


def check_fraction(name: str, value: Any) -> float:
    """A number in the open interval ``(0, 1)`` (a decay, a ratio below one), as a ``float``."""
    number = check_number(name, value)
    if not 0.0 < number < 1.0:
        raise ValueError(f"`{name}` must be a number in (0, 1), got {value!r}")
    return number


def check_patterns(name: str, value: Any, *, noun: str = "pattern") -> tuple[str, ...]:
    """One pattern (a ``str``) or an iterable of them, as a tuple of non-empty strings (possibly empty): a
    ``TypeError`` for something else or a non-string entry, a ``ValueError`` for an empty entry. ``noun`` names the
    kind of pattern in the messages (``"glob pattern"``)."""
    if isinstance(value, str):
        value = (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise TypeError(f"`{name}` must be a {noun} or an iterable of them, got {value!r}") from None
    for p in patterns:
        if not isinstance(p, str) or not p:
            error = ValueError if isinstance(p, str) else TypeError
            raise error(f"`{name}` must contain non-empty {noun} strings, got {p!r} in {patterns!r}")
    return patterns


def check_number_mapping(
    name: str, value: Any, *, minimum: float | None = None, allow_empty: bool = False, entry: str = "{name}[{key!r}]"
) -> dict[str, float]:
    """A mapping of non-empty ``str`` keys to finite numbers ``>= minimum``, as a ``dict`` of ``float``s (the
    mapping's order kept). ``entry`` (formatted with ``name`` and ``key``) names an entry in the messages: by default
    ``"`weights['mel']` must be a finite number >= 0, got -1.0"``; ``entry="{key}"`` names it by its key alone, for
    a mapping whose keys the user chose (loss names). A ``ValueError`` for an empty mapping unless ``allow_empty``."""
    from collections.abc import Mapping  # here, not at the top: the plugin helpers stay one block

    if not isinstance(value, Mapping):
        raise TypeError(f"`{name}` must be a mapping of names to numbers, got {value!r}")
    if not value and not allow_empty:
        raise ValueError(f"`{name}` must name at least one entry, got {dict(value)!r}")
    checked: dict[str, float] = {}
    for key, number in value.items():
        if not isinstance(key, str) or not key:
            error = ValueError if isinstance(key, str) else TypeError
            raise error(f"`{name}` keys must be non-empty strings, got {key!r} in {dict(value)!r}")
        checked[key] = check_number(entry.format(name=name, key=key), number, minimum=minimum)
    return checked


__all__ += ["check_fraction", "check_number_mapping", "check_patterns", "check_str"]
