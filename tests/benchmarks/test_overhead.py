"""`benchmarks/overhead.py`'s accounting of each callback's time: the forward hooks a callback registers count as its
own, the monitors' share is the sum of their means over a bare step."""

import importlib
import time

import pytest
import torch
from torch import nn

from tests.benchmarks import _bench_path  # noqa: F401  (sys.path)

overhead = importlib.import_module("overhead")


def test_capturing_times_the_forward_hooks_registered_inside_and_restores_registration():
    sink: dict[int, float] = {}
    step = [3]
    module = nn.Linear(2, 2)
    original = nn.Module.register_forward_hook

    def setup():  # a callback's setup that hooks the model (as CodebookMonitor does)
        module.register_forward_hook(lambda m, a, out: time.sleep(0.01))

    overhead._capturing(setup, sink, step)()
    assert nn.Module.register_forward_hook is original  # only hooks registered inside are wrapped
    outside = []
    module.register_forward_hook(lambda m, a, out: outside.append(1))
    module(torch.zeros(1, 2))
    assert outside == [1]
    assert list(sink) == [3]
    assert sink[3] >= 0.01  # the sleeping hook's time went to this callback, at the step that ran it
    before = sink[3]
    step[0] = 4
    module(torch.zeros(1, 2))
    assert sink[4] >= 0.01
    assert sink[3] == before  # the next step's hook time is that step's


def test_capturing_restores_registration_when_the_hook_raises():
    original = nn.Module.register_forward_hook

    def setup():
        raise RuntimeError("setup failed")

    with pytest.raises(RuntimeError, match="setup failed"):
        overhead._capturing(setup, {}, [0])()
    assert nn.Module.register_forward_hook is original


def test_monitor_costs_sums_the_monitors_means_over_the_bare_step():
    hooks = {
        "GradientGuard": {"median_us": 900.0, "mean_us": 1000.0, "max_us": 2000.0, "steps": 101},
        "SignalMonitor": {"median_us": 10.0, "mean_us": 50.0, "max_us": 2000.0, "steps": 101},
        "CodebookMonitor": {"median_us": 200.0, "mean_us": 250.0, "max_us": 3000.0, "steps": 101},
    }
    out = overhead.monitor_costs(hooks, {"CodebookMonitor": 200.0}, bare_s=0.1)
    assert set(out["monitors"]) == {"SignalMonitor", "CodebookMonitor"}  # the guard is not a monitor
    assert out["fraction_of_bare_step"] == pytest.approx((50.0 + 250.0) / 1e5)
    assert out["monitors"]["CodebookMonitor"]["forward_hook_mean_us"] == 200.0
    assert out["target_met"] is True
    assert overhead.monitor_costs(hooks, {}, bare_s=0.02)["target_met"] is False  # 300 us of a 20 ms step: 1.5 %
