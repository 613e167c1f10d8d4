"""The argument checks of every public constructor, with one contract.

A wrong type is a ``TypeError``, a wrong value a ``ValueError``; the message names the argument in backticks and shows
the value received (``repr``): ``"`max_norm` must be a finite number > 0, got -1.0"``. Each check returns the value
normalised (``float`` for numbers), so a constructor writes ``self.alpha = check_number("alpha", alpha, ...)``.

This module imports nothing from the package (every layer may use it: callbacks, losses, metrics, ``nn``).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
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


# intervals, sequences, pairs, mappings, strings, paths


def check_interval(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    noun: str = "a number",
) -> Any:
    """A finite real number (not a bool) in the interval from ``low`` to ``high``, as a ``float``: each end is
    included unless ``low_open`` / ``high_open``; the message writes the interval in the usual notation
    (``"`dropout` must be a number in [0, 1), got 1.0"``). ``None`` passes when ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be {noun}{_or_none(allow_none)}, got {value!r}")
    number = float(value)
    above = number > low if low_open else number >= low
    below = number < high if high_open else number <= high
    if not (math.isfinite(number) and above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"`{name}` must be a number in {interval}{_or_none(allow_none)}, got {value!r}")
    return number


def _check_item(item_check: Callable[[str, Any], Any], item_name: str, item: Any, name: str, whole: Any) -> Any:
    """``item_check(item_name, item)``; its error also shows the whole argument (``... (in `betas`=(0.9, 1.2))``)."""
    try:
        return item_check(item_name, item)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{err} (in `{name}`={whole!r})") from None


def check_sequence(
    name: str,
    value: Any,
    item_check: Callable[[str, Any], Any] | None = None,
    *,
    length: int | None = None,
    min_length: int = 1,
    allow_none: bool = False,
    noun: str = "a sequence",
) -> Any:
    """A sequence (not a ``str``/``bytes``, not a mapping), as a ``tuple``: exactly ``length`` items when given,
    else at least ``min_length``; ``item_check(f"{name}[{i}]", item)`` checks and normalises each item, so a bad item
    is named by its index and the whole argument is shown (``"`ratios[1]` must be >= 1, got 0 (in `ratios`=(8, 0))"``).
    ``None`` passes when ``allow_none``.

    ``item_check`` is any check of this module with its bounds bound, e.g.
    ``functools.partial(check_int, minimum=1)``."""
    if value is None and allow_none:
        return None
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(f"`{name}` must be {noun}{_or_none(allow_none)}, got {value!r}")
    items = tuple(value)
    if length is not None and len(items) != length:
        raise ValueError(f"`{name}` must have {length} items, got {value!r}")
    if len(items) < min_length:
        raise ValueError(f"`{name}` must have at least {min_length} item{'s' if min_length > 1 else ''}, got {value!r}")
    if item_check is None:
        return items
    return tuple(_check_item(item_check, f"{name}[{i}]", item, name, value) for i, item in enumerate(items))


def check_pair(
    name: str,
    value: Any,
    item_check: Callable[[str, Any], Any] | None = None,
    *,
    ordered: bool = False,
    allow_none: bool = False,
) -> Any:
    """Two numbers ``(low, high)``, as a ``tuple``: each checked by ``item_check`` (default: a finite number, as a
    ``float``, :func:`check_number`); ``ordered`` requires ``low <= high``. ``None`` passes when ``allow_none``."""
    pair = check_sequence(
        name,
        value,
        item_check or check_number,
        length=2,
        allow_none=allow_none,
        noun="a pair of numbers",
    )
    if pair is not None and ordered and pair[0] > pair[1]:
        raise ValueError(f"`{name}` must be a pair (low, high) with low <= high, got {value!r}")
    return pair


def check_mapping(
    name: str,
    value: Any,
    item_check: Callable[[str, Any], Any] | None = None,
    *,
    min_length: int = 1,
    allow_none: bool = False,
    noun: str = "a mapping",
) -> Any:
    """A mapping with non-empty ``str`` keys, as a ``dict`` in the mapping's order, holding at least ``min_length``
    entries; ``item_check(f"{name}[{key!r}]", item)`` checks and normalises each value (``"`loss_weights['mel']`
    must be a finite number >= 0, got -1.0"``). A non-``str`` key is a ``TypeError``. ``None`` passes when
    ``allow_none``."""
    if value is None and allow_none:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"`{name}` must be {noun}{_or_none(allow_none)}, got {value!r}")
    if len(value) < min_length:
        raise ValueError(
            f"`{name}` must have at least {min_length} entr{'ies' if min_length > 1 else 'y'}, got {value!r}"
        )
    out = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise TypeError(f"`{name}` must have str keys, got the key {key!r}")
        if not key:
            raise ValueError(f"`{name}` must have non-empty keys, got {value!r}")
        out[key] = item if item_check is None else _check_item(item_check, f"{name}[{key!r}]", item, name, value)
    return out


def check_str(name: str, value: Any, *, allow_none: bool = False, allow_empty: bool = False) -> Any:
    """A ``str`` that is neither empty nor only whitespace (unless ``allow_empty``): a ``TypeError`` for another
    type, a ``ValueError`` for an empty one. ``None`` passes when ``allow_none``."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a non-empty string{_or_none(allow_none)}, got {value!r}")
    if not allow_empty and not value.strip():
        raise ValueError(f"`{name}` must be a non-empty string{_or_none(allow_none)}, got {value!r}")
    return value


def check_path(name: str, value: Any, *, allow_none: bool = False) -> Any:
    """A file or folder path: a non-empty ``str`` or an ``os.PathLike``, as a ``pathlib.Path`` (``None`` passes when
    ``allow_none``). Whether the path exists is not checked (that is runtime data)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"`{name}` must be a path (str or os.PathLike){_or_none(allow_none)}, got {value!r}")
    if isinstance(value, str) and not value:
        raise ValueError(f"`{name}` must be a non-empty path, got {value!r}")
    return Path(value)


def check_fraction(name: str, value: Any) -> float:
    """A finite number in the open interval ``(0, 1)`` (a decay, a ratio below one), as a ``float``."""
    return check_interval(name, check_number(name, value), 0, 1, low_open=True, high_open=True)


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


__all__ = [
    "check_bool",
    "check_choice",
    "check_fraction",
    "check_int",
    "check_interval",
    "check_mapping",
    "check_number",
    "check_number_mapping",
    "check_pair",
    "check_path",
    "check_patterns",
    "check_positive",
    "check_sequence",
    "check_str",
]
