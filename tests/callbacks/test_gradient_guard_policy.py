"""The pure decision rule of ``GradientGuard`` (``guard._policy``): host and device versions, running statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lightning_stability.callbacks.guard._norm import grad_norms, layer_norms
from lightning_stability.callbacks.guard._policy import (
    Action,
    Decision,
    NormStats,
    PolicyConfig,
    evaluate,
    evaluate_on_device,
    loss_for_stats,
    loss_for_stats_on_device,
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


# ----------------------------------------------------------------------------------------------------------------------
# the default rule: a ratio threshold, confirmed by the loss, with a clip backstop

DEFAULT = PolicyConfig(alpha=0.97, warmup=4, rebase_after=3, min_ratio=3.0, loss_zscore=6.0, clip_ratio=10.0)
NORMS = NormStats(mean=2.0, var=0.25, count=10)  # threshold: 3 x 2.0 = 6
LOSSES = NormStats(mean=1.0, var=0.01, count=10)  # loss std 0.1: 6 stds = 0.6


@pytest.mark.parametrize(
    ("norm", "loss", "action"),
    [
        (5.0, 50.0, Action.ACCEPT),  # under the norm threshold: the loss alone never acts
        (8.0, 1.05, Action.ACCEPT),  # a norm outlier the loss does not confirm (a healthy excursion)
        (8.0, 2.0, Action.SPIKE),  # norm and loss together: a data fault, skipped
        (8.0, 0.2, Action.SPIKE),  # two-sided: a loss 8 stds *below* its mean confirms too
        (8.0, math.nan, Action.SPIKE),  # a non-finite loss with a finite norm confirms
        (25.0, 1.05, Action.CLIP),  # above clip_ratio x mean (20) without the loss: clipped, not skipped
        (8.0, None, Action.ACCEPT),  # unknown loss: unconfirmed
        (25.0, None, Action.CLIP),
    ],
)
def test_default_rule_acts_on_norm_and_loss_together(norm, loss, action):
    decision = evaluate(norm, NORMS, DEFAULT, loss=loss, loss_stats=LOSSES)
    assert decision.action is action
    assert decision.threshold == pytest.approx(6.0)
    code, thr = evaluate_on_device(
        torch.tensor(norm),
        torch.tensor(NORMS.as_list()),
        DEFAULT,
        loss=None if loss is None else torch.tensor(loss),
        loss_stats=torch.tensor(LOSSES.as_list()),
    )
    assert Action(int(code)) is action
    assert float(thr) == pytest.approx(6.0)


def test_loss_statistics_still_warming_up_never_confirm():
    warming = NormStats(mean=1.0, var=0.01, count=3)  # count < warmup
    assert evaluate(8.0, NORMS, DEFAULT, loss=100.0, loss_stats=warming).action is Action.ACCEPT
    assert evaluate(25.0, NORMS, DEFAULT, loss=100.0, loss_stats=warming).action is Action.CLIP


def test_without_loss_zscore_the_ratio_alone_decides():
    cfg = PolicyConfig(alpha=0.97, warmup=4, min_ratio=3.0)
    assert evaluate(8.0, NORMS, cfg).action is Action.SPIKE
    assert evaluate(5.0, NORMS, cfg).action is Action.ACCEPT
    assert threshold(NormStats(mean=2.0, var=0.25, count=3), cfg) is None  # warming up


def test_a_level_shift_of_norm_and_loss_costs_two_actions_then_becomes_the_baseline():
    # a loss weight switched from 1 to 5: norm and loss both jump 5x and stay there
    norms, losses = NORMS, LOSSES
    actions = []
    for _ in range(6):
        d = evaluate(10.0, norms, DEFAULT, loss=5.0, loss_stats=losses)
        actions.append(d.action)
        norms = update_stats(norms, d, 10.0, DEFAULT)
        losses = update_stats(losses, d, 5.0, DEFAULT, clip_value=5.0)
    assert actions[:3] == [Action.SPIKE, Action.SPIKE, Action.REBASE]
    assert actions[3:] == [Action.ACCEPT] * 3
    assert norms.mean == pytest.approx(10.0)
    assert losses.mean == pytest.approx(5.0)  # the loss statistics restarted from the streak too


def test_loss_statistics_follow_the_norm_decision_and_clip_enters_the_loss_itself():
    d = Decision(Action.CLIP, 6.0)
    after = update_stats(LOSSES, d, 1.5, DEFAULT, clip_value=1.5)
    assert after.mean == pytest.approx(1.0 + 0.03 * 0.5)
    assert after.streak_count == 1  # a clipped outlier extends the streak
    assert update_stats(LOSSES, Decision(Action.SPIKE, 6.0), 9.0, DEFAULT).mean == LOSSES.mean
    assert update_stats(LOSSES, Decision(Action.ACCEPT, 6.0), math.nan, DEFAULT) == LOSSES


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    steps=st.lists(
        st.tuples(finite_or_not, st.one_of(st.floats(-50.0, 50.0, allow_nan=False, width=32), st.just(math.nan))),
        min_size=1,
        max_size=40,
    ),
    clip=st.booleans(),
)
@example(  # a quiet start, a joint spike, a clipped extreme norm, a level shift of both
    steps=[(1.0, 1.0), (1.1, 1.1), (0.9, 0.9), (1.0, 1.0), (1.05, 1.0), (9.0, 30.0), (30.0, 1.0), (5.0, 5.0),
           (5.0, 5.0), (5.0, 5.0), (5.1, 5.0)],
    clip=False,
)  # fmt: skip
def test_device_rule_matches_host_rule_with_the_loss(steps, clip):
    cfg = PolicyConfig(
        zscore=None, alpha=0.8, warmup=3, clip=clip, rebase_after=3, min_ratio=3.0, loss_zscore=4.0, clip_ratio=10.0
    )
    host, lhost = NormStats(), NormStats()
    dev, ldev = torch.zeros(NormStats.SIZE), torch.zeros(NormStats.SIZE)
    for i, (n, loss) in enumerate(steps):
        d = evaluate(n, host, cfg, loss=loss, loss_stats=lhost)
        t, lt = torch.tensor(n, dtype=torch.float32), torch.tensor(loss, dtype=torch.float32)
        code, thr = evaluate_on_device(t, dev, cfg, loss=lt, loss_stats=ldev)
        assert Action(int(code)) is d.action, (i, n, loss)
        host = update_stats(host, d, n, cfg)
        lhost = update_stats(lhost, d, loss, cfg, ema_value=loss_for_stats(loss, lhost, cfg))
        dev = update_stats_on_device(dev, code, t, thr, cfg)
        ldev = update_stats_on_device(ldev, code, lt, lt, cfg, ema_value=loss_for_stats_on_device(lt, ldev, cfg))
        assert dev.tolist() == pytest.approx(host.as_list(), rel=1e-4, abs=1e-4)
        assert ldev.tolist() == pytest.approx(lhost.as_list(), rel=1e-4, abs=1e-3)


def test_the_further_the_norm_is_out_the_less_the_loss_has_to_move():
    # loss 4 stds off: not enough at 1.1x the threshold, enough at 2x (4 * 2 = 8 > 6)
    assert evaluate(6.6, NORMS, DEFAULT, loss=1.4, loss_stats=LOSSES).action is Action.ACCEPT
    assert evaluate(12.0, NORMS, DEFAULT, loss=1.4, loss_stats=LOSSES).action is Action.SPIKE


def test_a_loss_that_barely_moves_has_a_floor_under_its_std():
    # a discriminator's hinge loss stuck at 2.0 (std 0.001): a 0.02 wobble is 20 raw stds, but only 0.2 floored ones
    stuck = NormStats(mean=2.0, var=1e-6, count=10)
    assert evaluate(8.0, NORMS, DEFAULT, loss=2.02, loss_stats=stuck).action is Action.ACCEPT
    assert evaluate(8.0, NORMS, DEFAULT, loss=3.0, loss_stats=stuck).action is Action.SPIKE  # 10 floored stds


def test_one_absurd_loss_enters_the_loss_statistics_clamped():
    # a batch at the wrong scale whose norm stayed normal (accepted): its loss of 847 enters at mean + 6 std
    d = evaluate(2.0, NORMS, DEFAULT, loss=847.0, loss_stats=LOSSES)
    assert d.action is Action.ACCEPT
    entered = loss_for_stats(847.0, LOSSES, DEFAULT)
    assert entered == pytest.approx(1.0 + 6 * 0.1)
    after = update_stats(LOSSES, d, 847.0, DEFAULT, ema_value=entered)
    assert after.mean == pytest.approx(1.0 + 0.03 * 0.6)
    dev = loss_for_stats_on_device(torch.tensor(847.0), torch.tensor(LOSSES.as_list()), DEFAULT)
    assert float(dev) == pytest.approx(entered)
    assert loss_for_stats(847.0, NormStats(mean=1.0, var=0.01, count=3), DEFAULT) == 847.0  # warming up: raw
