"""What ``GradientGuard`` writes to checkpoints (``state_dict``) and reads back, in every version it understands."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_stability.callbacks.guard._policy import NormStats
from lightning_stability.callbacks.guard._state import COUNTERS, OptimizerState

if TYPE_CHECKING:
    from lightning_stability.callbacks.guard.gradient_guard import GradientGuard

#: ``state_dict()["version"]``: 1 in 0.1.0 (no streak statistics, no ``num_rebased``; still loads), 2 until the
#: default spike rule (no loss statistics; still loads, the loss statistics warm up again), 3 until the quarantine
#: (still loads, with an empty quarantine), 4 since
_STATE_VERSION = 4
_STATS_KEYS = ("mean", "var", "count", "streak_mean", "streak_var", "streak_count")


def guard_state_dict(guard: GradientGuard) -> dict[str, Any]:
    """``GradientGuard.state_dict``: statistics and counters per optimizer, rollback and warning state, events."""
    optimizers = {}
    for idx, st in guard._opt_states.items():
        values = st.stats_t.tolist() if st.stats_t is not None else st.stats.as_list()
        stats = dict(zip(_STATS_KEYS, values))
        for key in ("count", "streak_count"):
            stats[key] = int(stats[key])
        optimizers[idx] = {"stats": stats, "counters": dict(zip(COUNTERS, st.read_counters()))}
        if guard._cfg_m is not None:
            values = st.mstats_t.tolist() if st.mstats_t is not None else st.mstats.as_list()
            optimizers[idx]["first_moment_stats"] = dict(zip(_STATS_KEYS, values))
        if guard._cfg.loss_zscore is not None:
            values = st.lstats_t.tolist() if st.lstats_t is not None else st.lstats.as_list()
            optimizers[idx]["loss_stats"] = dict(zip(_STATS_KEYS, values))
    state = {
        "version": _STATE_VERSION,
        "optimizers": optimizers,
        **guard._rollback.state_dict(),  # num_rollbacks, skip_remaining, good_since_snapshot
        **guard._quarantine.state_dict(),  # quarantine, quarantine_streak: [[epoch, batch_idx], ...]
        "last_warn_step": guard._last_warn_step,
        "event_log": guard.event_log.state_dict(),
    }
    if guard._warned_reasons:  # the kinds of skip announced so far: a resumed run announces only new ones
        state["warned_kinds"] = sorted(guard._warned_reasons)
    return state


def load_guard_state(guard: GradientGuard, state_dict: dict[str, Any]) -> None:
    """``GradientGuard.load_state_dict`` (versions 1 to 4). The checkpoint's quarantined batches are added to those the
    guard holds (see ``guard._quarantine``)."""
    version = state_dict.get("version")
    if version not in (1, 2, 3, _STATE_VERSION):
        raise ValueError(
            f"`GradientGuard` state has version {version!r}; this release reads versions 1 (0.1.0), 2 (no loss"
            f" statistics), 3 (no quarantine) and {_STATE_VERSION}. Was the checkpoint written by a newer"
            " lightning_stability?"
        )
    guard._opt_states = {}
    for idx, saved in state_dict["optimizers"].items():
        st = OptimizerState()
        s = saved["stats"]
        # version 1 has no streak and no rebase counter: an empty streak, no rebases so far
        st.stats = NormStats.from_list([s.get(k, 0.0) for k in _STATS_KEYS])
        for name in COUNTERS:
            setattr(st, name, int(saved["counters"].get(name, 0)))
        if "first_moment_stats" in saved:
            st.mstats = NormStats.from_list([saved["first_moment_stats"][k] for k in _STATS_KEYS])
        if "loss_stats" in saved:
            st.lstats = NormStats.from_list([saved["loss_stats"][k] for k in _STATS_KEYS])
        guard._opt_states[int(idx)] = st
    guard._rollback.load_state_dict(state_dict)
    guard._quarantine.load_state_dict(state_dict)  # versions 1-3: no positions, an empty streak
    guard._last_warn_step = state_dict["last_warn_step"]
    guard._warned_reasons = {int(k) for k in state_dict.get("warned_kinds", ())}
    guard.event_log.load_state_dict(state_dict["event_log"])
