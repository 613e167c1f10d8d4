"""The pure decision rule of ``GradientGuard`` (``_guard_policy``): host and device versions, running statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lightning_stability.callbacks._guard_norm import grad_norms, layer_norms
from lightning_stability.callbacks._guard_policy import (
    Action,
    NormStats,
    PolicyConfig,
    evaluate,
    evaluate_on_device,
    threshold,
    threshold_on_device,
    update_stats,
    update_stats_on_device,
)

CFG = PolicyConfig(max_norm=50.0, zscore=2.5, alpha=0.9, warmup=4)


def test_warm_up_statistics_are_the_exact_mean_and_population_variance():
    norms = [3.0, 5.0, 4.0, 8.0]
    stats = NormStats()
    for n in norms:
        stats = update_stats(stats, evaluate(n, stats, CFG), n, CFG)
    assert stats.count == 4
    assert stats.mean == pytest.approx(np.mean(norms), abs=1e-12)
    assert stats.var == pytest.approx(np.var(norms), abs=1e-12)


def test_after_warm_up_statistics_are_an_ema_and_spikes_do_not_enter_them():
    stats = NormStats(mean=5.0, var=1.0, count=4)
    d = evaluate(6.0, stats, CFG)
    assert d.action is Action.ACCEPT
    assert d.threshold == pytest.approx(5.0 + 2.5 * 1.0)
    new = update_stats(stats, d, 6.0, CFG)
    # Finch: delta = 1; mean = 5 + 0.1 * 1; var = 0.9 * (1 + 0.1 * 1)
    assert new.mean == pytest.approx(5.1)
    assert new.var == pytest.approx(0.99)
    spike = evaluate(7.6, stats, CFG)
    assert spike.action is Action.SPIKE
    after = update_stats(stats, spike, 7.6, CFG)
    assert (after.mean, after.var, after.count) == (stats.mean, stats.var, stats.count)  # the threshold did not move
    assert (after.streak_mean, after.streak_count) == (7.6, 1)


SHIFT = PolicyConfig(zscore=2.5, alpha=0.97, warmup=4, rebase_after=5)


def _run(norms, stats, cfg):
    actions = []
    for n in norms:
        d = evaluate(n, stats, cfg)
        actions.append(d.action)
        stats = update_stats(stats, d, n, cfg)
    return actions, stats


def test_a_burst_shorter_than_rebase_after_leaves_the_threshold_where_it_was():
    stats = NormStats(mean=1.0, var=0.01, count=4)
    actions, after = _run([4.0, 4.2, 3.9, 4.1], stats, SHIFT)  # 4 spikes in a row, one fewer than rebase_after
    assert actions == [Action.SPIKE] * 4
    assert (after.mean, after.var, after.count) == (1.0, 0.01, 4)
    assert after.streak_count == 4
    assert after.streak_mean == pytest.approx(4.05)
    # an accepted step ends the streak: the next burst starts from zero again
    actions, after = _run([1.05, 4.0, 4.0, 4.0, 4.0], after, SHIFT)
    assert actions == [Action.ACCEPT] + [Action.SPIKE] * 4
    assert after.streak_count == 4


def test_a_lasting_level_shift_becomes_the_baseline_after_rebase_after_outliers():
    stats = NormStats(mean=1.0, var=0.01, count=4)  # relative spread 10 %
    shifted = [4.0, 4.4, 3.6, 4.2, 3.8]
    actions, after = _run(shifted, stats, SHIFT)
    assert actions == [Action.SPIKE] * 4 + [Action.REBASE]
    assert after.mean == pytest.approx(np.mean(shifted))
    # the streak's own variance (0.08) is below the old relative spread carried to the new level (0.01 * 4**2)
    assert np.var(shifted) < 0.01 * 16
    assert after.var == pytest.approx(0.01 * 16)
    assert after.streak_count == 0
    assert after.count == 4
    # the new level is now ordinary: the next norms are accepted
    actions, _ = _run([4.1, 3.9, 4.3, 3.7], after, SHIFT)
    assert actions == [Action.ACCEPT] * 4


def test_non_finite_and_over_max_steps_neither_end_nor_extend_a_streak():
    cfg = PolicyConfig(max_norm=100.0, zscore=2.5, alpha=0.97, warmup=4, rebase_after=3)
    stats = NormStats(mean=1.0, var=0.01, count=4)
    actions, after = _run([4.0, math.nan, 4.0, math.inf, 500.0, 4.0], stats, cfg)
    assert actions == [Action.SPIKE, Action.NONFINITE, Action.SPIKE, Action.NONFINITE, Action.OVER_MAX, Action.REBASE]
    assert after.mean == pytest.approx(4.0)
    assert all(math.isfinite(v) for v in after.as_list())  # nothing non-finite entered


def test_rebase_after_none_is_the_strict_rule():
    cfg = PolicyConfig(zscore=2.5, alpha=0.97, warmup=4)
    actions, after = _run([4.0] * 50, NormStats(mean=1.0, var=0.01, count=4), cfg)
    assert actions == [Action.SPIKE] * 50
    assert (after.mean, after.var) == (1.0, 0.01)


def test_clipped_streak_rebases_too():
    cfg = PolicyConfig(zscore=2.0, alpha=0.5, warmup=1, clip=True, rebase_after=3)
    actions, after = _run([10.0, 10.0, 10.0], NormStats(mean=1.0, var=0.25, count=1), cfg)
    assert actions == [Action.CLIP, Action.CLIP, Action.REBASE]
    assert after.mean == pytest.approx(10.0)


def test_norm_stats_from_list_reads_the_0_1_0_layout_and_rejects_others():
    assert NormStats.from_list([1.5, 0.25, 25]) == NormStats(1.5, 0.25, 25)
    stats = NormStats(1.0, 2.0, 3, 4.0, 5.0, 6)
    assert NormStats.from_list(stats.as_list()) == stats
    with pytest.raises(ValueError, match="3 or 6 values"):
        NormStats.from_list([1.0, 2.0])


def test_clip_enters_the_statistics_at_the_threshold():
    cfg = PolicyConfig(zscore=2.0, alpha=0.5, warmup=1, clip=True)
    stats = NormStats(mean=1.0, var=0.25, count=1)
    d = evaluate(10.0, stats, cfg)
    assert d.action is Action.CLIP
    assert d.threshold == pytest.approx(2.0)
    assert update_stats(stats, d, 10.0, cfg).mean == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("norm", "kwargs", "action"),
    [
        (math.inf, {}, Action.NONFINITE),
        (math.nan, {"amp_overflow": True}, Action.AMP_OVERFLOW),
        (math.nan, {"amp_overflow": True, "nonfinite_loss": True}, Action.NONFINITE),  # a NaN loss is not calibration
        (60.0, {"forced": True}, Action.FORCED),
        (60.0, {}, Action.OVER_MAX),
        (3.0, {}, Action.ACCEPT),
    ],
)
def test_severity_order(norm, kwargs, action):
    assert evaluate(norm, NormStats(3.0, 0.01, 4), CFG, **kwargs).action is action


# norms 0 or >= 2**-20 (about 1e-6): far below that, the squares in the variance underflow float32 (the device
# rule) but not float64 (the host rule), e.g. norms [0, 0, 1.2e-38]; no real gradient norm is that small
finite_or_not = st.one_of(
    st.just(0.0),
    st.floats(min_value=2.0**-20, max_value=200.0, allow_nan=False, width=32),
    st.sampled_from([math.inf, math.nan]),
)


@settings(max_examples=40, deadline=None, derandomize=True)  # deterministic in CI
@given(
    norms=st.lists(finite_or_not, min_size=1, max_size=40),
    clip=st.booleans(),
    overflow=st.lists(st.booleans(), min_size=40, max_size=40),
    min_ratio=st.sampled_from([None, 1.5]),
)
@example(  # a level shift with a NaN inside the streak: spikes, a rebase, then the new level is ordinary
    norms=[1.0, 1.2, 0.9, 5.0, 5.2, math.nan, 4.8, 5.1, 4.9, 5.3], clip=False, overflow=[False] * 40, min_ratio=None
)
@example(  # the ratio floor decides: 1.3x the mean is above mean + 2 std of these norms but below 1.5x the mean
    norms=[1.0, 1.02, 0.98, 1.0, 1.3, 1.01, 2.0, 1.0], clip=False, overflow=[False] * 40, min_ratio=1.5
)
def test_device_rule_matches_host_rule(norms, clip, overflow, min_ratio):
    cfg = PolicyConfig(max_norm=150.0, zscore=2.0, alpha=0.8, warmup=3, clip=clip, rebase_after=3, min_ratio=min_ratio)
    host = NormStats()
    dev = torch.zeros(NormStats.SIZE)
    for i, n in enumerate(norms):
        amp = overflow[i] and not math.isfinite(n)
        d = evaluate(n, host, cfg, amp_overflow=amp)
        t = torch.tensor(n, dtype=torch.float32)
        code, thr = evaluate_on_device(t, dev, cfg, amp_overflow=torch.tensor(amp))
        assert Action(int(code)) is d.action, (i, n)
        host = update_stats(host, d, n, cfg)
        dev = update_stats_on_device(dev, code, t, thr, cfg)
        assert dev.tolist() == pytest.approx(host.as_list(), rel=1e-4, abs=1e-4)
    if norms[:4] == [1.0, 1.2, 0.9, 5.0]:
        assert host.mean > 4  # the example above rebased (a guard on the example itself)


def test_min_ratio_is_a_floor_of_the_zscore_threshold():
    stats = NormStats(mean=2.0, var=0.04, count=10)  # std 0.2: mean + 2.5 std = 2.5
    plain = PolicyConfig(zscore=2.5, warmup=4)
    floored = PolicyConfig(zscore=2.5, warmup=4, min_ratio=3.0)
    assert threshold(stats, plain) == pytest.approx(2.5)
    assert threshold(stats, floored) == pytest.approx(6.0)  # max(2.5, 3 x 2.0)
    assert evaluate(4.0, stats, plain).action is Action.SPIKE
    assert evaluate(4.0, stats, floored).action is Action.ACCEPT
    assert evaluate(6.5, stats, floored).action is Action.SPIKE
    wide = NormStats(mean=2.0, var=4.0, count=10)  # std 2: the z-score threshold 7 is above the floor 6
    assert threshold(wide, floored) == pytest.approx(7.0)
    assert threshold(NormStats(mean=2.0, var=0.04, count=3), floored) is None  # still warming up
    dev = threshold_on_device(torch.tensor(stats.as_list()), floored)
    assert float(dev) == pytest.approx(6.0)


def test_foreach_norm_matches_a_float64_reference_for_mixed_dtypes():
    grads = [torch.randn(7, 3).half() * 300, torch.randn(5).bfloat16(), torch.randn(2, 2)]
    norms = grad_norms(grads)
    ref = [g.double().norm().item() for g in grads]
    assert norms.per_tensor.dtype == torch.float32
    assert norms.per_tensor.tolist() == pytest.approx(ref, rel=1e-5)
    assert norms.total.item() == pytest.approx(math.sqrt(sum(r * r for r in ref)), rel=1e-5)
    # fp16 squares would overflow (300**2 * 21 > 65504): the float32 accumulation does not
    assert math.isfinite(norms.total.item())
    scaled = grad_norms(grads, inv_scale=torch.tensor(0.5))
    assert scaled.total.item() == pytest.approx(norms.total.item() / 2, rel=1e-6)


def test_layer_ranking_puts_non_finite_layers_first():
    names = ["a.weight", "a.bias", "b.weight", "c.weight"]
    ranked = layer_norms(names, [3.0, 4.0, 1.0, math.nan], top_k=2)
    assert ranked[0][0] == "c"
    assert math.isnan(ranked[0][1])
    assert ranked[1] == ("a", pytest.approx(5.0))
