"""Replay after a rollback: was it the batch or the state?

After ``GradientGuard`` restored its snapshot, it runs the batch of the step that triggered the rollback once more
from the restored state, the way Megatron's rerun machinery separates a bad batch from a bad state: the
LightningModule's ``training_step(batch, batch_idx)`` through the strategy (so under DDP the gradients are averaged
over ranks as in training, and every rank measures the same norm), ``loss.backward()``, then the gradient norm and the
loss are measured and judged by the guard's own rule from the restored statistics. If the trouble comes back (a
non-finite norm or loss, or a step the rule would not simply accept), the batch is the problem (``"data"``);
otherwise the state was (``"state"``: the learning rate, or the weights at that point).

The replay leaves no trace in training: the gradients the optimizer had before it are put back (``None`` after a
skip), every buffer of the module is restored (BatchNorm statistics the forward updated, non-persistent buffers too),
the random number generators are restored (a dropout mask drawn in the replay does not shift later ones), and
``self.log`` calls in ``training_step`` are dropped; the guard then restores its snapshot once more (a parameter that
``training_step`` changed in place). Other side effects of ``training_step`` (a torchmetrics ``update``, a list it
appends to) do happen. No replay with manual optimization (the step's backward passes and optimizer calls are the
user's), with sharded parameters, or when ``training_step`` returns no loss tensor: the event says why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_stability.callbacks.guard._norm import collect_grads, grad_norms
from lightning_stability.callbacks.guard._state import select_buffers


@dataclass
class Replayed:
    norm: float
    loss: float


def unavailable_reason(pl_module: pl.LightningModule, batch: Any, sharded: bool) -> str | None:
    """Why the batch cannot be replayed, or ``None`` when it can."""
    if not pl_module.automatic_optimization:
        return "manual optimization: the step's backward passes and optimizer calls belong to `training_step`"
    if sharded:
        return "sharded parameters (FSDP / DTensor): not replayed"
    if batch is None:
        return "the batch is not known (the rollback did not happen during a training batch)"
    return None


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def replay(
    trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, batch: Any, batch_idx: int
) -> Replayed | str:
    """Run ``training_step(batch, batch_idx)`` and its backward from the current state, measure the total gradient
    norm of ``optimizer`` and the loss (averaged over ranks), and undo every trace of it (see the module docstring).
    Returns the measurement, or a sentence saying why there is none."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    saved_grads = [p.grad for p in params]
    buffers = [(mod, attr, mod._buffers[attr].detach().clone()) for _, mod, attr in select_buffers(pl_module, True)]
    shadowed = {name: pl_module.__dict__[name] for name in ("log", "log_dict") if name in pl_module.__dict__}
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    try:
        for p in params:
            p.grad = None
        pl_module.log = _noop  # type: ignore[method-assign]
        pl_module.log_dict = _noop  # type: ignore[method-assign]
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            out = trainer.strategy.training_step(batch, batch_idx)
            loss = out.get("loss") if isinstance(out, Mapping) else out
            if not isinstance(loss, Tensor) or not loss.requires_grad:
                return "`training_step` returned no loss tensor that requires a gradient"
            loss.backward()
        _, grads = collect_grads(optimizer)
        norm = grad_norms(grads).total if grads else torch.zeros(())
        value = loss.detach().to(device=norm.device, dtype=torch.float32)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            value = value.clone()
            torch.distributed.all_reduce(value)  # the gradients are averaged by DDP's backward; the loss here
            value = value / trainer.world_size
        measured = torch.stack([norm.to(torch.float32), value]).tolist()
        return Replayed(norm=float(measured[0]), loss=float(measured[1]))
    except Exception as err:  # noqa: BLE001 - the replay explains; it must never end the run it explains
        return f"`training_step` raised {type(err).__name__}: {err}"
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
        with torch.no_grad():
            for mod, attr, saved in buffers:
                current = mod._buffers.get(attr)
                if current is not None and current.shape == saved.shape and current.dtype == saved.dtype:
                    current.copy_(saved)
                else:
                    mod._buffers[attr] = saved
        for name in ("log", "log_dict"):
            pl_module.__dict__.pop(name, None)
        pl_module.__dict__.update(shadowed)
