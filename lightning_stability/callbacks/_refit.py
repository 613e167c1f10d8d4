"""One fit, one report: what a callback object keeps when it is used in a second ``trainer.fit`` (a notebook habit).

Every callback calls :func:`begin_fit` in ``setup("fit")``, which Lightning runs *before* it restores a checkpoint:
from the second fit of the same object on, the callback forgets what described the earlier fit (counters, events,
traces, the report's loss trace, rollback counts, warning state), so its numbers and the report describe the fit they
belong to; a fit resumed from a checkpoint then loads the checkpoint's state over that, as before.

What carries over is one documented choice per callback, and only when the second fit trains the same
``LightningModule`` object (it keeps training from the weights the first fit left): ``GradientGuard`` keeps its learned
gradient-norm statistics (the scale of this model's gradients; no second warm-up), ``AdaptiveLossWeight`` keeps its
weight and loss averages (the weight the module trains with). A different module starts from nothing.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl

from lightning_stability.callbacks.guard._policy import NormStats
from lightning_stability.callbacks.guard._state import OptimizerState

if TYPE_CHECKING:
    from lightning_stability.callbacks.guard.gradient_guard import GradientGuard


def begin_fit(callback: Any, pl_module: pl.LightningModule) -> bool | None:
    """``None`` at the first fit of ``callback``; at a later one, whether it trains the same module object."""
    previous = callback.__dict__.get("_fit_module")
    callback._fit_module = weakref.ref(pl_module)
    if previous is None:
        return None
    return previous() is pl_module


def reset_guard(guard: GradientGuard, keep_statistics: bool) -> None:
    """A new fit: fresh counters, events and rollback state; the running statistics kept when ``keep_statistics``."""
    states = {}
    for idx, old in guard._opt_states.items():
        st = OptimizerState()
        if keep_statistics:
            st.stats = NormStats.from_list(old.stats_t.tolist()) if old.stats_t is not None else old.stats
            st.mstats = NormStats.from_list(old.mstats_t.tolist()) if old.mstats_t is not None else old.mstats
        states[idx] = st
    guard._opt_states = states
    guard.event_log.reset()
    guard.num_rollbacks = 0
    guard.last_grad_norm = None
    guard._last_host = None
    guard._skip_remaining = 0
    guard._rolled_back_this_batch = False
    guard._rollback_pending = False
    guard._good_since_snapshot = 0
    guard._snapshot_due = False
    guard._last_warn_step = None
    guard._warned_reasons = set()
    guard._last_read.clear()
