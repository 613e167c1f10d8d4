"""The pure decision rule of ``GradientGuard`` (``_guard_policy``): host and device versions, running statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_stability.callbacks._guard_norm import grad_norms, layer_norms
from lightning_stability.callbacks._guard_policy import (
    Action,
    NormStats,
    PolicyConfig,
    evaluate,
    evaluate_on_device,
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
    assert update_stats(stats, spike, 7.6, CFG) == stats


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


finite_or_not = st.one_of(
    st.floats(min_value=0.0, max_value=200.0, allow_nan=False, width=32),
    st.sampled_from([math.inf, math.nan]),
)


@settings(max_examples=40, deadline=None, derandomize=True)  # deterministic in CI
@given(
    norms=st.lists(finite_or_not, min_size=1, max_size=40),
    clip=st.booleans(),
    overflow=st.lists(st.booleans(), min_size=40, max_size=40),
)
def test_device_rule_matches_host_rule(norms, clip, overflow):
    cfg = PolicyConfig(max_norm=150.0, zscore=2.0, alpha=0.8, warmup=3, clip=clip)
    host = NormStats()
    dev = torch.zeros(3)
    for i, n in enumerate(norms):
        amp = overflow[i] and not math.isfinite(n)
        d = evaluate(n, host, cfg, amp_overflow=amp)
        t = torch.tensor(n, dtype=torch.float32)
        code, thr = evaluate_on_device(t, dev, cfg, amp_overflow=torch.tensor(amp))
        assert Action(int(code)) is d.action, (i, n)
        host = update_stats(host, d, n, cfg)
        dev = update_stats_on_device(dev, code, t, thr, cfg)
        assert dev.tolist() == pytest.approx(host.as_list(), rel=1e-4, abs=1e-4)


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
