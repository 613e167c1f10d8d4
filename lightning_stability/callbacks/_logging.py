"""Scalar logging from a callback without ``LightningModule.log``.

``LightningModule.log`` called from a callback hook costs about 1.5 ms per key on a CPU (Lightning's result
collection moves its whole contents to the module's device on every call), which is most of a guard's per-step budget
even at one log every 50 steps. Like Lightning's own ``LearningRateMonitor``, these callbacks write to the trainer's
loggers directly, at the step Lightning's logger connector uses, and also publish the values in
``trainer.callback_metrics`` so ``ModelCheckpoint(monitor=...)``, ``EarlyStopping`` and ``StabilityReport`` see them.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
import torch
from torch import Tensor


def logger_step(trainer: pl.Trainer) -> int:
    """The step Lightning's logger connector and ``LearningRateMonitor`` log at (monotonic for W&B)."""
    return getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float | Tensor], step: int | None = None) -> None:
    """Write ``metrics`` (Python numbers or 0-dim tensors) to every logger and into ``trainer.callback_metrics``.

    ``step`` is the logger step (default: ``logger_step(trainer)``). Loggers write on global rank zero only
    (Lightning's loggers are ``rank_zero_only``); every rank gets the ``callback_metrics`` entries, so a monitor that
    reads them decides alike on every rank when the values agree. Every callback logs its scalars through here, so
    each of them can be monitored like a ``LightningModule.log`` value.
    """
    if not metrics:
        return
    host = {k: float(v) for k, v in metrics.items()}
    if trainer.loggers:
        step = logger_step(trainer) if step is None else step
        for logger in trainer.loggers:
            logger.log_metrics(host, step=step)
    published = trainer.callback_metrics
    for k, v in metrics.items():
        published[k] = v.detach().reshape(()) if isinstance(v, Tensor) else _scalar(host[k])


def _scalar(value: float) -> Tensor:
    """``torch.tensor(value)`` (0-dim, default dtype, CPU) through ``torch.scalar_tensor``, about a third of the cost
    per call; a value outside the default dtype's range becomes ``inf`` as with ``torch.tensor``."""
    try:
        return torch.scalar_tensor(value)
    except RuntimeError:  # "value cannot be converted to type float without overflow"
        return torch.tensor(value)
