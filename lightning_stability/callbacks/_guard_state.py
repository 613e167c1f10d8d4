"""State that ``GradientGuard`` copies and restores: protected buffers (every step) and rollback snapshots.

``BufferSnapshot`` keeps one preallocated copy of the selected module buffers. ``capture()`` copies the buffers into
it with one ``torch._foreach_copy_`` per (device, dtype) group; ``restore()`` copies them back; ``restore_where(flag)``
does the same on the device with ``torch.where`` (no host sync). Buffers are looked up by name at every call, so a
module that *replaces* a buffer (``self.buf = new``) instead of updating it in place is still handled, and storage is
reallocated only when a buffer changes shape, dtype or device. Cost: one copy of the protected buffers per optimizer
step and memory equal to their size; parameters are never touched.

``TrainingSnapshot`` is a deep copy of the LightningModule's ``state_dict`` and every optimizer's ``state_dict``
(memory: parameters + buffers + optimizer state, e.g. 3x the parameters for Adam), restored in place.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

BufferSelector = bool | str | Sequence[str] | Callable[[str, Tensor], bool]


def select_buffers(module: nn.Module, selector: BufferSelector) -> list[tuple[str, nn.Module, str]]:
    """``(qualified name, owner module, attribute)`` of every buffer chosen by ``selector``.

    ``True``: every buffer (floating point and integer, e.g. BatchNorm's ``num_batches_tracked``, so a skipped step
    is bit-identical); ``False``: none; a glob pattern or a sequence of them (``fnmatch`` on the qualified name); a
    callable ``(name, buffer) -> bool``.
    """
    if selector is False:
        return []
    if isinstance(selector, str):
        selector = [selector]
    chosen = []
    for mod_name, mod in module.named_modules(remove_duplicate=True):
        for attr, buf in mod.named_buffers(prefix="", recurse=False):
            if buf is None:
                continue
            name = f"{mod_name}.{attr}" if mod_name else attr
            if selector is True:
                keep = True
            elif callable(selector):
                keep = bool(selector(name, buf))
            else:
                keep = any(fnmatch.fnmatchcase(name, pat) for pat in selector)
            if keep:
                chosen.append((name, mod, attr))
    return chosen


class BufferSnapshot:
    def __init__(self, entries: list[tuple[str, nn.Module, str]]) -> None:
        self.names = [name for name, _, _ in entries]
        self._entries = [(mod, attr) for _, mod, attr in entries]
        self._storage: list[Tensor | None] = [None] * len(entries)
        # the buffer objects of the last capture: most modules update buffers in place, so their snapshot storage is
        # reused without comparing shapes (``resize_`` of a registered buffer is not supported)
        self._seen: list[Tensor | None] = [None] * len(entries)
        self._groups: list[list[int]] = []

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._storage if t is not None)

    def _current(self) -> list[Tensor]:
        return [getattr(mod, attr) for mod, attr in self._entries]

    @torch.no_grad()
    def capture(self) -> None:
        current = self._current()
        regroup = False
        seen = self._seen
        for i, buf in enumerate(current):
            if buf is seen[i]:  # the tensor captured last time: its storage still fits
                continue
            seen[i] = buf
            snap = self._storage[i]
            if snap is None or snap.shape != buf.shape or snap.dtype != buf.dtype or snap.device != buf.device:
                self._storage[i] = torch.empty_like(buf, memory_format=torch.contiguous_format)
                regroup = True
        if regroup:
            groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
            for i, buf in enumerate(current):
                groups.setdefault((buf.device, buf.dtype), []).append(i)
            self._groups = list(groups.values())
        for idx in self._groups:
            torch._foreach_copy_([self._storage[i] for i in idx], [current[i] for i in idx])

    def _replaced(self, current: list[Tensor]) -> set[int]:
        """Buffers whose shape, dtype or device changed since ``capture`` (the module assigned a new tensor, e.g.
        ``ClampedRMSScale.last_scale`` after a batch of another size): they cannot be copied back in place."""
        return {
            i
            for i, (buf, snap) in enumerate(zip(current, self._storage))
            if snap is not None and (buf.shape != snap.shape or buf.dtype != snap.dtype or buf.device != snap.device)
        }

    def _put_back(self, i: int) -> None:
        mod, attr = self._entries[i]
        setattr(mod, attr, self._storage[i].clone())  # type: ignore[union-attr]

    @torch.no_grad()
    def restore(self) -> None:
        current = self._current()
        replaced = self._replaced(current)
        for i in replaced:
            self._put_back(i)
        for idx in self._groups:
            same = [i for i in idx if i not in replaced]
            if same:
                torch._foreach_copy_([current[i] for i in same], [self._storage[i] for i in same])

    @torch.no_grad()
    def restore_where(self, flag: Tensor) -> None:
        """Restore where the 0-dim bool ``flag`` is true, decided on the device (one ``where`` per buffer).

        A buffer the module replaced by one of another shape since ``capture`` cannot be selected with ``where``: for
        those (rare: a batch of another size) the flag is read on the host."""
        current = self._current()
        replaced = self._replaced(current)
        if replaced and bool(flag):
            for i in replaced:
                self._put_back(i)
        for i, (buf, snap) in enumerate(zip(current, self._storage)):
            if snap is not None and i not in replaced:
                buf.copy_(torch.where(flag.to(buf.device, non_blocking=True), snap, buf))


def clone_tree(obj: Any, device: torch.device | str | None) -> Any:
    """Deep copy of nested dicts/lists/tuples; tensors are cloned (to ``device`` when given)."""
    if isinstance(obj, Tensor):
        out = obj.detach()
        return out.to(device, copy=True) if device is not None else out.clone()
    if isinstance(obj, dict):
        return {k: clone_tree(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clone_tree(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(clone_tree(v, device) for v in obj)
    return obj


class TrainingSnapshot:
    """Deep copy of a module and its optimizers at one global step (see the module docstring for the memory cost)."""

    def __init__(
        self, step: int, module: nn.Module, optimizers: Sequence[torch.optim.Optimizer], device: str | None, extra: Any
    ) -> None:
        self.step = step
        self.module_state = clone_tree(module.state_dict(), device)
        self.optimizer_states = [clone_tree(opt.state_dict(), device) for opt in optimizers]
        self.extra = clone_tree(extra, None)

    @property
    def nbytes(self) -> int:
        total = 0

        def visit(obj: Any) -> None:
            nonlocal total
            if isinstance(obj, Tensor):
                total += obj.numel() * obj.element_size()
            elif isinstance(obj, dict):
                for v in obj.values():
                    visit(v)
            elif isinstance(obj, (list, tuple)):
                for v in obj:
                    visit(v)

        visit(self.module_state)
        visit(self.optimizer_states)
        return total

    @torch.no_grad()
    def restore(self, module: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> Any:
        """Copy the saved values back in place (parameters keep their identity); returns a copy of ``extra``."""
        module.load_state_dict(self.module_state, strict=True)
        for opt, state in zip(optimizers, self.optimizer_states):
            # load_state_dict may alias the tensors it is given: hand it a copy so the snapshot stays intact
            opt.load_state_dict(clone_tree(state, None))
        return clone_tree(self.extra, None)
