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
from typing import Any

import lightning.pytorch as pl


def begin_fit(callback: Any, pl_module: pl.LightningModule) -> bool | None:
    """``None`` at the first fit of ``callback``; at a later one, whether it trains the same module object."""
    previous = callback.__dict__.get("_fit_module")
    callback._fit_module = weakref.ref(pl_module)
    if previous is None:
        return None
    return previous() is pl_module
