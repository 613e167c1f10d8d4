import importlib
import math

import pytest

from tests.benchmarks import _bench_path  # noqa: F401  (sys.path)

lr_sensitivity = importlib.import_module("lr_sensitivity")


def test_wortsman_sensitivity_matches_hand_computation():
    # L0 = 3; finals 1.0, 1.5, 4.0 (capped at 3), nan (counts as 3): mean(1, 1.5, 3, 3) - 1 = 1.125
    sens, best = lr_sensitivity.wortsman_sensitivity([1.0, 1.5, 4.0, float("nan")], initial=3.0)
    assert best == 1.0
    assert sens == pytest.approx((0.0 + 0.5 + 2.0 + 2.0) / 4)


def test_wortsman_sensitivity_is_zero_for_a_flat_curve_and_capped_by_initial_loss():
    assert lr_sensitivity.wortsman_sensitivity([2.0, 2.0, 2.0], initial=5.0) == (0.0, 2.0)
    # every run diverged: all count as L0, so the spread (and the sensitivity) is 0 by the formula
    sens, best = lr_sensitivity.wortsman_sensitivity([math.inf, math.nan], initial=5.0)
    assert (sens, best) == (0.0, 5.0)


def test_largest_stable_lr_is_the_largest_finite_run_below_the_initial_loss():
    runs = [
        {"lr": 1e-3, "finite": True, "final_loss": 1.0},
        {"lr": 1e-2, "finite": True, "final_loss": 0.8},
        {"lr": 1e-1, "finite": True, "final_loss": 3.5},  # finite, but no better than at initialisation
        {"lr": 3e-1, "finite": False, "final_loss": math.nan},
    ]
    assert lr_sensitivity.largest_stable(runs, initial=3.0) == (1e-2, 0.8)
    assert lr_sensitivity.largest_stable(runs[2:], initial=3.0) == (None, None)
