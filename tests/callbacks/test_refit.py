"""Issue 24, item 4: the same callback objects in a second ``trainer.fit`` (a notebook habit). Counters, events and
the report describe the fit they belong to; learned statistics carry over only when the same module keeps training."""

from __future__ import annotations

import math

import lightning.pytorch as pl

from lightning_stability.callbacks import AdaptiveLossWeight, GradientGuard, StabilityReport
from tests.callbacks.test_adaptive_weights import ScriptedLossModule
from tests.helpers import FAULT_WARNINGS, FaultyModule, make_trainer

pytestmark = FAULT_WARNINGS


class StartState(pl.Callback):
    """The guard's per-optimizer state when a fit's training starts (after any reset or checkpoint restore)."""

    def __init__(self, guard: GradientGuard) -> None:
        self.guard = guard
        self.seen: list[dict] = []

    def on_train_start(self, trainer, pl_module):
        self.seen.append(self.guard.state_dict()["optimizers"])


def _fit(tmp_path, module, callbacks, steps=8):
    make_trainer(tmp_path, callbacks, max_steps=steps).fit(module)


def test_second_fit_report_says_one_skip_when_one_happened(tmp_path):
    guard = GradientGuard(zscore=2.5, zscore_warmup=3, zscore_min_ratio=3.0)
    report = StabilityReport(dirpath=tmp_path / "report", print_summary=False)
    start = StartState(guard)
    module = FaultyModule(inf_grad_steps={2})
    _fit(tmp_path / "a", module, [guard, report, start])
    first = report.last_report
    assert first["summary"]["num_skipped"] == 1
    learned = guard.state_dict()["optimizers"][0]["stats"]

    _fit(tmp_path / "b", module, [guard, report, start])  # the same objects, the same model keeps training
    second = report.last_report
    assert guard.num_skipped == 1
    assert second["summary"]["num_skipped"] == 1  # was 2: the first fit's skip counted again
    assert [e.step for e in guard.event_log if e.kind == "skip"] == [2]
    assert len(second["loss"]) == 8  # this fit's loss trace only
    assert [p[0] for p in second["loss"]] == list(range(8))
    # the documented carry-over: the same module starts its second fit with the learned gradient-norm statistics,
    # and fresh counters
    assert start.seen[1][0]["stats"] == learned
    assert set(start.seen[1][0]["counters"].values()) <= {0, -1}


def test_a_different_module_starts_the_statistics_again(tmp_path):
    guard = GradientGuard(zscore=2.5, zscore_warmup=3, zscore_min_ratio=3.0)
    start = StartState(guard)
    _fit(tmp_path / "a", FaultyModule(inf_grad_steps={2}), [guard, start])
    _fit(tmp_path / "b", FaultyModule(inf_grad_steps={5}), [guard, start])
    assert guard.num_skipped == 1
    assert [e.step for e in guard.event_log] == [5]
    assert len(guard.event_log) == 1
    assert start.seen[1][0]["stats"]["count"] == 0  # nothing learned about this module yet


def test_adaptive_weight_counts_per_fit_and_keeps_its_weight_for_the_same_module(tmp_path):
    values = [1.0, 1.1, 0.9, math.nan, 1.0, 1.05, 0.95, 1.0]
    module = ScriptedLossModule({"mel": values, "l1": [1.0] * 8})
    cb = AdaptiveLossWeight("mel", warmup_steps=0, cooling_steps=0)
    _fit(tmp_path / "a", module, [cb])
    assert cb.num_rejected == 1
    once = cb.observed  # the last step's value is still pending when the fit ends (see the guide)
    assert once >= 6
    _fit(tmp_path / "b", module, [cb])
    assert cb.num_rejected == 1  # this fit's NaN only
    assert cb.observed == 2 * once  # the averages of the same module carry over
    assert [e.step for e in cb.event_log if e.kind == "rejected"] == [3]
    cb2 = AdaptiveLossWeight("mel", warmup_steps=0, cooling_steps=0)
    _fit(tmp_path / "c", module, [cb2])
    _fit(tmp_path / "d", ScriptedLossModule({"mel": values, "l1": [1.0] * 8}), [cb2])
    assert cb2.observed == once  # another module: from nothing
