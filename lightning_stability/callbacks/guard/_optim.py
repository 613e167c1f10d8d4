"""How ``GradientGuard`` skips an optimizer step, and what it reads from the optimizer and the ``GradScaler``.

A non-fused torch optimizer is skipped from the host: every gradient set to ``None``. A fused one
(``_step_supports_amp_scaling``: fused Adam/AdamW/SGD) is skipped on the device through its ``found_inf`` tensor, the
mechanism ``GradScaler`` uses: :class:`StepSkipper` sets that flag, ORs it into the scaler's own from a step
pre-hook (never replacing it), removes it after the step, and drops the state the kernel initialised for new
parameters on a skipped first step. Its bookkeeping is keyed by ``id(optimizer)`` and cleared at ``teardown``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """Optimizers that accept ``found_inf`` / ``grad_scale`` tensors and skip on the device (fused Adam/AdamW/SGD)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def optimizer_index(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> int:
    for i, opt in enumerate(trainer.optimizers):
        if opt is optimizer:
            return i
    return 0


def active_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The precision plugin's ``GradScaler`` when it is enabled (fp16 AMP), else ``None``."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    return scaler


def scaler_state(scaler: torch.amp.GradScaler | None, optimizer: torch.optim.Optimizer) -> dict | None:
    """The scaler's overflow flag for this optimizer (after ``unscale_``), or ``stage_ready`` when the gradients
    are still scaled (fused optimizers: Lightning leaves unscaling to the kernel)."""
    if scaler is None:
        return None
    state = scaler._per_optimizer_states.get(id(optimizer)) if hasattr(scaler, "_per_optimizer_states") else None
    found = state.get("found_inf_per_device") if state else None
    if found:
        return {"found_inf": sum(v.to(next(iter(found.values())).device) for v in found.values())}
    return {"stage_ready": is_fused(optimizer)}


class StepSkipper:
    """Skips optimizer steps for ``GradientGuard``: ``p.grad = None``, or ``found_inf`` for a fused optimizer.

    Per ``id(optimizer)``: the step hooks installed, the ``found_inf`` flag set for this step (and whether this object
    or the scaler owns the attribute), the parameters without state before a fused optimizer's first step, the
    optimizers whose every parameter has state (``initialized``), and whether the host decided to skip this step
    (``host_skipped``, written by the guard).
    """

    def __init__(self) -> None:
        self.host_skipped: dict[int, bool] = {}
        self.initialized: set[int] = set()
        self._pending_found_inf: dict[int, Tensor] = {}
        self._we_set_found_inf: dict[int, bool] = {}
        self._fresh: dict[int, list[Tensor]] = {}
        self._hook_handles: list[Any] = []
        self._hooked: set[int] = set()

    def clear(self) -> None:
        """Remove the hooks and forget every optimizer (a later fit may create new ones at the same addresses)."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        for per_optimizer in (self._hooked, self.initialized, self._fresh, self._pending_found_inf):
            per_optimizer.clear()
        self._we_set_found_inf.clear()
        self.host_skipped.clear()

    def skip(self, optimizer: torch.optim.Optimizer, params: list[Tensor], fused: bool) -> None:
        if fused:  # the kernel skips on the device; p.grad = None would break GradScaler.update() (no inf checks)
            device = params[0].device if params else torch.device("cpu")
            self.set_found_inf(optimizer, torch.ones((), dtype=torch.float32, device=device))
        else:
            for p in params:
                p.grad = None

    def install_hooks(self, optimizer: torch.optim.Optimizer) -> None:
        if id(optimizer) in self._hooked:
            return
        self._hooked.add(id(optimizer))
        self._hook_handles.append(optimizer.register_step_pre_hook(self._pre_step))
        self._hook_handles.append(optimizer.register_step_post_hook(self._post_step))

    def set_found_inf(self, optimizer: torch.optim.Optimizer, flag: Tensor) -> None:
        """Skip a fused optimizer's step on the device when ``flag`` (0-dim float32) is 1.

        Without a GradScaler the hook runs inside ``optimizer.step(closure)``, after the step pre-hooks: the flag is set
        here. With fp16 AMP, ``GradScaler.step`` sets its own ``found_inf`` after this hook: the pre-hook then ORs ours
        into it.
        """
        key = id(optimizer)
        existing = getattr(optimizer, "found_inf", None)
        if existing is not None and existing is not self._pending_found_inf.get(key):
            optimizer.found_inf = torch.maximum(existing, flag.to(existing.device, existing.dtype))
        else:
            optimizer.found_inf = flag
        self._pending_found_inf[key] = optimizer.found_inf
        self._we_set_found_inf[key] = True
        if key not in self.initialized:
            self._fresh[key] = [p for g in optimizer.param_groups for p in g["params"] if not optimizer.state.get(p)]

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        key = id(optimizer)
        ours = self._pending_found_inf.get(key)
        if ours is None:
            return
        existing = getattr(optimizer, "found_inf", None)
        if existing is not None and existing is not ours:  # GradScaler replaced the flag: OR them, never clobber
            optimizer.found_inf = torch.maximum(existing, ours.to(existing.device, existing.dtype))
            self._we_set_found_inf[key] = False  # the scaler deletes the attribute after the step

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        key = id(optimizer)
        if self._pending_found_inf.pop(key, None) is None:
            return
        if self._we_set_found_inf.pop(key, False) and hasattr(optimizer, "found_inf"):
            del optimizer.found_inf
        fresh = self._fresh.pop(key, [])
        if fresh and self.host_skipped.get(key, False):
            # a fused kernel initialises the state of new parameters even when found_inf skips the step (and torch's
            # fused SGD leaves its momentum buffer uninitialised, `empty_like`): drop it, as if the step never ran
            for p in fresh:
                optimizer.state.pop(p, None)
        elif not fresh:
            self.initialized.add(key)

    def has_fresh_params(self, optimizer: torch.optim.Optimizer) -> bool:
        """True until every parameter has optimizer state (the first step of a fused optimizer is decided on the host,
        so that a skipped first step can drop the state the kernel initialised)."""
        key = id(optimizer)
        if key in self.initialized:
            return False
        if all(optimizer.state.get(p) for g in optimizer.param_groups for p in g["params"]):
            self.initialized.add(key)
            return False
        return True
