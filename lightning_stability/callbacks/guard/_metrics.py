"""``GradientGuard``'s metrics: logged every ``log_every_n_steps`` steps, and present for monitors from the start.

The guard logs ``guard/*`` every ``log_every_n_steps`` optimizer steps (Lightning's default is 50). A monitor that
reads ``trainer.callback_metrics`` at the first validation (``ModelCheckpoint(monitor="guard/skipped")``,
``EarlyStopping(monitor="guard/grad_norm")``) would not find the key when that comes earlier, and Lightning raises
``MisconfigurationException``. So the latest values are also published to ``trainer.callback_metrics`` (not to the
loggers, whose series stay on the logging steps) when a validation starts, at the last batch of a training epoch and
at its end. Nothing is read from the device for that: the counters and norms are put there as they are (host numbers
in host mode; device tensors in sync-free mode, read by the monitor when it compares them, once per check).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_stability.callbacks._logging import _scalar, log_scalars
from lightning_stability.callbacks.guard._state import SLOT

if TYPE_CHECKING:
    from lightning_stability.callbacks.guard.gradient_guard import GradientGuard


def log_guard(guard: GradientGuard, trainer: pl.Trainer, norm: float, thr: float | None, moment: float | None) -> None:
    """Write the guard's metrics to the loggers and ``callback_metrics`` (counters read on the host)."""
    totals = [s.read_counters() for s in guard._opt_states.values()]
    metrics = {
        "guard/grad_norm": norm,
        "guard/skipped": float(sum(c.num_skipped for c in totals)),
        "guard/consecutive_skips": float(max(c.consecutive for c in totals)),
        "guard/rollbacks": float(guard.num_rollbacks),
        "guard/amp_overflows": float(sum(c.num_amp_overflows for c in totals)),
    }
    if guard._cfg.detects and guard.zscore_rebase_after is not None:
        metrics["guard/rebases"] = float(sum(c.num_rebased for c in totals))
    if moment is not None:
        metrics["guard/first_moment_norm"] = moment
    if guard._cfg.detects and thr is not None:
        metrics["guard/threshold"] = thr
    log_scalars(trainer, metrics)


def publish_latest(guard: GradientGuard, trainer: pl.Trainer) -> None:
    """Put the latest ``guard/*`` values into ``trainer.callback_metrics`` without a host read (see above)."""
    if trainer.sanity_checking or not guard._opt_states or guard.last_grad_norm is None:
        return
    states = list(guard._opt_states.values())
    device = next((s.counters_t.device for s in states if s.counters_t is not None), None)
    if device is None:  # host mode: every number is on the host already
        if guard._last_host is None:
            return
        totals = [s.host_counters() for s in states]
        counters = {
            "skipped": sum(c.num_skipped for c in totals),
            "consecutive_skips": max(c.consecutive for c in totals),
            "amp_overflows": sum(c.num_amp_overflows for c in totals),
            "rebases": sum(c.num_rebased for c in totals),
        }
        values: dict[str, Tensor] = {f"guard/{k}": _scalar(float(v)) for k, v in counters.items()}
        norm, thr, moment = guard._last_host
        values["guard/grad_norm"] = _scalar(norm)
        thr_t = None if thr is None else _scalar(thr)
        moment_t = None if moment is None else _scalar(moment)
    else:  # sync-free mode: sums of device tensors, nothing read back
        vectors = [s.counters_t if s.counters_t is not None else _host_vector(s, device) for s in states]
        stacked = torch.stack(vectors).to(torch.float32)
        values = {
            "guard/skipped": stacked[:, SLOT.num_skipped].sum(),
            "guard/consecutive_skips": stacked[:, SLOT.consecutive].max(),
            "guard/amp_overflows": stacked[:, SLOT.num_amp_overflows].sum(),
            "guard/rebases": stacked[:, SLOT.num_rebased].sum(),
        }
        values["guard/grad_norm"] = guard.last_grad_norm.detach().float()
        last = states[-1]
        thr_t = last.last_thr_t
        moment_t = last.moment_t
    values["guard/rollbacks"] = _scalar(float(guard.num_rollbacks))
    if not guard._cfg.detects or guard.zscore_rebase_after is None:
        values.pop("guard/rebases")
    if guard._cfg.detects and thr_t is not None:
        values["guard/threshold"] = thr_t
    if moment_t is not None:
        values["guard/first_moment_norm"] = moment_t
    published = trainer.callback_metrics
    for k, v in values.items():
        published[k] = v.detach().reshape(())


def _host_vector(st, device: torch.device) -> Tensor:
    return torch.tensor(st.host_counters(), dtype=torch.int64).to(device, non_blocking=True)
