"""``GradientGuard`` on a healthy run whose gradient scale changes for good: no stall, bounded skips, NaN still skipped.

The run: a regression MLP (Adam, 1024 samples, batch 128) whose loss weight switches from 1 to 4 at step 100 (a
curriculum switch: Adam's update is scale-invariant, the gradient norm is 4x from then on), plus a NaN loss at step
150. With the 0.1.0 rule (spikes never enter the statistics) every step after the switch is a spike until
``max_consecutive_skips`` ends the run; with the level-shift rule the switch costs ``zscore_rebase_after - 1`` skips.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_stability.callbacks import GradientGuard
from tests._helpers_guard import FusedFaultyModule, RankDump, StepRecorder
from tests.helpers import FAULT_WARNINGS, FaultyModule, assert_same, make_trainer, regression_loader

pytestmark = FAULT_WARNINGS  # these tests inject faults and spikes: the guard's notices are expected

SWITCH, NAN_STEP, STEPS, WEIGHT = 100, 150, 200, 4.0


class _Switch:
    """The loss is multiplied by ``WEIGHT`` from optimizer step ``SWITCH`` on (module level: ddp_spawn pickles it)."""

    def compute(self, batch):
        out = super().compute(batch)
        if self.global_step >= SWITCH:
            out["loss"] = out["loss"] * WEIGHT
        return out

    def train_dataloader(self):
        return regression_loader(n=1024, batch_size=128)


class LossWeightSwitch(_Switch, FaultyModule):
    """The switch on a torch Adam (the guard skips from the host)."""


class FusedLossWeightSwitch(_Switch, FusedFaultyModule):
    """The switch on a fused Adam (the guard can skip on the device)."""


def _module(fused: bool = False):
    torch.manual_seed(0)
    return (FusedLossWeightSwitch if fused else LossWeightSwitch)(nan_loss_steps={NAN_STEP}, lr=3e-3)


def _events(guard, kind):
    return [e for e in guard.event_log.events if e.kind == kind]


@pytest.mark.parametrize("sync_free", [False, True])
def test_a_loss_weight_switch_costs_a_bounded_number_of_skips_and_nan_is_still_skipped(tmp_path, sync_free):
    guard = GradientGuard(zscore=2.5, on_persistent="raise", sync_free=sync_free, log_every_n_steps=10)
    rec = StepRecorder()
    trainer = make_trainer(tmp_path, [guard, rec], max_steps=STEPS)
    module = _module(fused=sync_free)
    trainer.fit(module)  # on_persistent="raise": a stall would raise here

    assert trainer.global_step == STEPS  # every step ran
    assert guard.num_rollbacks == 0
    assert not _events(guard, "stop")
    assert guard.num_rebased == 1
    k = guard.zscore_rebase_after
    assert guard.num_skipped <= (k - 1) + 1  # the streak before the rebase, and the NaN step
    if not sync_free:  # host mode: one event per step, so the steps themselves can be pinned
        spikes = [e.step for e in _events(guard, "skip") if e.data["cause"] == "spike"]
        assert spikes == list(range(SWITCH, SWITCH + k - 1))
        assert [e.step for e in _events(guard, "rebase")] == [SWITCH + k - 1]
        assert [e.step for e in _events(guard, "skip") if e.data["cause"] == "nonfinite"] == [NAN_STEP]
    # the NaN step is a true skip: parameters and optimizer state bit-identical across it, and training went on
    assert_same(rec.snaps[NAN_STEP], rec.snaps[NAN_STEP + 1])
    after = rec.snaps[SWITCH + k]["module"]
    assert any(not torch.equal(after[n], rec.final["module"][n]) for n in after)
    assert all(torch.isfinite(v).all() for v in rec.final["module"].values())
    assert math.isfinite(module.step_losses[-1])
    # nothing non-finite entered the statistics
    assert all(math.isfinite(v) for v in guard.state_dict()["optimizers"][0]["stats"].values())


def test_the_strict_rule_stalls_on_the_same_switch(tmp_path):
    # the failure the rule fixes, pinned so the test above is known to be able to fail
    guard = GradientGuard(zscore=2.5, zscore_rebase_after=None, on_persistent="stop")
    trainer = make_trainer(tmp_path, [guard], max_steps=STEPS)
    trainer.fit(_module())
    assert trainer.global_step < SWITCH + 2 * guard.max_consecutive_skips
    assert [e.step for e in _events(guard, "stop")] == [SWITCH + guard.max_consecutive_skips - 1]
    assert guard.num_skipped == guard.max_consecutive_skips


def test_resume_inside_the_streak_makes_the_same_decisions(tmp_path):
    # a checkpoint at step 104 lies inside the streak of spikes: the streak statistics must be in the checkpoint
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=SWITCH + 4, save_top_k=-1)
    full_guard, full_rec = GradientGuard(zscore=2.5), StepRecorder()
    make_trainer(tmp_path / "full", [full_guard, full_rec, ckpt], max_steps=SWITCH + 20, enable_checkpointing=True).fit(
        _module()
    )
    path = next((tmp_path / "ckpt").glob(f"*step={SWITCH + 4}.ckpt"))
    saved = torch.load(path, weights_only=True)["callbacks"][full_guard.state_key]["optimizers"][0]["stats"]
    assert saved["streak_count"] == 4

    resumed_guard, resumed_rec = GradientGuard(zscore=2.5), StepRecorder()
    make_trainer(tmp_path / "resumed", [resumed_guard, resumed_rec], max_steps=SWITCH + 20).fit(
        _module(), ckpt_path=path
    )
    assert [(e.step, e.kind) for e in resumed_guard.event_log.events] == [
        (e.step, e.kind) for e in full_guard.event_log.events
    ]
    assert resumed_guard.state_dict()["optimizers"] == full_guard.state_dict()["optimizers"]
    assert_same(resumed_rec.final, full_rec.final)


@pytest.mark.slow  # two spawned ranks for 200 steps: about 40 s on an idle 2-core machine
@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_ddp_level_shift_is_rebased_identically_on_both_ranks(tmp_path):
    guard = GradientGuard(zscore=2.5, on_persistent="raise")
    dump = RankDump(tmp_path, guard)
    trainer = make_trainer(tmp_path, [guard, dump], max_steps=STEPS, devices=2, strategy="ddp_spawn")
    trainer.fit(_module())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    k = guard.zscore_rebase_after
    for r in ranks:
        assert r["num_skipped"] <= (k - 1) + 1
        assert NAN_STEP in r["skip_steps"]
        for name in r["state"]:
            assert torch.equal(r["before"][NAN_STEP][name], r["before"][NAN_STEP + 1][name]), name
            assert torch.isfinite(r["state"][name]).all()
        assert len(r["losses"]) == STEPS  # every step ran on this rank
    assert ranks[0]["skip_steps"] == ranks[1]["skip_steps"]
    assert any(s >= SWITCH for s in ranks[0]["skip_steps"] if s != NAN_STEP)  # the switch was seen as a shift
    for name in ranks[0]["state"]:
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
