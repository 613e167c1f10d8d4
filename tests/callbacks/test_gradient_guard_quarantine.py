"""``GradientGuard``'s recovery that remembers and explains, in real Trainers: the batches that led to a rollback are
quarantined (in the checkpoint too) and skipped when they come back; the triggering batch is replayed from the
restored state and the replay says whether the trouble came with the batch ("data") or not ("state")."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_stability.callbacks import GradientGuard, StabilityReport
from tests._helpers_guard import StepRecorder
from tests.helpers import (
    FAULT_WARNINGS,
    FaultyModule,
    assert_same,
    make_trainer,
    manual_optimization,
    regression_data,
)

pytestmark = FAULT_WARNINGS  # these tests inject faults: the guard's notices are expected

PER_EPOCH = 4  # batches per epoch (of 8 samples)
BAD = [(1, 1), (1, 2)]  # (epoch, batch_idx) of the batches whose samples are NaN: global steps 5 and 6


class EpochSampler(Sampler):
    """Epoch ``e`` reads samples ``[e * n, (e + 1) * n)`` in order: every epoch its own data, in the same order in
    every run (a run resumed at the start of epoch ``e`` sees what the uninterrupted one saw)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(range(self.epoch * self.n, (self.epoch + 1) * self.n))

    def __len__(self) -> int:
        return self.n


class BadBatchModule(FaultyModule):
    """``FaultyModule`` on data whose samples at the ``BAD`` batch positions are NaN: the fault is in the batch."""

    def train_dataloader(self):
        x, y = regression_data(n=8 * PER_EPOCH * 3).tensors
        x = x.clone()
        for epoch, batch_idx in BAD:
            start = (epoch * PER_EPOCH + batch_idx) * 8
            x[start : start + 8] = float("nan")
        return DataLoader(TensorDataset(x, y), batch_size=8, sampler=EpochSampler(8 * PER_EPOCH))


def _guard(**kw) -> GradientGuard:
    return GradientGuard(max_consecutive_skips=2, on_persistent="rollback", snapshot_every=2, **kw)


def _events(guard, kind):
    return [e for e in guard.event_log.events if e.kind == kind]


def _full_run(tmp_path, guard, module=None):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=PER_EPOCH, save_top_k=-1)
    module = module if module is not None else BadBatchModule(batchnorm=True)
    rec = StepRecorder()
    trainer = make_trainer(tmp_path / "full", [guard, rec, ckpt], max_steps=8, enable_checkpointing=True)
    trainer.fit(module)
    return module, rec


def test_a_bad_batch_replays_as_data_is_quarantined_and_skipped_again_after_a_resume(tmp_path):
    guard = _guard()
    module, full = _full_run(tmp_path, guard)
    # steps 5 and 6 (epoch 1, batches 1 and 2) are NaN: two skips in a row, a rollback at step 6 to the snapshot of 4
    (rollback,) = _events(guard, "rollback")
    assert (rollback.step, rollback.data["to_step"]) == (6, 4)
    (replay,) = _events(guard, "replay")
    assert replay.step == 6
    assert replay.data["cause"] == "data"
    assert replay.data["position"] == [1, 2]
    assert math.isnan(replay.data["norm"])
    assert math.isnan(replay.data["loss"])
    assert replay.data["batches"] == replay.data["quarantined"] == [[1, 1], [1, 2]]
    assert guard.quarantined == BAD
    # the replay left no trace: the state after step 6 is the restored snapshot of step 4, BatchNorm's running
    # statistics included (the replayed NaN batch went through them in training mode)
    assert "net.1.running_mean" in full.snaps[7]["module"]
    assert_same(full.snaps[7], full.snaps[4])

    # the checkpoint holds the quarantine (version 4), and a new guard reads it back
    state = guard.state_dict()
    assert state["version"] == 4
    assert state["quarantine"] == [[1, 1], [1, 2]]
    fresh = _guard()
    fresh.load_state_dict(state)
    assert fresh.quarantined == BAD
    assert fresh.state_dict() == state
    last = next((tmp_path / "ckpt").glob("*step=8.ckpt"))
    assert torch.load(last, weights_only=False)["callbacks"][guard.state_key]["quarantine"] == [[1, 1], [1, 2]]

    # the same guard and module resumed from the checkpoint of step 4 (saved before the bad batches, which knows no
    # quarantine): the checkpoint's empty quarantine does not erase what the guard learned, both batches are skipped
    early = next((tmp_path / "ckpt").glob("*step=4.ckpt"))
    assert torch.load(early, weights_only=False)["callbacks"][guard.state_key]["quarantine"] == []
    rec = StepRecorder()
    make_trainer(tmp_path / "resumed", [guard, rec], max_steps=8).fit(module, ckpt_path=early)
    assert guard.num_rollbacks == 0  # forced skips are not trouble: no new rollback
    assert _events(guard, "replay") == []
    skips = _events(guard, "skip")
    assert [e.step for e in skips] == [5, 6]
    assert all(e.data["quarantined"] for e in skips)
    assert_same(rec.snaps[5], rec.snaps[7])  # parameters and optimizer state bit-identical across both steps
    assert any(not torch.equal(rec.snaps[7]["module"][k], rec.final["module"][k]) for k in rec.final["module"])
    assert all(torch.isfinite(v).all() for v in rec.final["module"].values())


def test_load_quarantine_from_a_later_checkpoint_and_a_clean_batch_is_skipped_as_quarantined(tmp_path):
    guard = _guard()
    _full_run(tmp_path, guard)
    last = next((tmp_path / "ckpt").glob("*step=8.ckpt"))
    resumed = _guard()
    assert resumed.load_quarantine(last) == BAD
    assert resumed.load_quarantine([(0, 2), (1, 1)]) == [(0, 2)]  # only the new ones are returned
    rec = StepRecorder()
    make_trainer(tmp_path / "resumed", [resumed, rec], max_steps=8).fit(BadBatchModule())
    skips = {e.step: e for e in _events(resumed, "skip")}
    assert sorted(skips) == [2, 5, 6]
    # a finite batch that comes back quarantined: a forced skip, said so
    assert skips[2].data["cause"] == "quarantined"
    assert "quarantined batch (epoch 0, batch 2)" in skips[2].reason
    assert skips[5].data["cause"] == "nonfinite"
    assert skips[5].data["quarantined"]
    assert_same(rec.snaps[2], rec.snaps[3])
    assert_same(rec.snaps[5], rec.snaps[7])
    assert resumed.num_rollbacks == 0


class FusedBadBatchModule(BadBatchModule):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, fused=True)


def test_sync_free_mode_quarantines_the_same_streak_at_its_host_read(tmp_path):
    # the decisions stay on the device; the read after step 6 finds two skips in a row, reads the codes of steps 0-6
    # with them and quarantines the same two batches as the host path
    guard = _guard(sync_free=True, log_every_n_steps=7)
    rec = StepRecorder()
    make_trainer(tmp_path, [guard, rec], max_steps=8).fit(FusedBadBatchModule())
    (rollback,) = _events(guard, "rollback")
    assert (rollback.step, rollback.data["to_step"]) == (6, 0)
    (replay,) = _events(guard, "replay")
    assert replay.data["cause"] == "data"
    assert replay.data["batches"] == [[1, 1], [1, 2]]
    assert guard.quarantined == BAD
    assert_same({"module": rec.snaps[7]["module"]}, {"module": rec.snaps[0]["module"]})  # the weights of step 0


def test_manual_optimization_is_not_replayed_and_the_event_says_why(tmp_path):
    guard = _guard()
    make_trainer(tmp_path, [guard], max_steps=8).fit(manual_optimization(BadBatchModule)())
    (replay,) = _events(guard, "replay")
    assert replay.data["cause"] == "unavailable"
    assert replay.data["why"].startswith("manual optimization")
    assert "norm" not in replay.data
    assert guard.quarantined == BAD  # without a verdict, the batches that led to the rollback are quarantined


def test_load_quarantine_names_bad_arguments(tmp_path):
    guard = _guard()
    with pytest.raises(TypeError, match="`source` must be a checkpoint path or"):
        guard.load_quarantine(3)
    with pytest.raises(ValueError, match=r"`source` must hold \(epoch, batch_idx\) pairs of ints"):
        guard.load_quarantine([(1, 2, 3)])
    path = tmp_path / "other.ckpt"
    torch.save({"callbacks": {"Other": {}}}, path)
    with pytest.raises(ValueError, match="holds no state of this guard"):
        guard.load_quarantine(path)
    with pytest.raises(ValueError, match=r"`quarantine` must be one of \('rollback', 'skipped', 'off'\), got 'all'"):
        GradientGuard(quarantine="all")


def test_quarantine_modes_skipped_and_off(tmp_path):
    # "skipped": every batch the guard skipped as trouble, no rollback needed
    guard = GradientGuard(quarantine="skipped", max_consecutive_skips=None)
    make_trainer(tmp_path / "a", [guard], max_steps=8).fit(BadBatchModule())
    assert guard.quarantined == BAD
    assert _events(guard, "rollback") == []
    # "off": a rollback still replays and explains, nothing is remembered
    off = _guard(quarantine="off")
    make_trainer(tmp_path / "b", [off], max_steps=8).fit(BadBatchModule())
    (replay,) = _events(off, "replay")
    assert replay.data["cause"] == "data"
    assert replay.data["quarantined"] == []
    assert off.quarantined == []
    assert off.state_dict()["quarantine"] == []


def test_a_version_3_state_loads_with_an_empty_quarantine():
    guard = _guard()
    state = guard.state_dict()
    old = {k: v for k, v in state.items() if not k.startswith("quarantine")}
    guard.load_state_dict({**old, "version": 3})
    assert guard.quarantined == []
    assert guard.state_dict() == state


class LrBurst(pl.Callback):
    """Multiplies the learning rate by ``factor`` at the given steps (the state goes wrong, not the data)."""

    def __init__(self, steps, factor: float) -> None:
        self.steps, self.factor = set(steps), factor

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for group in trainer.optimizers[0].param_groups:
            group["lr"] = pl_module.lr * (self.factor if trainer.global_step in self.steps else 1.0)


def test_a_learning_rate_burst_replays_as_state_and_quarantines_nothing(tmp_path):
    # step 5 is taken with the learning rate times 1e6: the weights blow up, steps 6 and 7 are far above max_norm,
    # a rollback at 7 restores the snapshot of step 4; from there the batch of step 7 is harmless
    guard = GradientGuard(max_norm=50.0, max_consecutive_skips=2, on_persistent="rollback", snapshot_every=4)
    report = StabilityReport(dirpath=tmp_path / "report", log_to_wandb=False, print_summary=False)
    module = FaultyModule()
    make_trainer(tmp_path, [guard, LrBurst({5}, 1e6), report], max_steps=10).fit(module)
    assert [e.data["cause"] for e in _events(guard, "skip")] == ["over_max", "over_max"]
    (rollback,) = _events(guard, "rollback")
    assert (rollback.step, rollback.data["to_step"]) == (7, 4)
    (replay,) = _events(guard, "replay")
    assert replay.data["cause"] == "state"
    assert replay.data["rule"] == "accept"
    assert 0 < replay.data["norm"] < 50.0
    assert math.isfinite(replay.data["loss"])
    assert replay.data["batches"] == [[0, 6], [0, 7]]
    assert replay.data["quarantined"] == []
    assert guard.quarantined == []
    summary = report.last_report["summary"]
    assert summary["replays"] == {"state": 1}
    assert any("the state at that point was the problem" in r for r in summary["recommendations"])
    assert "replayed: state: 1" in StabilityReport.format_summary(report.last_report)


def test_the_report_recommends_looking_at_the_data_after_a_data_replay(tmp_path):
    guard = _guard()
    report = StabilityReport(dirpath=tmp_path / "report", log_to_wandb=False, print_summary=False)
    make_trainer(tmp_path, [guard, report], max_steps=8).fit(BadBatchModule())
    summary = report.last_report["summary"]
    assert summary["replays"] == {"data": 1}
    (rec,) = [r for r in summary["recommendations"] if "a data problem" in r]
    assert "step 6, epoch 1 batch 2" in rec


class _Dump(pl.Callback):
    def __init__(self, out_dir, guard) -> None:
        self.out_dir, self.guard = out_dir, guard
        self.before: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {
                "before": self.before,
                "quarantined": self.guard.quarantined,
                "events": [(e.step, e.kind, e.data.get("cause")) for e in self.guard.event_log.events],
            },
            self.out_dir / f"rank{trainer.global_rank}.pt",
        )


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_ddp_both_ranks_quarantine_and_skip_the_batch_after_a_resume(tmp_path):
    kw = {"devices": 2, "strategy": "ddp_spawn", "use_distributed_sampler": False, "max_steps": 8}
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=PER_EPOCH, save_top_k=-1)
    guard = _guard()
    (tmp_path / "full").mkdir()
    dump = _Dump(tmp_path / "full", guard)
    make_trainer(tmp_path / "full", [guard, dump, ckpt], enable_checkpointing=True, **kw).fit(BadBatchModule())
    ranks = [torch.load(tmp_path / "full" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for r in ranks:
        assert r["quarantined"] == BAD
        assert (6, "replay", "data") in r["events"]

    resumed = _guard()
    resumed.load_quarantine(next((tmp_path / "ckpt").glob("*step=8.ckpt")))
    (tmp_path / "resumed").mkdir()
    dump = _Dump(tmp_path / "resumed", resumed)
    early = next((tmp_path / "ckpt").glob("*step=4.ckpt"))
    make_trainer(tmp_path / "resumed", [resumed, dump], **kw).fit(BadBatchModule(), ckpt_path=early)
    ranks = [torch.load(tmp_path / "resumed" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for r in ranks:
        assert [s for s, kind, _ in r["events"] if kind == "skip"] == [5, 6]
        assert not [kind for _, kind, _ in r["events"] if kind in ("rollback", "replay")]
        for k in r["before"][5]:
            assert torch.equal(r["before"][5][k], r["before"][7][k]), k  # skipped on this rank
    for k in ranks[0]["before"][7]:
        assert torch.equal(ranks[0]["before"][7][k], ranks[1]["before"][7][k]), k
