"""Fault matrix: the whole callback stack on the codec and the cascade, faults injected into the real modules.

Every scenario is a real ``Trainer`` with a real ``ModelCheckpoint`` (every 2 steps, plus ``last.ckpt``). What
"survived" means depends on the configured reaction:

- ``skip``: the faulted step changed nothing (parameters, optimizer state and buffers bit-identical across it), the
  run reached ``max_steps``, the loss weight stayed finite and in bounds;
- ``rollback``: the guard restored its last good snapshot and training went on to ``max_steps`` with finite weights;
- ``stop``: the run ended cleanly before ``max_steps``;
- ``raise``: ``fit`` raised ``RuntimeError`` naming the persistent trouble, and the report says "interrupted";

and, in every case, every checkpoint on disk (``last.ckpt`` included) holds finite weights, loaded with
``weights_only=True``.
"""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.helpers import FAULT_WARNINGS, assert_same, make_trainer, snapshot
from tests.reliability._stack import (
    finite_checkpoint,
    finite_module,
    full_stack,
    loader,
    make_module,
    record_fault,
)

pytestmark = FAULT_WARNINGS  # these tests inject faults: the guard's notices are expected


class StepProbe(pl.Callback):
    """Snapshots of the module and its optimizer at the start of every step (``snaps[s]``: the state step ``s`` saw)."""

    def __init__(self) -> None:
        self.snaps: dict[int, dict] = {}
        self.final: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.snaps[trainer.global_step] = snapshot(pl_module, trainer.optimizers[0])

    def on_train_end(self, trainer, pl_module):
        self.final = snapshot(pl_module, trainer.optimizers[0])


class WriteNaNAfterStep(pl.Callback):
    """A parameter becomes NaN right *after* an accepted optimizer step (as an overflowing update would make it).

    This is the hardest place for a guard: the step that produced the NaN looked healthy, so it counts as a good
    step, and the next rollback snapshot may be taken right after it."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.fired = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1 and not self.fired:  # optimizer step `self.step` just ran
            with torch.no_grad():
                next(iter(pl_module.parameters())).view(-1)[0] = float("nan")
            self.fired = 1


def _run(tmp_path, kind, faults, *, guard=None, max_steps=14, extra_callbacks=(), expect_raise=False):
    module = make_module(kind, faults)
    stack = full_stack(kind, tmp_path / "report", guard=guard)
    probe = StepProbe()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, save_last=True)
    trainer = make_trainer(
        tmp_path, [*stack, probe, ckpt, *extra_callbacks], max_steps=max_steps, enable_checkpointing=True
    )
    error = None
    if expect_raise:
        with pytest.raises(RuntimeError, match="persistent trouble") as info:
            trainer.fit(module, loader(kind))
        error = info.value
    else:
        trainer.fit(module, loader(kind))
    return module, stack, probe, trainer, error


def _guard_events(guard, kind):
    return [e.step for e in guard.event_log.events if e.kind == kind]


def _changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a["module"][k], b["module"][k]) for k in a["module"])


def _checkpoints_finite(tmp_path) -> tuple[int, bool]:
    files = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    return len(files), all(finite_checkpoint(f) for f in files)


def _report(tmp_path) -> dict:
    return json.loads((tmp_path / "report" / "stability_report.json").read_text())


def _adaptive_ok(adaptive) -> bool:
    return math.isfinite(adaptive.weight) and adaptive.min_weight <= adaptive.weight <= adaptive.max_weight


# ----------------------------------------------------------------------------------------------------------------------
# transient faults: each is skipped, and the skip is a true skip


@pytest.mark.parametrize("kind", ["codec", "cascade"])
def test_transient_faults_are_skipped_bit_identically_with_the_whole_stack(tmp_path, kind):
    faults = {"nan_batch": {3}, "inf_grad": {6}, "spike": {9}}
    module, stack, probe, trainer, _ = _run(tmp_path, kind, faults, guard={"zscore": 6.0, "zscore_warmup": 5})
    guard, adaptive, clamp, monitor, report = stack[:5]

    assert trainer.global_step == 14
    assert sorted(s for s, _ in module.injected) == [3, 6, 9]
    assert _guard_events(guard, "skip") == [3, 6, 9]
    causes = [e.data["cause"] for e in guard.event_log.events if e.kind == "skip"]
    assert causes[:2] == ["nonfinite", "nonfinite"]
    assert causes[2] in ("spike", "over_max")
    for s in (3, 6, 9):  # parameters, Adam moments and step counts, EMA codebooks: untouched by the faulted step
        assert_same(probe.snaps[s], probe.snaps[s + 1])
    assert _changed(probe.snaps[10], probe.snaps[11])  # healthy steps do train
    assert finite_module(module)
    # the adaptive weight rejected the NaN term, treated the x1000 term as a spike and stayed in bounds
    assert adaptive.num_rejected == 1
    assert adaptive.num_spikes >= 1
    assert _adaptive_ok(adaptive)
    n_ckpt, finite = _checkpoints_finite(tmp_path)
    assert n_ckpt == 8
    assert finite
    rep = _report(tmp_path)
    assert rep["status"] == "finished"
    assert rep["global_step"] == 14
    guard_view = next(v for v in rep["sources"].values() if v["callback"] == "GradientGuard")
    assert guard_view["num_events"]["skip"] == 3
    for fault, step in (("nan_batch", 3), ("inf_grad", 6), ("spike", 9)):
        record_fault("transient", kind, fault, "skip", 1, survived=finite and finite_module(module), step=step)


@pytest.mark.parametrize("kind", ["codec", "cascade"])
def test_skip_on_the_smaller_last_batch_of_an_epoch(tmp_path, kind):
    # 18 items in batches of 4: the fifth batch (step 4) has 2 items, so ClampedRMSScale replaces its `last_scale`
    # buffer with one of another shape; a skip there used to crash the guard's buffer restore (copy_ of [4, 1, 1]
    # storage into a [2, 1, 1] buffer), ending the run with a RuntimeError instead of skipping the step
    module = make_module(kind, {"nan_batch": {4}})
    stack = full_stack(kind, tmp_path / "report")
    probe = StepProbe()
    trainer = make_trainer(tmp_path, [*stack, probe], max_steps=7)
    trainer.fit(module, loader(kind, n=18))
    assert [e.step for e in stack[0].event_log.events if e.kind == "skip"] == [4]
    assert_same(probe.snaps[4], probe.snaps[5])  # the smaller batch's `last_scale` was put back, shape included
    assert trainer.global_step == 7
    record_fault("transient", kind, "nan_batch on a short batch", "skip", 1, survived=finite_module(module))
    assert finite_module(module)


# ----------------------------------------------------------------------------------------------------------------------
# a parameter overwritten with NaN: detected by the non-finite gradients that follow, rolled back


@pytest.mark.parametrize("kind", ["codec", pytest.param("cascade", marks=pytest.mark.slow)])
def test_nan_parameter_is_rolled_back_to_the_last_good_snapshot(tmp_path, kind):
    guard_kw = {"max_consecutive_skips": 3, "snapshot_every": 2}
    module, stack, probe, trainer, _ = _run(tmp_path, kind, {"nan_param": {7}}, guard=guard_kw)
    guard = stack[0]
    # the first non-finite step finds the weights themselves non-finite: no point in waiting for 3 skips
    assert _guard_events(guard, "skip") == [7]
    rollback = next(e for e in guard.event_log.events if e.kind == "rollback")
    assert rollback.step == 7
    assert rollback.data["to_step"] <= 7
    assert "non-finite parameters" in rollback.reason
    # the state after the rollback is the snapshot's (step 8 starts from it)
    assert_same(probe.snaps[rollback.data["to_step"]], probe.snaps[8])
    assert trainer.global_step == 14
    survived = finite_module(module) and _checkpoints_finite(tmp_path)[1]
    record_fault("nan_param", kind, "nan_param", "rollback", 1, survived=survived)
    assert survived


@pytest.mark.parametrize(
    ("kind", "action"),
    [("codec", "stop"), pytest.param("cascade", "stop", marks=pytest.mark.slow), ("cascade", "raise")],
)
def test_nan_parameter_with_stop_or_raise_keeps_the_last_good_checkpoint(tmp_path, kind, action):
    """Without a snapshot the guard cannot repair the weights; a clean stop would let ModelCheckpoint (here the
    default ``save_top_k=1``, which deletes the previous file) replace the last good checkpoint with NaN weights, so the
    guard raises at the first non-finite step instead."""
    module = make_module(kind, {"nan_param": {7}})
    stack = full_stack(kind, tmp_path / "report", guard={"on_persistent": action, "max_consecutive_skips": 3})
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True)
    trainer = make_trainer(tmp_path, [*stack, ckpt], max_steps=20, enable_checkpointing=True)
    with pytest.raises(RuntimeError, match="non-finite parameters"):
        trainer.fit(module, loader(kind))
    assert trainer.global_step == 7
    files = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert [f.name for f in files] == ["epoch=1-step=6.ckpt", "last.ckpt"]
    finite = all(finite_checkpoint(f) for f in files)
    assert json.loads((tmp_path / "report" / "stability_report.json").read_text())["status"] == "interrupted"
    record_fault("nan_param", kind, "nan_param", action, 1, survived=finite)
    assert finite


@pytest.mark.parametrize("kind", ["codec", pytest.param("cascade", marks=pytest.mark.slow)])
def test_nan_written_by_an_accepted_step_is_not_snapshotted(tmp_path, kind):
    # the NaN appears right after accepted step 5, just as the snapshot taken every 2 accepted steps falls due: the
    # guard must not save the corrupted state as "last good", or its rollback would restore the NaN
    guard_kw = {"max_consecutive_skips": 2, "snapshot_every": 2, "max_rollbacks": 2}
    module, stack, probe, trainer, _ = _run(tmp_path, kind, {}, guard=guard_kw, extra_callbacks=[WriteNaNAfterStep(5)])
    guard = stack[0]
    rollbacks = [e for e in guard.event_log.events if e.kind == "rollback"]
    survived = finite_module(module) and finite_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    record_fault("nan_param_after_step", kind, "nan_param", "rollback", 1, survived=survived)
    assert len(rollbacks) == 1, [(e.step, e.kind, e.reason) for e in guard.event_log.events]
    assert rollbacks[0].data["to_step"] <= 5
    # the snapshot that fell due right after the corrupting step was refused (it used to be taken, and every
    # rollback restored the NaN until `max_rollbacks` stopped the run with NaN weights)
    assert [e.step for e in guard.event_log.events if e.kind == "snapshot_refused"] == [6]
    assert trainer.global_step == 14
    assert survived


# ----------------------------------------------------------------------------------------------------------------------
# persistent faults: every step fails for 30 steps


PERSISTENT = set(range(4, 34))


@pytest.mark.parametrize("kind", [pytest.param("codec", marks=pytest.mark.slow), "cascade"])
def test_persistent_fault_rollback_skips_past_it(tmp_path, kind):
    # PaLM's recipe: roll back, then skip the batches that caused the trouble
    guard_kw = {"max_consecutive_skips": 5, "skip_batches_after_rollback": 26, "snapshot_every": 2}
    module, stack, probe, trainer, _ = _run(tmp_path, kind, {"nan_batch": PERSISTENT}, guard=guard_kw, max_steps=40)
    guard, adaptive = stack[0], stack[1]
    n_ckpt, finite = _checkpoints_finite(tmp_path)
    record_fault("persistent", kind, "nan_batch x30", "rollback", 30, survived=finite and finite_module(module))
    assert finite
    assert finite_module(module)
    assert _adaptive_ok(adaptive)
    assert guard.num_rollbacks == 1
    assert _guard_events(guard, "skip") == list(range(4, 35))  # 5 trouble steps, then 26 forced skips
    assert trainer.global_step == 40
    assert _changed(probe.snaps[35], probe.final)  # training resumed after the skipped batches
    assert adaptive.num_rejected == 30


@pytest.mark.parametrize("kind", ["codec", pytest.param("cascade", marks=pytest.mark.slow)])
def test_persistent_fault_stop_ends_the_run_cleanly(tmp_path, kind):
    guard_kw = {"max_consecutive_skips": 5, "on_persistent": "stop"}
    module, stack, probe, trainer, _ = _run(tmp_path, kind, {"inf_grad": PERSISTENT}, guard=guard_kw, max_steps=40)
    guard = stack[0]
    assert _guard_events(guard, "stop") == [8]
    assert trainer.global_step == 9
    assert trainer.should_stop
    assert_same(probe.snaps[4], probe.final)  # nothing the faulty steps did reached the weights
    n_ckpt, finite = _checkpoints_finite(tmp_path)
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
    assert _report(tmp_path)["status"] == "finished"
    record_fault("persistent", kind, "inf_grad x30", "stop", 5, survived=finite and finite_module(module))
    assert finite


@pytest.mark.parametrize("kind", [pytest.param("codec", marks=pytest.mark.slow), "cascade"])
def test_persistent_fault_raise_names_the_trouble_and_keeps_the_last_good_checkpoint(tmp_path, kind):
    guard_kw = {"max_consecutive_skips": 5, "on_persistent": "raise"}
    module, stack, probe, trainer, error = _run(
        tmp_path, kind, {"spike": PERSISTENT}, guard={**guard_kw, "max_norm": 1e3}, max_steps=40, expect_raise=True
    )
    assert "5 consecutive skipped steps" in str(error)
    assert trainer.global_step == 8
    n_ckpt, finite = _checkpoints_finite(tmp_path)
    assert n_ckpt >= 3
    assert finite
    rep = _report(tmp_path)
    assert rep["status"] == "interrupted"
    assert "persistent trouble" in rep["exception"]
    record_fault("persistent", kind, "spike x30", "raise", 5, survived=finite)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["codec", "cascade"])
def test_persistent_fault_skip_only_keeps_the_weights_through_30_bad_steps(tmp_path, kind):
    guard_kw = {"max_consecutive_skips": None}
    module, stack, probe, trainer, _ = _run(tmp_path, kind, {"nan_loss": PERSISTENT}, guard=guard_kw, max_steps=38)
    guard = stack[0]
    assert _guard_events(guard, "skip") == sorted(PERSISTENT)
    assert_same(probe.snaps[4], probe.snaps[34])
    assert trainer.global_step == 38
    assert finite_module(module)
    n_ckpt, finite = _checkpoints_finite(tmp_path)
    record_fault("persistent", kind, "nan_loss x30", "skip", 30, survived=finite and finite_module(module))
    assert finite
