"""``GradientGuard`` in real Trainers: true skips, detection, persistent trouble, resume, precision, DDP."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_stability.callbacks import GradientGuard
from tests._helpers_guard import FusedFaultyModule, RankDump, StepRecorder, TwoOptimizerModule
from tests.helpers import FAULT_WARNINGS, FaultyModule, assert_same, make_trainer

pytestmark = FAULT_WARNINGS  # these tests inject faults: the guard's notices are expected


def _fit(tmp_path, module, guard, **kw):
    rec = StepRecorder()
    trainer = make_trainer(tmp_path, [guard, rec], **kw)
    trainer.fit(module)
    return trainer, rec


def _skip_steps(guard, kind="skip"):
    return [e.step for e in guard.event_log.events if e.kind == kind]


def _changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a["module"][k], b["module"][k]) for k in a["module"])


# ----------------------------------------------------------------------------------------------------------------------
# a skip is a true skip


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_skipped_step_leaves_parameters_and_optimizer_state_bit_identical(tmp_path, optimizer):
    module = FaultyModule(optimizer=optimizer, weight_decay=0.1, inf_grad_steps={3})
    guard = GradientGuard()
    _, rec = _fit(tmp_path, module, guard, max_steps=6)
    assert guard.num_skipped == 1
    assert _skip_steps(guard) == [3]
    assert_same(rec.snaps[3], rec.snaps[4])  # params, moments, step counts, weight decay: untouched
    assert _changed(rec.snaps[2], rec.snaps[3])
    assert _changed(rec.snaps[4], rec.snaps[5])
    assert all(torch.isfinite(v).all() for v in rec.final["module"].values())
    assert math.isfinite(module.step_losses[-1])


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_fused_optimizer_is_skipped_through_found_inf(tmp_path, optimizer):
    # step 0 is skipped too: torch's fused SGD would leave an uninitialised momentum buffer behind
    module = FusedFaultyModule(optimizer=optimizer, inf_grad_steps={0, 3})
    guard = GradientGuard()
    _, rec = _fit(tmp_path, module, guard, max_steps=6)
    assert _skip_steps(guard) == [0, 3]
    assert_same(rec.snaps[0], rec.snaps[1])
    assert_same(rec.snaps[3], rec.snaps[4])
    assert _changed(rec.snaps[4], rec.snaps[5])
    assert all(torch.isfinite(v).all() for s in rec.final["optim"].values() for v in s.values() if torch.is_tensor(v))


def test_sync_free_mode_makes_the_same_decisions_as_host_mode(tmp_path):
    kwargs = {"inf_grad_steps": {2}, "nan_loss_steps": {5}, "spike_steps": {9}, "spike_factor": 1e4}
    finals, guards = [], []
    for sync_free in (False, True):
        guard = GradientGuard(sync_free=sync_free, zscore=2.5, zscore_warmup=3, log_every_n_steps=4)
        torch.manual_seed(0)
        _, rec = _fit(tmp_path / str(sync_free), FusedFaultyModule(**kwargs), guard, max_steps=12)
        assert guard.num_skipped == 3
        finals.append(rec.final)
        guards.append(guard)
    assert _skip_steps(guards[0]) == [2, 5, 9]
    # sync-free: the host reads every 4 steps (after steps 3, 7, 11); each read reports the skips since the last one
    assert _skip_steps(guards[1]) == [3, 7, 11]
    assert [e.data["last_skip_step"] for e in guards[1].event_log.events] == [2, 5, 9]
    assert [e.data["cause"] for e in guards[1].event_log.events] == ["nonfinite", "nonfinite", "spike"]
    assert_same(finals[0], finals[1])


def test_lightning_gradient_clipping_after_a_skip_does_not_crash(tmp_path):
    module = FaultyModule(inf_grad_steps={2})
    guard = GradientGuard()
    _, rec = _fit(tmp_path, module, guard, max_steps=4, gradient_clip_val=0.5)
    assert guard.num_skipped == 1
    assert_same(rec.snaps[2], rec.snaps[3])


# ----------------------------------------------------------------------------------------------------------------------
# detection


def test_nan_loss_and_fixed_bound_are_skipped_with_a_diagnosis(tmp_path):
    module = FaultyModule(nan_loss_steps={2}, spike_steps={5}, spike_factor=1e4)
    guard = GradientGuard(max_norm=50.0)
    with pytest.warns(UserWarning, match="skipped step 2: non-finite"):
        _, rec = _fit(tmp_path, module, guard, max_steps=7)
    events = {e.step: e for e in guard.event_log.events}
    assert sorted(events) == [2, 5]
    assert events[2].data["cause"] == "nonfinite"
    assert events[2].data["nonfinite_params"] == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    assert events[5].data["cause"] == "over_max"
    assert events[5].data["norm"] > 50.0
    assert events[5].data["nonfinite_params"] == []
    assert events[5].data["top_layers"][0][1] >= events[5].data["top_layers"][1][1]
    assert_same(rec.snaps[5], rec.snaps[6])


def test_zscore_skips_a_spike_after_warm_up_only(tmp_path):
    guard = GradientGuard(zscore=4.0, zscore_warmup=6)
    _, rec = _fit(tmp_path / "a", FaultyModule(spike_steps={8}, spike_factor=1e3), guard, max_steps=10)
    assert _skip_steps(guard) == [8]
    event = guard.event_log.events[-1]
    assert event.data["cause"] == "spike"
    assert event.data["norm"] > event.data["threshold"]
    assert_same(rec.snaps[8], rec.snaps[9])
    # the same spike inside the warm-up is accepted (there are no statistics to judge it by yet)
    late = GradientGuard(zscore=2.5, zscore_warmup=9)
    _, rec = _fit(tmp_path / "b", FaultyModule(spike_steps={8}, spike_factor=1e3), late, max_steps=10)
    assert late.num_skipped == 0
    assert _changed(rec.snaps[8], rec.snaps[9])


def test_zscore_clip_scales_the_gradient_to_the_threshold(tmp_path):
    module = FaultyModule(spike_steps={8}, spike_factor=1e3)
    guard = GradientGuard(zscore=4.0, zscore_warmup=6, spike_action="clip")
    _, rec = _fit(tmp_path, module, guard, max_steps=10)
    assert guard.num_skipped == 0
    assert guard.num_clipped == 1
    event = next(e for e in guard.event_log.events if e.kind == "clip")
    assert event.step == 8
    assert rec.norms_after_guard[8] == pytest.approx(event.data["threshold"], rel=1e-5)
    assert _changed(rec.snaps[8], rec.snaps[9])


# ----------------------------------------------------------------------------------------------------------------------
# persistent trouble


def test_rollback_restores_the_snapshot_and_skips_the_next_batches(tmp_path):
    module = FaultyModule(nan_loss_steps=set(range(6, 9)))
    guard = GradientGuard(
        max_consecutive_skips=3, on_persistent="rollback", snapshot_every=2, skip_batches_after_rollback=2
    )
    with pytest.warns(UserWarning, match="rolled back to the snapshot of step 6"):
        _, rec = _fit(tmp_path, module, guard, max_steps=14)
    assert guard.num_rollbacks == 1
    rollback = next(e for e in guard.event_log.events if e.kind == "rollback")
    assert rollback.step == 8
    assert rollback.data["to_step"] == 6
    # after the rollback the model and optimizer equal the snapshot (here: the state step 6 started from)
    assert_same(rec.snaps[9], rec.snaps[6])
    assert _skip_steps(guard) == [6, 7, 8, 9, 10]  # three NaN steps, then the two batches after the rollback
    assert_same(rec.snaps[11], rec.snaps[6])
    assert _changed(rec.snaps[11], rec.snaps[12])
    assert math.isfinite(module.step_losses[-1])


def test_rollback_goes_back_further_than_the_current_state(tmp_path):
    # the last snapshot is older than the last good step: the rollback undoes accepted steps 4 and 5
    module = FaultyModule(nan_loss_steps=set(range(6, 8)))
    guard = GradientGuard(max_consecutive_skips=2, on_persistent="rollback", snapshot_every=4)
    _, rec = _fit(tmp_path, module, guard, max_steps=9)
    rollback = next(e for e in guard.event_log.events if e.kind == "rollback")
    assert rollback.data["to_step"] == 4
    assert_same(rec.snaps[8], rec.snaps[4])


def test_sync_free_rollback_acts_at_the_next_read(tmp_path):
    module = FusedFaultyModule(nan_loss_steps={6, 7, 8})
    guard = GradientGuard(
        sync_free=True, log_every_n_steps=4, max_consecutive_skips=2, on_persistent="rollback", snapshot_every=4
    )
    _, rec = _fit(tmp_path, module, guard, max_steps=14)
    rollback = next(e for e in guard.event_log.events if e.kind == "rollback")
    assert rollback.step == 7  # the read after steps 4..7: two consecutive skips (6, 7) are persistent trouble
    assert rollback.data["to_step"] == 4  # the snapshot taken after the read at step 3 found it good
    assert_same(rec.snaps[8], rec.snaps[4])
    assert guard.num_rollbacks == 1
    assert math.isfinite(module.step_losses[-1])


def test_stop_ends_the_run_cleanly(tmp_path):
    module = FaultyModule(nan_loss_steps=set(range(3, 100)))
    guard = GradientGuard(max_consecutive_skips=4, on_persistent="stop")
    with pytest.warns(UserWarning, match="Stopping the run"):
        trainer, rec = _fit(tmp_path, module, guard, max_steps=50)
    assert trainer.global_step == 7  # steps 3..6 skipped, the run ends after the fourth
    assert [e.kind for e in guard.event_log.events][-1] == "stop"
    assert_same(rec.final, rec.snaps[3])  # the last good state is what the run ends with


def test_raise_reports_the_diagnosis(tmp_path):
    module = FaultyModule(nan_loss_steps=set(range(2, 100)))
    guard = GradientGuard(max_consecutive_skips=3, on_persistent="raise", warn_every_n_steps=1000)
    with pytest.raises(RuntimeError, match=r"persistent trouble at step 4: 3 consecutive skipped steps.*net\.0"):
        _fit(tmp_path, module, guard, max_steps=10)


# ----------------------------------------------------------------------------------------------------------------------
# resume


def test_resumed_run_makes_the_same_decisions(tmp_path):
    def module():
        return FaultyModule(spike_steps={5, 11, 14}, spike_factor=30.0, inf_grad_steps={12})

    def guard():
        return GradientGuard(zscore=2.0, zscore_warmup=3, zscore_alpha=0.9)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=8, save_top_k=-1)
    full_guard, full_rec = guard(), StepRecorder()
    make_trainer(tmp_path / "full", [full_guard, full_rec, ckpt], max_steps=16, enable_checkpointing=True).fit(module())
    path = next((tmp_path / "ckpt").glob("*step=8.ckpt"))

    resumed_guard, resumed_rec = guard(), StepRecorder()
    resumed = make_trainer(tmp_path / "resumed", [resumed_guard, resumed_rec], max_steps=16)
    resumed.fit(module(), ckpt_path=path)
    full_skips = _skip_steps(full_guard)
    assert 5 in full_skips
    assert 12 in full_skips
    assert {11, 14} & set(full_skips)
    assert _skip_steps(resumed_guard) == full_skips  # the event log continues from the checkpoint
    assert resumed_guard.state_dict()["optimizers"] == full_guard.state_dict()["optimizers"]
    assert_same(resumed_rec.final, full_rec.final)


def test_state_dict_round_trip_and_state_key():
    guard = GradientGuard(max_norm=10.0, zscore=2.5)
    assert guard.state_key == "GradientGuard{'max_norm': 10.0, 'zscore': 2.5, 'spike_action': 'skip'}"
    assert GradientGuard().state_key != guard.state_key
    state = {
        "version": 4,
        "optimizers": {
            0: {
                "stats": {
                    "mean": 1.5,
                    "var": 0.25,
                    "count": 25,
                    "streak_mean": 6.0,
                    "streak_var": 0.5,
                    "streak_count": 2,
                },
                "counters": {
                    "num_skipped": 3,
                    "num_amp_overflows": 2,
                    "num_clipped": 0,
                    "consecutive": 1,
                    "consecutive_amp": 0,
                    "last_skip_step": 41,
                    "num_rebased": 1,
                },
            }
        },
        "num_rollbacks": 1,
        "skip_remaining": 2,
        "good_since_snapshot": 7,
        "quarantine": [[0, 5], [1, 3]],
        "quarantine_streak": [[2, 0]],
        "last_warn_step": 41,
        "event_log": guard.event_log.state_dict(),
    }
    guard.load_state_dict(state)
    assert guard.state_dict() == state
    assert guard.num_skipped == 3
    assert guard.num_amp_overflows == 2
    assert guard.num_rollbacks == 1
    assert guard.num_rebased == 1
    assert guard.quarantined == [(0, 5), (1, 3)]
    # a 0.2 checkpoint (version 2: no loss statistics) still loads, into the same state (with no quarantine)
    no_quarantine = {k: v for k, v in state.items() if not k.startswith("quarantine")}
    older = GradientGuard(max_norm=10.0, zscore=2.5)
    older.load_state_dict({**no_quarantine, "version": 2})
    assert older.state_dict() == {**state, "quarantine": [], "quarantine_streak": []}


def test_a_0_1_0_guard_state_still_loads_with_an_empty_streak():
    guard = GradientGuard(zscore=2.5)
    old = {  # what 0.1.0 wrote: version 1, three statistics, six counters
        "version": 1,
        "optimizers": {
            0: {
                "stats": {"mean": 1.5, "var": 0.25, "count": 25},
                "counters": {
                    "num_skipped": 3,
                    "num_amp_overflows": 0,
                    "num_clipped": 0,
                    "consecutive": 0,
                    "consecutive_amp": 0,
                    "last_skip_step": 41,
                },  # fmt: skip
            }
        },
        "num_rollbacks": 0,
        "skip_remaining": 0,
        "good_since_snapshot": 0,
        "last_warn_step": None,
        "event_log": guard.event_log.state_dict(),
    }
    guard.load_state_dict(old)
    new = guard.state_dict()
    assert new["version"] == 4
    assert new["optimizers"][0]["stats"] == {
        "mean": 1.5, "var": 0.25, "count": 25, "streak_mean": 0.0, "streak_var": 0.0, "streak_count": 0
    }  # fmt: skip
    assert new["optimizers"][0]["counters"]["num_rebased"] == 0
    assert guard.num_skipped == 3
    assert new["quarantine"] == []
    with pytest.raises(ValueError, match="`GradientGuard` state has version 5"):
        guard.load_state_dict({**old, "version": 5})


# ----------------------------------------------------------------------------------------------------------------------
# precision, manual optimization, several optimizers, logging


def test_bf16_mixed(tmp_path):
    module = FaultyModule(inf_grad_steps={2})
    guard = GradientGuard()
    _, rec = _fit(tmp_path, module, guard, max_steps=4, precision="bf16-mixed")
    assert _skip_steps(guard) == [2]
    assert_same(rec.snaps[2], rec.snaps[3])
    assert guard.last_grad_norm.dtype == torch.float32
    assert guard.last_grad_norm.ndim == 0


class _ScaleRecorder(StepRecorder):
    def __init__(self) -> None:
        super().__init__()
        self.scales: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.scales[trainer.global_step] = trainer.precision_plugin.scaler.get_scale()


@pytest.mark.parametrize(("fused", "sync_free"), [(False, False), (True, False), (True, True)])
def test_fp16_overflows_are_counted_apart_and_the_scaler_still_backs_off(tmp_path, fused, sync_free):
    # Lightning turns precision="16-mixed" into bf16 on CPU, so the fp16 plugin and GradScaler are wired explicitly
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    plugin = MixedPrecision("16-mixed", device="cpu", scaler=scaler)
    module = (FusedFaultyModule if fused else FaultyModule)(nan_loss_steps={6})
    guard = GradientGuard(sync_free=sync_free, log_every_n_steps=1)  # sync-free: read back every step to compare
    rec = _ScaleRecorder()
    make_trainer(tmp_path, [guard, rec], plugins=[plugin], max_steps=10).fit(module)
    backoffs = [s for s in range(9) if rec.scales[s + 1] < rec.scales[s]]
    assert 6 in backoffs  # the NaN-loss step lowered the scale too: the scaler's bookkeeping is intact
    overflows = [s for s in backoffs if s != 6]
    assert len(overflows) >= 1  # the untrained model overflows fp16 at scale 2**16
    assert guard.num_amp_overflows == len(overflows)
    assert _skip_steps(guard, "amp_overflow") == overflows
    assert _skip_steps(guard) == [6]  # the NaN loss is a real skip, not calibration
    assert guard.num_skipped == 1
    for s in [*overflows, 6]:
        assert_same(rec.snaps[s], rec.snaps[s + 1])


def test_manual_optimization_with_two_optimizers_skips_only_the_faulty_one(tmp_path):
    module = TwoOptimizerModule(inf_b_batches={2})
    guard = GradientGuard()
    rec = StepRecorder(with_optimizer=False)
    make_trainer(tmp_path, [guard, rec], max_steps=8).fit(module)  # 2 optimizer steps per batch
    assert guard.num_skipped == 1
    skip = guard.event_log.events[0]
    assert skip.data["nonfinite_params"] == ["net_b.0.weight", "net_b.0.bias", "net_b.1.weight", "net_b.1.bias"]
    before, after = rec.snaps[4]["module"], rec.snaps[6]["module"]  # batch 2 runs global steps 4 and 5
    assert torch.equal(before["net_b.0.weight"], after["net_b.0.weight"])
    assert not torch.equal(before["net_a.0.weight"], after["net_a.0.weight"])
    assert set(guard.state_dict()["optimizers"]) == {0, 1}


def test_logs_under_the_guard_prefix(tmp_path):
    module = FaultyModule(inf_grad_steps={1})
    guard = GradientGuard(zscore=2.5, zscore_warmup=2, log_every_n_steps=2)
    logger = CSVLogger(tmp_path, name="logs")
    make_trainer(tmp_path, [guard], max_steps=6, logger=logger, log_every_n_steps=2).fit(module)
    text = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    header = text.splitlines()[0].split(",")
    for key in ("grad_norm", "skipped", "consecutive_skips", "rollbacks", "amp_overflows", "threshold"):
        assert f"guard/{key}" in header
    rows = [dict(zip(header, line.split(","))) for line in text.splitlines()[1:]]
    assert max(float(r["guard/skipped"]) for r in rows if r["guard/skipped"]) == 1.0


# ----------------------------------------------------------------------------------------------------------------------
# arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_norm": -1.0}, r"`max_norm` must be a finite number > 0, got -1.0"),
        ({"max_norm": float("inf")}, "`max_norm`"),
        ({"zscore": 0}, r"`zscore` must be a finite number > 0, got 0"),
        ({"zscore_alpha": 1.0}, r"`zscore_alpha` must be in \(0, 1\), got 1.0"),
        ({"zscore_warmup": 0}, r"`zscore_warmup` must be >= 1, got 0"),
        ({"zscore_rebase_after": 1}, r"`zscore_rebase_after` must be >= 2, got 1"),
        ({"spike_action": "zero"}, r"`spike_action` must be one of .*got 'zero'"),
        ({"spike_action": "clip", "spike_ratio": None}, "needs a spike threshold"),
        ({"max_consecutive_skips": 0}, r"`max_consecutive_skips` must be >= 1, got 0"),
        ({"on_persistent": "ignore"}, r"`on_persistent` must be one of .*got 'ignore'"),
        ({"snapshot_every": 0}, r"`snapshot_every` must be >= 1, got 0"),
        ({"snapshot_device": "gpu"}, r"`snapshot_device` must be one of .*got 'gpu'"),
        ({"skip_batches_after_rollback": -1}, r"`skip_batches_after_rollback` must be >= 0, got -1"),
        ({"log_every_n_steps": 0}, r"`log_every_n_steps` must be >= 1, got 0"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientGuard(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_norm": "10"}, "`max_norm`"),
        ({"zscore_warmup": 2.5}, "`zscore_warmup` must be an int"),
        ({"zscore_rebase_after": 8.0}, "`zscore_rebase_after` must be an int or None"),
        ({"sync_free": 1}, "`sync_free` must be a bool"),
        ({"protect_buffers": 3}, "`protect_buffers`"),
    ],
)
def test_wrong_types_raise_type_error(kwargs, match):
    with pytest.raises(TypeError, match=match):
        GradientGuard(**kwargs)


def test_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        GradientGuard(10.0)  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------------------------------
# DDP


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_ddp_inf_gradient_on_one_rank_is_skipped_on_both(tmp_path):
    module = FaultyModule(inf_grad_steps={2}, fault_ranks={1})
    guard = GradientGuard()
    dump = RankDump(tmp_path, guard)
    trainer = make_trainer(
        tmp_path, [guard, dump], max_steps=5, devices=2, strategy="ddp_spawn", use_distributed_sampler=False
    )
    trainer.fit(module)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for r in ranks:
        assert r["num_skipped"] == 1
        assert r["skip_steps"] == [2]
        for k in r["state"]:
            assert torch.equal(r["before"][2][k], r["before"][3][k]), k  # skipped on this rank
            assert torch.isfinite(r["state"][k]).all()
    for k in ranks[0]["state"]:
        assert torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]), k


class _NoisyScale:
    """A healthy run whose gradient scale is noisy, as a small batch's is: the loss times a fixed log-normal factor
    per step (``exp(0.25 z)``, coefficient of variation about 0.25)."""

    FACTORS = torch.exp(0.25 * torch.randn(200, generator=torch.Generator().manual_seed(1))).tolist()

    def compute(self, batch):
        out = super().compute(batch)
        out["loss"] = out["loss"] * self.FACTORS[self.global_step]
        return out


class NoisyFaulty(_NoisyScale, FaultyModule):
    """The noisy healthy run on a torch Adam (the guard skips from the host)."""


class FusedNoisyFaulty(_NoisyScale, FusedFaultyModule):
    """The same on a fused Adam (the guard can skip on the device)."""


@pytest.mark.parametrize("sync_free", [False, True])
def test_zscore_min_ratio_spares_noisy_healthy_steps_and_still_skips_a_spike(tmp_path, sync_free):
    """``mean + 2.5 std`` of a noisy gradient norm is crossed by healthy steps; the ratio floor keeps only the
    injected x100 loss spike, which is a true skip (parameters and optimizer state unchanged)."""
    spike, steps = 90, 110
    skipped = {}
    for floor in (None, 3.0):
        torch.manual_seed(0)
        module = (FusedNoisyFaulty if sync_free else NoisyFaulty)(spike_steps={spike}, lr=3e-3)
        guard = GradientGuard(zscore=2.5, zscore_min_ratio=floor, on_persistent="raise", sync_free=sync_free)
        rec = StepRecorder()
        make_trainer(tmp_path / str(floor), [guard, rec], max_steps=steps).fit(module)
        skipped[floor] = [s for s in range(steps - 1) if _unchanged(rec, s)]
        if floor is not None:
            assert_same(rec.snaps[spike], rec.snaps[spike + 1])
            assert guard.num_skipped == 1
    assert skipped[3.0] == [spike]
    assert spike in skipped[None]
    assert len(skipped[None]) > 1  # without the floor, healthy steps were skipped too


def _unchanged(rec: StepRecorder, step: int) -> bool:
    before, after = rec.snaps[step]["module"], rec.snaps[step + 1]["module"]
    return all(torch.equal(before[n], after[n]) for n in before)


def test_zscore_min_ratio_is_checked():
    with pytest.raises(ValueError, match="zscore_min_ratio"):
        GradientGuard(zscore=2.5, zscore_min_ratio=1.0)
    with pytest.raises(ValueError, match="needs `zscore`"):
        GradientGuard(zscore_min_ratio=3.0)
    with pytest.raises(TypeError, match="zscore_min_ratio"):
        GradientGuard(zscore=2.5, zscore_min_ratio="3")
