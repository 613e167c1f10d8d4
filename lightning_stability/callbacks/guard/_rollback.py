"""Persistent trouble and rollback for ``GradientGuard``: what happens after a step was decided.

After every decision the guard counts the steps it accepted since its last rollback snapshot (a new one is due every
``snapshot_every``) and checks for persistent trouble: ``max_consecutive_skips`` guard skips or
``max_consecutive_amp_overflows`` fp16 overflows in a row, or a non-finite parameter / optimizer state. Then
``on_persistent`` acts: ``"rollback"`` restores the last :class:`TrainingSnapshot` (and the guard's running statistics
with it), skips this step and the next ``skip_batches_after_rollback`` batches; ``"stop"`` sets
``trainer.should_stop``; ``"raise"`` raises. A snapshot is only ever taken of a finite state, agreed across ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_stability.callbacks.guard._norm import all_finite, collect_grads
from lightning_stability.callbacks.guard._optim import is_fused
from lightning_stability.callbacks.guard._policy import NormStats
from lightning_stability.callbacks.guard._state import OptimizerState, TrainingSnapshot, filled

if TYPE_CHECKING:
    from lightning_stability.callbacks.guard.gradient_guard import GradientGuard


def after_decision(
    guard: GradientGuard, trainer, pl_module, st: OptimizerState, accepted: bool, corrupted: bool = False
) -> None:
    """After a step's decision: act on persistent trouble, or count an accepted step towards the next snapshot."""
    if check_persistent(guard, trainer, pl_module, st, corrupted=corrupted):
        return
    if accepted and guard.on_persistent == "rollback":
        guard._good_since_snapshot += 1
        if guard._good_since_snapshot >= guard.snapshot_every:
            guard._snapshot_due = True


def check_persistent(guard: GradientGuard, trainer, pl_module, st: OptimizerState, corrupted: bool = False) -> bool:
    """Act on persistent trouble; True when the current step must be skipped (rollback).

    ``corrupted`` (the parameters or the optimizer state are not finite) is persistent trouble at once: no skip
    can repair it. It is rolled back when a snapshot is available; otherwise the guard raises even with
    ``on_persistent="stop"``, because a clean stop would let checkpoint callbacks save the corrupted weights over
    the last good checkpoint."""
    too_many_skips = guard.max_consecutive_skips is not None and st.consecutive >= guard.max_consecutive_skips
    too_many_amp = (
        guard.max_consecutive_amp_overflows is not None and st.consecutive_amp >= guard.max_consecutive_amp_overflows
    )
    if not (too_many_skips or too_many_amp or corrupted):
        return False
    step = trainer.global_step
    if corrupted:
        what = "non-finite parameters or optimizer state (skipping steps cannot repair them)"
    elif too_many_skips:
        what = f"{st.consecutive} consecutive skipped steps"
    else:
        what = f"{st.consecutive_amp} consecutive fp16 overflows (the loss scale is collapsing)"
    last = guard.event_log.events[-1].to_dict() if guard.event_log.events else {}
    diagnosis = f"GradientGuard: persistent trouble at step {step}: {what}. Last event: {last}"
    if guard.on_persistent == "raise":
        guard.event_log.add(step, "raise", what)
        raise RuntimeError(diagnosis)
    if guard.on_persistent == "rollback" and guard.num_rollbacks < guard.max_rollbacks and guard._snapshot is not None:
        rollback(guard, trainer, pl_module, what)
        return True
    if corrupted:
        guard.event_log.add(step, "raise", what)
        raise RuntimeError(
            f"{diagnosis}. Not stopping cleanly (`on_persistent={guard.on_persistent!r}`): the run would end with"
            " these weights and checkpoint callbacks would save them over the last good checkpoint. Resume from"
            " that checkpoint, or use `on_persistent='rollback'`."
        )
    reason = what if guard.on_persistent == "stop" else f"{what}; `max_rollbacks={guard.max_rollbacks}` reached"
    guard.event_log.add(step, "stop", reason)
    rank_zero_warn(f"{diagnosis}. Stopping the run (`trainer.should_stop = True`).")
    trainer.should_stop = True
    st.consecutive = 0
    st.consecutive_amp = 0
    if st.counters_t is not None:
        st.counters_t[3:5] = 0
    return False


def rollback(guard: GradientGuard, trainer, pl_module, what: str) -> None:
    snap = guard._snapshot
    assert snap is not None
    if guard._manual:
        # manual optimization: a graph of this batch may still wait for its backward (see `guard._manual`); the
        # snapshot is restored at the end of the batch, and every optimizer step until then is skipped
        guard._rollback_pending = True
    else:
        finish_rollback(guard, trainer, pl_module)
    for st in guard._opt_states.values():
        st.consecutive = 0
        st.consecutive_amp = 0
        if st.counters_t is not None:
            st.counters_t[3:5] = 0
    for opt in trainer.optimizers:
        params, _ = collect_grads(opt)
        guard._skipper.skip(opt, params, fused=is_fused(opt))
    guard.num_rollbacks += 1
    guard._skip_remaining = guard.skip_batches_after_rollback
    guard._rolled_back_this_batch = True
    guard._good_since_snapshot = 0
    step = trainer.global_step
    guard.event_log.add(
        step,
        "rollback",
        f"{what}: restored the snapshot of step {snap.step}",
        to_step=snap.step,
        rollbacks=guard.num_rollbacks,
        skip_batches=guard.skip_batches_after_rollback,
    )
    rank_zero_warn(
        f"GradientGuard: {what} at step {step}; rolled back to the snapshot of step {snap.step}"
        f" (rollback {guard.num_rollbacks}/{guard.max_rollbacks}), skipping the next"
        f" {guard.skip_batches_after_rollback} batches."
    )


def finish_rollback(guard: GradientGuard, trainer, pl_module) -> None:
    """Restore the rollback snapshot in place: the module, every optimizer and the guard's running statistics."""
    guard._rollback_pending = False
    if guard._deferred is not None:
        guard._deferred.clear()  # the snapshot holds the buffers too
    extra = guard._snapshot.restore(pl_module, trainer.optimizers)
    for idx, saved in extra.items():
        st = guard._opt_states.setdefault(idx, OptimizerState())
        n = NormStats.SIZE
        st.stats = NormStats.from_list(saved[:n])
        st.mstats = NormStats.from_list(saved[n : 2 * n])
        st.lstats = NormStats.from_list(saved[2 * n : 3 * n])
        if st.stats_t is not None:
            st.stats_t = filled(st.stats.as_list(), torch.float32, st.stats_t.device)
            st.mstats_t = filled(st.mstats.as_list(), torch.float32, st.stats_t.device)
            st.lstats_t = filled(st.lstats.as_list(), torch.float32, st.stats_t.device)
    guard._skipper.initialized.clear()  # the snapshot may predate the optimizers' first step


def take_snapshot(guard: GradientGuard, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    guard._snapshot_due = False
    if not state_is_finite(trainer, pl_module):
        # never save a corrupted state as "last good": a NaN written by a step that looked healthy (an overflowing
        # update, a stray in-place write) would otherwise be restored by every later rollback
        guard._good_since_snapshot = 0
        kept = "no snapshot yet" if guard._snapshot is None else f"kept the snapshot of step {guard._snapshot.step}"
        guard.event_log.add(
            trainer.global_step, "snapshot_refused", f"non-finite parameters or optimizer state; {kept}"
        )
        rank_zero_warn(
            f"GradientGuard: not taking a rollback snapshot at step {trainer.global_step}: the parameters or the"
            f" optimizer state are not finite ({kept})."
        )
        return
    extra = {}
    for idx, st in guard._opt_states.items():
        extra[idx] = st.stats_t.tolist() if st.stats_t is not None else st.stats.as_list()
        extra[idx] += st.mstats_t.tolist() if st.mstats_t is not None else st.mstats.as_list()
        extra[idx] += st.lstats_t.tolist() if st.lstats_t is not None else st.lstats.as_list()
    device = "cpu" if guard.snapshot_device == "cpu" else None
    guard._snapshot = TrainingSnapshot(trainer.global_step, pl_module, trainer.optimizers, device, extra)
    guard._snapshot_due = False
    guard._good_since_snapshot = 0


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
