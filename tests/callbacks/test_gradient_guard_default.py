"""``GradientGuard()`` with no arguments: finite spikes are acted upon, a healthy warm-up and loss-weight switch are
left alone (up to the two steps where a x5 switch cannot be told from a x5 loss spike), non-finite steps are skipped;
in one process and under DDP.

The run: a regression MLP (Adam, 1024 samples, batch 64). The default rule (``guard._policy``): a step whose gradient
norm is above 3x its running mean *and* whose loss is 6 standard deviations off its own running mean is skipped; a
norm above 10x the mean is clipped whatever the loss; three acted-upon outliers in a row are a level shift.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_stability.callbacks import GradientGuard
from tests._helpers_guard import FusedFaultyModule, RankDump, StepRecorder
from tests.helpers import FAULT_WARNINGS, FaultyModule, assert_same, make_trainer, regression_loader

pytestmark = FAULT_WARNINGS  # these tests inject faults: the guard's notices are expected

WARMUP, SWITCH, WEIGHT = 40, 120, 5.0


class _Data:
    def train_dataloader(self):
        return regression_loader(n=1024, batch_size=64)


class Faulty(_Data, FaultyModule):
    """Faults at chosen steps (module level: ddp_spawn pickles it)."""


class FusedFaulty(_Data, FusedFaultyModule):
    """The same on a fused Adam (sync-free mode decides on the device)."""


class WarmupSwitch(_Data, FaultyModule):
    """A healthy run with two legitimate changes: a linear learning-rate warm-up over ``WARMUP`` steps, and the loss
    weight switched from 1 to ``WEIGHT`` at step ``SWITCH`` (faults, if any, from ``FaultyModule``'s arguments)."""

    def compute(self, batch):
        out = super().compute(batch)
        if self.global_step >= SWITCH:
            out["loss"] = out["loss"] * WEIGHT
        return out

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / WARMUP))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def _actions(guard):
    return [(e.step, e.kind) for e in guard.event_log.events if e.kind in ("skip", "clip", "rebase")]


@pytest.mark.parametrize("factor", [10.0, 1000.0])
def test_default_skips_a_finite_loss_spike(tmp_path, factor):
    guard = GradientGuard(on_persistent="raise")
    rec = StepRecorder()
    torch.manual_seed(0)
    make_trainer(tmp_path, [guard, rec], max_steps=80).fit(Faulty(spike_steps={60}, spike_factor=factor, lr=3e-3))
    assert _actions(guard) == [(60, "skip")]
    event = next(e for e in guard.event_log.events if e.kind == "skip")
    assert event.data["cause"] == "spike"
    assert event.data["loss_confirmed"] is True
    assert event.data["loss_zscore"] > guard.loss_zscore
    assert event.data["norm"] > guard.spike_ratio * guard.state_dict()["optimizers"][0]["stats"]["mean"]
    assert_same(rec.snaps[60], rec.snaps[61])  # a true skip: parameters and Adam's moments untouched


def test_default_skips_a_finite_spike_on_the_device_with_a_fused_optimizer(tmp_path):
    guard = GradientGuard(sync_free=True, log_every_n_steps=10, on_persistent="raise")
    rec = StepRecorder()
    torch.manual_seed(0)
    make_trainer(tmp_path, [guard, rec], max_steps=80).fit(FusedFaulty(spike_steps={60}, spike_factor=100.0, lr=3e-3))
    assert guard.num_skipped == 1
    assert guard.num_clipped == 0
    assert_same(rec.snaps[60], rec.snaps[61])
    skip = next(e for e in guard.event_log.events if e.kind == "skip")
    assert skip.data["last_skip_step"] == 60


def test_default_skips_a_non_finite_gradient(tmp_path):
    guard = GradientGuard(on_persistent="raise")
    rec = StepRecorder()
    torch.manual_seed(0)
    make_trainer(tmp_path, [guard, rec], max_steps=40).fit(Faulty(inf_grad_steps={10, 30}, lr=3e-3))
    assert _actions(guard) == [(10, "skip"), (30, "skip")]  # step 10: before any statistics exist
    assert {e.data["cause"] for e in guard.event_log.events} == {"nonfinite"}
    assert_same(rec.snaps[10], rec.snaps[11])
    assert_same(rec.snaps[30], rec.snaps[31])


def test_default_leaves_a_warm_up_and_a_weight_switch_alone(tmp_path):
    steps = 240
    torch.manual_seed(0)
    plain = WarmupSwitch(lr=3e-3)
    make_trainer(tmp_path / "plain", [], max_steps=steps).fit(plain)
    guard = GradientGuard(on_persistent="raise")
    torch.manual_seed(0)
    guarded = WarmupSwitch(lr=3e-3)
    trainer = make_trainer(tmp_path / "guarded", [guard], max_steps=steps)
    trainer.fit(guarded)  # on_persistent="raise": persistent trouble would raise here

    actions = _actions(guard)
    assert trainer.global_step == steps
    # the warm-up and its end: nothing at all
    assert [a for a in actions if a[0] < SWITCH] == []
    # the switch: at the step itself a x5 loss weight is a x5 jump of loss and norm together, exactly what a x5 loss
    # spike is, so the guard may act on the first two steps; the third is the new level (a rebase), then nothing
    acted = [s for s, kind in actions if kind in ("skip", "clip")]
    assert len(acted) <= 2
    assert all(SWITCH <= s < SWITCH + 2 for s in acted)
    assert all(s < SWITCH + 3 for s, _ in actions)
    assert not [e for e in guard.event_log.events if e.kind in ("stop", "rollback")]
    # and the run ends where the unguarded run ends (mean loss of the last 20 steps within 2 %)
    tail = lambda m: sum(m.step_losses[-20:]) / 20  # noqa: E731
    assert tail(guarded) == pytest.approx(tail(plain), rel=0.02)


def test_a_loss_spike_during_the_warm_up_is_skipped_and_a_norm_excursion_is_not(tmp_path):
    # a x50 spike just after the statistics warmed up, while the learning rate still ramps
    guard = GradientGuard(on_persistent="raise")
    torch.manual_seed(0)
    make_trainer(tmp_path, [guard], max_steps=60).fit(WarmupSwitch(spike_steps={30}, spike_factor=50.0, lr=3e-3))
    assert _actions(guard) == [(30, "skip")]


def test_explicit_zscore_keeps_the_rule_of_0_2():
    legacy = GradientGuard(zscore=2.5)
    assert (legacy.spike_ratio, legacy.loss_zscore, legacy.clip_ratio, legacy.zscore_rebase_after) == (
        None, None, None, 8
    )  # fmt: skip
    default = GradientGuard()
    assert (default.spike_ratio, default.loss_zscore, default.clip_ratio, default.zscore_rebase_after) == (
        3.0, 6.0, 10.0, 3
    )  # fmt: skip
    both = GradientGuard(zscore=2.5, spike_ratio=3.0, loss_zscore=6.0)
    assert (both.spike_ratio, both.loss_zscore, both.clip_ratio) == (3.0, 6.0, 10.0)
    off = GradientGuard(spike_ratio=None)  # the earlier default: non-finite steps only
    assert (off.spike_ratio, off.loss_zscore, off.clip_ratio) == (None, None, None)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"spike_ratio": 1.0}, ValueError, r"`spike_ratio` must be > 1 .*got 1.0"),
        ({"spike_ratio": "3"}, TypeError, r"`spike_ratio` must be a positive number or None, got '3'"),
        ({"loss_zscore": -1.0}, ValueError, r"`loss_zscore` must be a finite number > 0, got -1.0"),
        ({"clip_ratio": 0.5}, ValueError, r"`clip_ratio` must be > 1 .*got 0.5"),
        ({"spike_ratio": None, "loss_zscore": 6.0}, ValueError, r"needs `spike_ratio` or `zscore`"),
        ({"loss_zscore": None, "clip_ratio": 10.0}, ValueError, r"`clip_ratio` .*needs `loss_zscore`"),
        ({"zscore": 2.5, "zscore_min_ratio": 3.0, "spike_ratio": 3.0}, ValueError, r"pass one"),
        ({"sync_free": "yes"}, TypeError, r"`sync_free` must be a bool or None"),
    ],
)
def test_bad_rule_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradientGuard(**kwargs)


class DDPFaults(WarmupSwitch):
    """Under DDP: a x100 loss spike on rank 0 only at step 60, an inf gradient on rank 1 only at step 90, the weight
    switch at ``SWITCH`` on both (faults keyed by rank through ``fault_ranks``)."""

    def _fault(self, steps):
        if self.global_step not in steps:
            return False
        return self.global_rank == (0 if steps is self.spike_steps else 1)


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_ddp_default_acts_identically_on_both_ranks(tmp_path):
    guard = GradientGuard(on_persistent="raise")
    dump = RankDump(tmp_path, guard)
    torch.manual_seed(0)
    module = DDPFaults(spike_steps={60}, spike_factor=100.0, inf_grad_steps={90}, lr=3e-3)
    trainer = make_trainer(tmp_path, [guard, dump], max_steps=SWITCH + 20, devices=2, strategy="ddp_spawn")
    trainer.fit(module)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for r in ranks:
        assert 60 in r["skip_steps"]  # a x100 loss spike on rank 0 only
        assert 90 in r["skip_steps"]  # an inf gradient on rank 1 only
        assert [s for s in r["skip_steps"] if s not in (60, 90)] == [s for s in r["skip_steps"] if s >= SWITCH]
        assert len([s for s in r["skip_steps"] if s >= SWITCH]) <= 2
        for step in (60, 90):
            for name in r["state"]:
                assert torch.equal(r["before"][step][name], r["before"][step + 1][name]), (step, name)
        assert all(torch.isfinite(v).all() for v in r["state"].values())
        assert all(math.isfinite(v) for v in r["losses"][-5:])
    assert ranks[0]["skip_steps"] == ranks[1]["skip_steps"]
    for name in ranks[0]["state"]:
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name


class _SyncWatch(pl.Callback):
    """``torch.cuda.set_sync_debug_mode("error")`` around the guard's ``on_before_optimizer_step`` (this callback's
    ``start`` goes before the guard in the callback list, ``end`` after it), except on the guard's own read steps."""

    def __init__(self, log_every: int) -> None:
        self.log_every = log_every
        self.watched = 0

        class _End(pl.Callback):
            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                torch.cuda.set_sync_debug_mode("default")

        self.end = _End()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        quiet = (trainer.global_step + 1) % self.log_every != 0 and trainer.global_step > 0
        if quiet:
            self.watched += 1
        torch.cuda.set_sync_debug_mode("error" if quiet else "default")


class CudaFaulty(Faulty):
    """A fused AdamW on the GPU: the default guard decides on the device."""

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, fused=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_default_guard_adds_no_host_sync_on_a_gpu_and_still_skips_the_spike(tmp_path, precision):
    guard = GradientGuard(log_every_n_steps=10, on_persistent="raise")
    watch = _SyncWatch(10)
    torch.manual_seed(0)
    trainer = make_trainer(
        tmp_path, [watch, guard, watch.end], max_steps=80, accelerator="cuda", precision=precision, deterministic=False
    )
    trainer.fit(CudaFaulty(spike_steps={60}, spike_factor=100.0, lr=3e-3))  # a host sync would raise inside the fit
    assert watch.watched > 50
    assert guard.num_skipped == 1  # the spike (GradScaler's own overflows are counted apart, not as skips)
    assert guard.num_clipped == 0
