"""``lightning_stability.callbacks.gradient_guard``: the import path of ``GradientGuard`` before it became the
``callbacks.guard`` package; kept so that existing imports (and checkpoints naming the class) keep working."""

from lightning_stability.callbacks.guard.gradient_guard import GradientGuard

__all__ = ["GradientGuard"]
