"""Persistent trouble and rollback for ``GradientGuard``: what happens after a step was decided.

After every decision the guard counts the steps it accepted since its last rollback snapshot (a new one is due every
``snapshot_every``) and checks for persistent trouble: ``max_consecutive_skips`` guard skips or
``max_consecutive_amp_overflows`` fp16 overflows in a row, or a non-finite parameter / optimizer state. Then
``on_persistent`` acts: ``"rollback"`` restores the last :class:`TrainingSnapshot` (and the guard's running statistics
with it), skips this step and the next ``skip_batches_after_rollback`` batches; ``"stop"`` sets
``trainer.should_stop``; ``"raise"`` raises. A snapshot is only ever taken of a finite state, agreed across ranks.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_stability.callbacks._events import EventLog
from lightning_stability.callbacks.guard._manual import DeferredRestore
from lightning_stability.callbacks.guard._norm import all_finite, collect_grads
from lightning_stability.callbacks.guard._optim import StepSkipper, is_fused
from lightning_stability.callbacks.guard._policy import NormStats
from lightning_stability.callbacks.guard._state import OptimizerState, TrainingSnapshot, filled

#: ``GradientGuard``'s per-optimizer states, by optimizer index (owned by the guard, read and updated here)
States = dict[int, OptimizerState]


class Rollback:
    """Persistent trouble and rollback: the snapshot, the skip window after a rollback and their counts.

    The guard calls it after every decision (:meth:`after_decision`), at the start and end of every batch and in
    ``on_train_start``; it reads and updates the guard's per-optimizer states, which it is handed at each call.
    """

    def __init__(
        self,
        *,
        on_persistent: str,
        max_consecutive_skips: int | None,
        max_consecutive_amp_overflows: int | None,
        snapshot_every: int,
        snapshot_device: str,
        skip_batches_after_rollback: int,
        max_rollbacks: int,
        event_log: EventLog,
        skipper: StepSkipper,
    ) -> None:
        self.on_persistent = on_persistent
        self.max_consecutive_skips = max_consecutive_skips
        self.max_consecutive_amp_overflows = max_consecutive_amp_overflows
        self.snapshot_every = snapshot_every
        self.snapshot_device = snapshot_device
        self.skip_batches_after_rollback = skip_batches_after_rollback
        self.max_rollbacks = max_rollbacks
        self.event_log = event_log
        self.skipper = skipper
        self.snapshot: TrainingSnapshot | None = None
        self.num_rollbacks = 0
        self.skip_remaining = 0  # batches still to skip after the last rollback
        self.rolled_back_this_batch = False
        self.good_since_snapshot = 0  # accepted steps since the snapshot
        self.snapshot_due = False
        self.pending = False  # manual optimization: a rollback to finish at the end of the batch
        self.manual = False
        self.deferred: DeferredRestore | None = None

    @property
    def forced(self) -> bool:
        """Whether this step must be skipped: inside the window after a rollback, or a rollback is pending."""
        return self.skip_remaining > 0 or self.pending

    def reset(self) -> None:
        """A new fit (the same guard object used again): no rollbacks so far, no window, no snapshot due."""
        self.num_rollbacks = 0
        self.skip_remaining = 0
        self.rolled_back_this_batch = False
        self.pending = False
        self.good_since_snapshot = 0
        self.snapshot_due = False

    def state_dict(self) -> dict[str, int]:
        return {
            "num_rollbacks": self.num_rollbacks,
            "skip_remaining": self.skip_remaining,
            "good_since_snapshot": self.good_since_snapshot,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_rollbacks = int(state["num_rollbacks"])
        self.skip_remaining = int(state["skip_remaining"])
        self.good_since_snapshot = int(state["good_since_snapshot"])

    # ------------------------------------------------------------------------------------------------------------------
    # the training loop

    def train_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, states: States, deferred: DeferredRestore | None
    ) -> None:
        """``on_train_start``: the first snapshot is the state training starts from (resumed or not)."""
        self.manual = not pl_module.automatic_optimization
        self.deferred = deferred
        self.pending = False
        self.snapshot = None
        if self.on_persistent == "rollback":
            self.take_snapshot(trainer, pl_module, states)

    def batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, states: States) -> None:
        if self.snapshot_due:
            self.take_snapshot(trainer, pl_module, states)

    def batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, states: States) -> None:
        """Finish a rollback deferred to the end of the batch; count one batch of the skip window down."""
        if self.pending:
            self.finish(trainer, pl_module, states)
        if self.rolled_back_this_batch:
            self.rolled_back_this_batch = False
        elif self.skip_remaining > 0:
            self.skip_remaining -= 1

    def teardown(self) -> None:
        self.snapshot = None
        self.deferred = None

    # ------------------------------------------------------------------------------------------------------------------
    # after a decision

    def count_accepted(self, n: int) -> None:
        """``n`` more accepted steps: a snapshot is due every ``snapshot_every`` of them (with ``"rollback"``)."""
        if self.on_persistent != "rollback":
            return
        self.good_since_snapshot += n
        if self.good_since_snapshot >= self.snapshot_every:
            self.snapshot_due = True

    def after_decision(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        states: States,
        st: OptimizerState,
        accepted: bool,
        corrupted: bool = False,
    ) -> None:
        """After a step's decision: act on persistent trouble, or count an accepted step towards the next snapshot."""
        if self.check_persistent(trainer, pl_module, states, st, corrupted=corrupted):
            return
        if accepted:
            self.count_accepted(1)

    def check_persistent(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        states: States,
        st: OptimizerState,
        corrupted: bool = False,
    ) -> bool:
        """Act on persistent trouble; True when the current step must be skipped (rollback).

        ``corrupted`` (the parameters or the optimizer state are not finite) is persistent trouble at once: no skip
        can repair it. It is rolled back when a snapshot is available; otherwise the guard raises even with
        ``on_persistent="stop"``, because a clean stop would let checkpoint callbacks save the corrupted weights over
        the last good checkpoint."""
        too_many_skips = self.max_consecutive_skips is not None and st.consecutive >= self.max_consecutive_skips
        too_many_amp = (
            self.max_consecutive_amp_overflows is not None and st.consecutive_amp >= self.max_consecutive_amp_overflows
        )
        if not (too_many_skips or too_many_amp or corrupted):
            return False
        step = trainer.global_step
        if corrupted:
            what, cause = "non-finite parameters or optimizer state (skipping steps cannot repair them)", "corrupted"
        elif too_many_skips:
            what, cause = f"{st.consecutive} consecutive skipped steps", "consecutive_skips"
        else:
            what = f"{st.consecutive_amp} consecutive fp16 overflows (the loss scale is collapsing)"
            cause = "consecutive_amp_overflows"
        last = self.event_log.events[-1].to_dict() if self.event_log.events else {}
        diagnosis = f"GradientGuard: persistent trouble at step {step}: {what}. Last event: {last}"
        if self.on_persistent == "raise":
            self.event_log.add(step, "raise", what, cause=cause)
            raise RuntimeError(diagnosis)
        if self.on_persistent == "rollback" and self.num_rollbacks < self.max_rollbacks and self.snapshot is not None:
            self.rollback(trainer, pl_module, states, what, cause)
            return True
        if corrupted:
            self.event_log.add(step, "raise", what, cause=cause)
            raise RuntimeError(
                f"{diagnosis}. Not stopping cleanly (`on_persistent={self.on_persistent!r}`): the run would end with"
                " these weights and checkpoint callbacks would save them over the last good checkpoint. Resume from"
                " that checkpoint, or use `on_persistent='rollback'`."
            )
        reason = what if self.on_persistent == "stop" else f"{what}; `max_rollbacks={self.max_rollbacks}` reached"
        self.event_log.add(step, "stop", reason, cause=cause)
        rank_zero_warn(f"{diagnosis}. Stopping the run (`trainer.should_stop = True`).")
        trainer.should_stop = True
        st.reset_runs()
        return False

    def rollback(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, states: States, what: str, cause: str
    ) -> None:
        snap = self.snapshot
        assert snap is not None
        if self.manual:
            # manual optimization: a graph of this batch may still wait for its backward (see `guard._manual`); the
            # snapshot is restored at the end of the batch, and every optimizer step until then is skipped
            self.pending = True
        else:
            self.finish(trainer, pl_module, states)
        for st in states.values():
            st.reset_runs()
        for opt in trainer.optimizers:
            params, _ = collect_grads(opt)
            self.skipper.skip(opt, params, fused=is_fused(opt))
        self.num_rollbacks += 1
        self.skip_remaining = self.skip_batches_after_rollback
        self.rolled_back_this_batch = True
        self.good_since_snapshot = 0
        step = trainer.global_step
        self.event_log.add(
            step,
            "rollback",
            f"{what}: restored the snapshot of step {snap.step}",
            cause=cause,
            to_step=snap.step,
            rollbacks=self.num_rollbacks,
            skip_batches=self.skip_batches_after_rollback,
        )
        rank_zero_warn(
            f"GradientGuard: {what} at step {step}; rolled back to the snapshot of step {snap.step}"
            f" (rollback {self.num_rollbacks}/{self.max_rollbacks}), skipping the next"
            f" {self.skip_batches_after_rollback} batches."
        )

    def finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, states: States) -> None:
        """Restore the snapshot in place: the module, every optimizer and the guard's running statistics."""
        self.pending = False
        if self.deferred is not None:
            self.deferred.clear()  # the snapshot holds the buffers too
        assert self.snapshot is not None
        extra = self.snapshot.restore(pl_module, trainer.optimizers)
        for idx, saved in extra.items():
            st = states.setdefault(idx, OptimizerState())
            n = NormStats.SIZE
            st.stats = NormStats.from_list(saved[:n])
            st.mstats = NormStats.from_list(saved[n : 2 * n])
            st.lstats = NormStats.from_list(saved[2 * n : 3 * n])
            if st.stats_t is not None:
                st.stats_t = filled(st.stats.as_list(), torch.float32, st.stats_t.device)
                st.mstats_t = filled(st.mstats.as_list(), torch.float32, st.stats_t.device)
                st.lstats_t = filled(st.lstats.as_list(), torch.float32, st.stats_t.device)
        self.skipper.initialized.clear()  # the snapshot may predate the optimizers' first step

    def take_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, states: States) -> None:
        self.snapshot_due = False
        if not state_is_finite(trainer, pl_module):
            # never save a corrupted state as "last good": a NaN written by a step that looked healthy (an overflowing
            # update, a stray in-place write) would otherwise be restored by every later rollback
            self.good_since_snapshot = 0
            kept = "no snapshot yet" if self.snapshot is None else f"kept the snapshot of step {self.snapshot.step}"
            self.event_log.add(
                trainer.global_step,
                "snapshot_refused",
                f"non-finite parameters or optimizer state; {kept}",
                cause="nonfinite_state",
            )
            rank_zero_warn(
                f"GradientGuard: not taking a rollback snapshot at step {trainer.global_step}: the parameters or the"
                f" optimizer state are not finite ({kept})."
            )
            return
        extra = {}
        for idx, st in states.items():
            extra[idx] = st.stats_t.tolist() if st.stats_t is not None else st.stats.as_list()
            extra[idx] += st.mstats_t.tolist() if st.mstats_t is not None else st.mstats.as_list()
            extra[idx] += st.lstats_t.tolist() if st.lstats_t is not None else st.lstats.as_list()
        device = "cpu" if self.snapshot_device == "cpu" else None
        self.snapshot = TrainingSnapshot(trainer.global_step, pl_module, trainer.optimizers, device, extra)
        self.good_since_snapshot = 0


@torch.no_grad()
def state_is_finite(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Whether every parameter and every floating optimizer state tensor is finite, agreed across ranks (a
    weight corrupted on one rank only must not leave the ranks with snapshots of different steps)."""
    tensors = [p.detach() for p in pl_module.parameters()]
    for opt in trainer.optimizers:
        for state in opt.state.values():
            tensors += [v for v in state.values() if isinstance(v, Tensor) and v.is_floating_point()]
    # sharded: each rank checks its own shards (some may be empty), the flag is combined below
    finite = bool(all_finite(tensors))  # one host read per snapshot
    if trainer.world_size > 1:
        finite = bool(trainer.strategy.reduce_boolean_decision(finite, all=True))
    return finite
