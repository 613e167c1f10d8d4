"""A skipped optimizer step does not advance step-interval learning-rate schedulers (``GradientGuard``).

A skipped step is meant to be as if the batch never happened, but Lightning steps every ``interval="step"`` scheduler
after every optimizer step, taken or not (Lightning issues #5558, #16228, #21339: steps skipped by the AMP scaler).
After 3 skipped steps of a linear warm-up the rate would be the schedule's value at ``global_step`` instead of at the
steps actually taken.

In ``training_epoch_loop.advance`` Lightning calls ``update_lr_schedulers("step")`` right after the batch's optimizer
step and *before* ``on_train_batch_end``. So when the guard decides that a step is not taken (a guard skip or an fp16
overflow; ``on_before_optimizer_step``, before the scheduler moved), :class:`SchedulerHold` saves the ``state_dict``
of that optimizer's step-interval schedulers and the hyperparameters of its parameter groups (``lr``, and the momentum
or betas that ``OneCycleLR`` / ``CyclicLR`` move), and the guard's ``on_train_batch_end`` puts them back. Lightning
reorders checkpoint callbacks to the end of the list, so a checkpoint written at ``on_train_batch_end`` (or later, at
validation) holds the restored scheduler, and a resumed run continues the schedule where an uninterrupted one would.

Scope: automatic optimization only (in manual optimization Lightning does not step schedulers; yours to step).
Sync-free mode decides on the device, so the flag is read once per step at ``on_train_batch_end`` when an optimizer
has a step-interval scheduler (a cheap host read of one value, no per-step cost otherwise). An optimizer with both a
step-interval and an epoch-interval scheduler: a skip on the last batch of an epoch restores the group
hyperparameters after the epoch-interval scheduler moved them too (its own ``state_dict`` is untouched).
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor


def _step_schedulers(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> list[Any]:
    return [
        c.scheduler
        for c in trainer.lr_scheduler_configs
        if c.interval == "step" and not c.reduce_on_plateau and getattr(c.scheduler, "optimizer", None) is optimizer
    ]


def _group_values(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [
        {k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in g.items() if k != "params"}
        for g in optimizer.param_groups
    ]


class SchedulerHold:
    """Saved scheduler and parameter-group state of the optimizers whose step this batch is not taken."""

    def __init__(self) -> None:
        # id(optimizer) -> (optimizer, [(scheduler, state)], group values, flag: True or a 0-dim device tensor)
        self._saved: dict[int, tuple[torch.optim.Optimizer, list[tuple[Any, dict]], list[dict], bool | Tensor]] = {}

    def clear(self) -> None:
        self._saved.clear()

    def decided(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, skipper: Any, device_mode: bool) -> None:
        """The guard decided this optimizer's step (on the host, or on the device in sync-free mode, where the
        ``found_inf`` flag it set for the fused kernel says whether the step is taken)."""
        if not trainer.lr_scheduler_configs or not trainer.lightning_module.automatic_optimization:
            return
        not_taken: bool | Tensor = skipper.host_skipped.get(id(optimizer), False)
        if device_mode:
            flag = skipper._pending_found_inf.get(id(optimizer))
            not_taken = False if flag is None else flag > 0
        if not_taken is False:
            return
        schedulers = _step_schedulers(trainer, optimizer)
        if not schedulers:
            return
        states = [(s, copy.deepcopy(s.state_dict())) for s in schedulers]
        self._saved[id(optimizer)] = (optimizer, states, _group_values(optimizer), not_taken)

    def undo(self) -> int:
        """Put back the saved state of every optimizer whose step was not taken; returns how many were put back."""
        restored = 0
        saved, self._saved = self._saved, {}
        for optimizer, states, groups, flag in saved.values():
            if isinstance(flag, Tensor) and not bool(flag):  # sync-free mode: the step was taken after all
                continue
            for scheduler, state in states:
                scheduler.load_state_dict(state)
            for group, values in zip(optimizer.param_groups, groups):
                for k, v in values.items():
                    if isinstance(group.get(k), Tensor) and isinstance(v, Tensor):
                        group[k].copy_(v)
                    else:
                        group[k] = v
            restored += 1
        return restored
