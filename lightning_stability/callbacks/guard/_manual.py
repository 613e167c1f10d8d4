"""Manual optimization for ``GradientGuard``: what one optimizer owns, and restores deferred to the end of the batch.

With several optimizers (a GAN: generator and discriminator), a skip of one optimizer must leave the others' work
alone. Each protected buffer belongs to the optimizers that update the parameters of the nearest module around it that
holds any optimized parameter: a BatchNorm's statistics belong to the optimizer of its affine weights; a non-affine
BatchNorm's to the optimizer(s) of the network it sits in; a buffer of a module whose parameters no optimizer updates
(a frozen backbone) to those of the nearest enclosing module that has optimized parameters. A skip restores only the
buffers of the skipped optimizer.

The restore waits for the end of the batch. In manual optimization the guard decides inside ``training_step``, and a
graph built earlier in the same batch may still be waiting for its backward: Lightning's GAN example runs the
generator forward once, steps the discriminator, then back-propagates the generator's loss through the same graph.
BatchNorm saves its running statistics for backward (``native_batch_norm``'s derivative takes them), so copying the
old values back in place at the discriminator's skip fails the generator's backward with "one of the variables needed
for gradient computation has been modified by an inplace operation". At the end of the batch every backward of the
batch has run; restoring there also undoes the skipped network's buffer updates of later forwards in the same batch
(the discriminator's forward for the generator loss), so the skipped network leaves the batch exactly as it entered
it. A rollback in manual optimization waits for the end of the batch for the same reason.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_stability.callbacks.guard._state import BufferSnapshot


def buffer_owners(
    module: nn.Module, buffer_names: Sequence[str], optimizers: Sequence[torch.optim.Optimizer]
) -> list[frozenset[int]]:
    """For each buffer (qualified name), the indices of the optimizers that own it (see the module docstring)."""
    owner_of = {id(p): i for i, opt in enumerate(optimizers) for g in opt.param_groups for p in g["params"]}
    # the optimizers of the parameters under each module path ("" is the root)
    under: dict[str, set[int]] = {}
    for name, p in module.named_parameters():
        idx = owner_of.get(id(p))
        if idx is None:
            continue
        path = name.split(".")[:-1]
        for depth in range(len(path) + 1):
            under.setdefault(".".join(path[:depth]), set()).add(idx)
    everyone = frozenset(range(len(optimizers)))
    owners = []
    for name in buffer_names:
        path = name.split(".")[:-1]
        found: frozenset[int] = everyone
        for depth in range(len(path), -1, -1):
            chosen = under.get(".".join(path[:depth]))
            if chosen:
                found = frozenset(chosen)
                break
        owners.append(found)
    return owners


class DeferredRestore:
    """Buffer restores of the skipped optimizers, collected during a batch and applied at its end."""

    def __init__(self, owners: list[frozenset[int]]) -> None:
        self._groups: dict[frozenset[int], list[int]] = {}
        for i, own in enumerate(owners):
            self._groups.setdefault(own, []).append(i)
        self._pending: dict[int, bool | Tensor] = {}

    def add(self, optimizer_idx: int, flag: bool | Tensor) -> None:
        """Optimizer ``optimizer_idx`` skipped its step (``True``), or did where the 0-dim bool tensor ``flag`` is
        true (sync-free mode, decided on the device)."""
        old = self._pending.get(optimizer_idx, False)
        if flag is True or old is True:
            self._pending[optimizer_idx] = True
        elif isinstance(flag, Tensor):
            self._pending[optimizer_idx] = flag if old is False else old | flag

    def clear(self) -> None:
        self._pending.clear()

    def apply(self, buffers: BufferSnapshot) -> None:
        """Restore the buffers of every optimizer that skipped during this batch (then forget them)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        for own, indices in self._groups.items():
            flags = [pending[i] for i in own if i in pending]
            if not flags:
                continue
            if any(f is True for f in flags):
                buffers.restore(indices)
                continue
            flag = flags[0]
            for f in flags[1:]:
                flag = flag | f
            buffers.restore_where(flag, indices)


def restore_buffers(
    buffers: BufferSnapshot | None, deferred: DeferredRestore | None, optimizer_idx: int, flag: bool | Tensor
) -> None:
    """A step of optimizer ``optimizer_idx`` is not taken (``flag``: ``True``, or a device flag in sync-free mode):
    restore the protected ``buffers`` now (automatic optimization, one optimizer, called after the backward) or those
    the optimizer owns at the end of the batch (manual optimization: ``deferred``). ``buffers`` is ``None`` when
    nothing is protected or no copy was taken for this step."""
    if buffers is None:
        return
    if deferred is not None:
        deferred.add(optimizer_idx, flag)
    elif flag is True:
        buffers.restore()
    else:
        buffers.restore_where(flag)


def plain_name(name: str) -> str:
    """A parameter name without the ``_orig_mod.`` that ``torch.compile`` inserts (``net._orig_mod.0.weight`` ->
    ``net.0.weight``), so a diagnosis names the parameter as the user's module does."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")
