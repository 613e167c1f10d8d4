"""`lightning_stability._checks`: one contract for every public constructor (a wrong type is a TypeError, a wrong
value a ValueError, the argument named in backticks with the value received)."""

import math
from functools import partial
from pathlib import Path

import pytest

from lightning_stability._checks import (
    check_fraction,
    check_int,
    check_interval,
    check_mapping,
    check_number,
    check_number_mapping,
    check_pair,
    check_path,
    check_patterns,
    check_sequence,
    check_str,
)

NAN = float("nan")


@pytest.mark.parametrize(
    ("call", "error", "text"),
    [
        (lambda: check_interval("p", "0.5", 0, 1), TypeError, "`p` must be a number, got '0.5'"),
        (lambda: check_interval("p", True, 0, 1), TypeError, "`p` must be a number, got True"),
        (lambda: check_interval("p", 1.0, 0, 1, high_open=True), ValueError, "`p` must be a number in [0, 1), got 1.0"),
        (lambda: check_interval("p", 0, 0, 1, low_open=True), ValueError, "`p` must be a number in (0, 1], got 0"),
        (lambda: check_interval("p", NAN, 0, 1), ValueError, "`p` must be a number in [0, 1], got nan"),
        (lambda: check_interval("p", 2, 0, 1, allow_none=True), ValueError, "in [0, 1] or None, got 2"),
        (lambda: check_sequence("r", 4), TypeError, "`r` must be a sequence, got 4"),
        (lambda: check_sequence("r", "ab"), TypeError, "`r` must be a sequence, got 'ab'"),
        (lambda: check_sequence("r", {"a": 1}), TypeError, "`r` must be a sequence, got {'a': 1}"),
        (lambda: check_sequence("r", ()), ValueError, "`r` must have at least 1 item, got ()"),
        (lambda: check_sequence("r", (1, 2, 3), length=2), ValueError, "`r` must have 2 items, got (1, 2, 3)"),
        (
            lambda: check_sequence("r", (8, 0), partial(check_int, minimum=1)),
            ValueError,
            "`r[1]` must be >= 1, got 0 (in `r`=(8, 0))",
        ),
        (
            lambda: check_sequence("r", [8, 2.0], partial(check_int, minimum=1)),
            TypeError,
            "`r[1]` must be an int, got 2.0 (in `r`=[8, 2.0])",
        ),
        (lambda: check_pair("b", 0.9), TypeError, "`b` must be a pair of numbers, got 0.9"),
        (lambda: check_pair("b", (0.9,)), ValueError, "`b` must have 2 items, got (0.9,)"),
        (lambda: check_pair("b", (0.9, "x")), TypeError, "`b[1]` must be a number, got 'x'"),
        (lambda: check_pair("b", (2, 1), ordered=True), ValueError, "`b` must be a pair (low, high) with low <= high"),
        (lambda: check_mapping("w", [("a", 1)]), TypeError, "`w` must be a mapping, got [('a', 1)]"),
        (lambda: check_mapping("w", {}), ValueError, "`w` must have at least 1 entry, got {}"),
        (lambda: check_mapping("w", {1: 1.0}), TypeError, "`w` must have str keys, got the key 1"),
        (lambda: check_mapping("w", {"": 1.0}), ValueError, "`w` must have non-empty keys"),
        (
            lambda: check_mapping("w", {"mel": -1.0}, partial(check_number, minimum=0)),
            ValueError,
            "`w['mel']` must be a finite number >= 0, got -1.0",
        ),
        (lambda: check_str("s", 3), TypeError, "`s` must be a non-empty string, got 3"),
        (lambda: check_str("s", " "), ValueError, "`s` must be a non-empty string, got ' '"),
        (lambda: check_path("p", 3), TypeError, "`p` must be a path (str or os.PathLike), got 3"),
        (lambda: check_path("p", ""), ValueError, "`p` must be a non-empty path, got ''"),
    ],
)
def test_the_container_and_path_checks_keep_the_contract(call, error, text):
    with pytest.raises(error) as info:
        call()
    assert type(info.value) is error
    assert text in str(info.value)


def test_the_container_and_path_checks_return_the_value_normalised():
    assert check_interval("p", 1, 0, 1) == 1.0
    assert isinstance(check_interval("p", 1, 0, 1), float)
    assert check_interval("p", None, 0, 1, allow_none=True) is None
    assert check_sequence("r", [8, 5], partial(check_int, minimum=1)) == (8, 5)
    assert check_sequence("r", (), min_length=0) == ()
    assert check_sequence("r", None, allow_none=True) is None
    pair = check_pair("b", [0, 1])
    assert pair == (0.0, 1.0)
    assert all(isinstance(v, float) for v in pair)
    assert check_pair("b", None, allow_none=True) is None
    weights = check_mapping("w", {"mel": 1, "l1": 2.5}, partial(check_number, minimum=0))
    assert weights == {"mel": 1.0, "l1": 2.5}
    assert list(weights) == ["mel", "l1"]
    assert check_str("s", "", allow_empty=True) == ""
    assert check_path("p", "a/b") == Path("a/b")
    assert check_path("p", Path("a")) == Path("a")
    assert check_path("p", None, allow_none=True) is None


def test_the_checks_module_imports_nothing_from_the_package():
    import ast

    import lightning_stability._checks as checks

    tree = ast.parse(Path(checks.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert not any(m and m.startswith("lightning_stability") for m in imported), imported
    for name in ("check_interval", "check_mapping", "check_pair", "check_path", "check_sequence", "check_str"):
        assert name in checks.__all__


@pytest.mark.parametrize(
    ("call", "exc", "text"),
    [
        (lambda: check_str("s", 3), TypeError, "`s` must be a non-empty string, got 3"),
        (lambda: check_str("s", None), TypeError, "`s` must be a non-empty string, got None"),
        (lambda: check_str("s", ""), ValueError, "`s` must be a non-empty string, got ''"),
        (lambda: check_str("s", "", allow_none=True), ValueError, "`s` must be a non-empty string or None, got ''"),
        (lambda: check_fraction("f", "0.5"), TypeError, "`f` must be a number, got '0.5'"),
        (lambda: check_fraction("f", True), TypeError, "`f` must be a number, got True"),
        (lambda: check_fraction("f", 0), ValueError, "`f` must be a number in (0, 1), got 0"),
        (lambda: check_fraction("f", 1.0), ValueError, "`f` must be a number in (0, 1), got 1.0"),
        (lambda: check_fraction("f", math.nan), ValueError, "`f` must be a finite number, got nan"),
        (lambda: check_patterns("p", 3), TypeError, "`p` must be a pattern or an iterable of them, got 3"),
        (lambda: check_patterns("p", ["a", 1]), TypeError, "`p` must contain non-empty pattern strings, got 1 in"),
        (lambda: check_patterns("p", ["a", ""]), ValueError, "`p` must contain non-empty pattern strings, got '' in"),
        (lambda: check_patterns("p", 3, noun="glob pattern"), TypeError, "`p` must be a glob pattern or an"),
        (lambda: check_number_mapping("w", [1.0]), TypeError, "`w` must be a mapping of names to numbers, got [1.0]"),
        (lambda: check_number_mapping("w", {}), ValueError, "`w` must name at least one entry, got {}"),
        (lambda: check_number_mapping("w", {1: 1.0}), TypeError, "`w` keys must be non-empty strings, got 1 in"),
        (lambda: check_number_mapping("w", {"": 1.0}), ValueError, "`w` keys must be non-empty strings, got '' in"),
        (lambda: check_number_mapping("w", {"a": "1"}), TypeError, "`w['a']` must be a number, got '1'"),
        (lambda: check_number_mapping("w", {"a": -1}, minimum=0), ValueError, "`w['a']` must be a finite number >= 0"),
        (lambda: check_number_mapping("w", {"a": -1}, minimum=0, entry="{key}"), ValueError, "`a` must be a finite"),
    ],
)
def test_the_string_fraction_and_mapping_checks_keep_the_contract(call, exc, text):
    with pytest.raises(exc) as info:
        call()
    assert text in str(info.value)


def test_the_string_fraction_and_mapping_checks_return_the_value_normalised():
    assert check_str("s", "mel") == "mel"
    assert check_str("s", None, allow_none=True) is None
    assert check_fraction("f", 0.25) == 0.25
    assert isinstance(check_fraction("f", 0.25), float)
    assert check_patterns("p", "*.proj") == ("*.proj",)
    assert check_patterns("p", ["a", "b*"]) == ("a", "b*")
    assert check_patterns("p", ()) == ()
    weights = check_number_mapping("w", {"b": 2, "a": 0}, minimum=0)
    assert weights == {"b": 2.0, "a": 0.0}
    assert list(weights) == ["b", "a"]  # the mapping's order kept
    assert all(isinstance(v, float) for v in weights.values())
    assert check_number_mapping("w", {}, allow_empty=True) == {}
