"""``GradientGuard`` as a package: the callback and the pieces it is made of.

- ``gradient_guard``: the callback (hooks, the per-step flow);
- ``_policy``: the pure decision rule (``evaluate``, its device twin, the running statistics);
- ``_norm``, ``_moments``: what is measured (gradient norms, the Adam first moment) and the diagnosis;
- ``_optim``, ``_manual``, ``_sched``: how a step is skipped (``p.grad = None`` or ``found_inf``), buffers restored in
  manual optimization, learning-rate schedulers held on a skipped step;
- ``_state``, ``_rollback``, ``_persist``: protected buffers, rollback snapshots and the rollback itself, checkpoints;
- ``_metrics``: the ``guard/*`` metrics; ``_checks``: the constructor's argument checks.

The package imports nothing at run time; ``GradientGuard`` is loaded on first use.
"""

from typing import TYPE_CHECKING

from lightning_stability._lazy import lazy_getattr

_NAMES = {"GradientGuard": ".gradient_guard"}
__all__ = list(_NAMES)
__getattr__ = lazy_getattr(__name__, _NAMES)

if TYPE_CHECKING:
    from lightning_stability.callbacks.guard.gradient_guard import GradientGuard as GradientGuard
