"""The plugin helpers of ``lightning_stability._checks`` (check_str, check_fraction, check_patterns,
check_number_mapping) keep the one contract: a ``TypeError`` for a wrong type, a ``ValueError`` for a wrong value, the
argument named in backticks with the value received; each returns the normalised value."""

from __future__ import annotations

import math

import pytest

from lightning_stability._checks import check_fraction, check_number_mapping, check_patterns, check_str


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
def test_the_plugin_helpers_keep_the_contract(call, exc, text):
    with pytest.raises(exc) as info:
        call()
    assert text in str(info.value)


def test_the_plugin_helpers_return_the_normalised_value():
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
