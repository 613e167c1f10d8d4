"""``GradientGuard``'s state: protected buffers (every step), rollback snapshots, what it keeps per optimizer.

``BufferSnapshot`` keeps one preallocated copy of the selected module buffers. ``capture()`` copies the buffers into
it with one ``torch._foreach_copy_`` per (device, dtype) group; ``restore()`` copies them back; ``restore_where(flag)``
does the same on the device with ``torch.where`` (no host sync). Buffers are looked up by name at every call, so a
module that *replaces* a buffer (``self.buf = new``) instead of updating it in place is still handled, and storage is
reallocated only when a buffer changes shape, dtype or device. Cost: one copy of the protected buffers per optimizer
step and memory equal to their size; parameters are never touched.

``TrainingSnapshot`` is a deep copy of the LightningModule's ``state_dict`` and every optimizer's ``state_dict``
(memory: parameters + buffers + optimizer state, e.g. 3x the parameters for Adam), restored in place.

Sharded state (``DTensor`` parameters, buffers and optimizer state under FSDP2 / tensor parallelism): each rank copies
and restores only its local shard (memory: 1/world of the above per rank); a snapshot's DTensor is rebuilt from its
local copy on the shard's own device with the same mesh and placements, so a CPU snapshot of GPU shards restores.

``OptimizerState`` is what the guard remembers about one optimizer: running statistics and :class:`Counters`, as host
numbers, or as device tensors (built with ``filled``, no host-to-device copy) in sync-free mode. ``StepContext`` is
what one step's decision works on.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_stability.callbacks._sharding import is_dtensor, local_tensor
from lightning_stability.callbacks.guard._norm import GradNorms
from lightning_stability.callbacks.guard._policy import NormStats

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
        # the argument lists of the foreach copies of the last capture, and where buffer i sits in them: a buffer the
        # module replaced by a tensor that still fits its storage (``ClampedRMSScale.last_scale`` every forward) only
        # swaps its entry, so a capture builds no lists
        self._copy_args: list[tuple[list[Tensor], list[Tensor]]] = []
        self._position: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._storage if t is not None)

    def _buffer(self, i: int) -> Tensor:
        # `_buffers` directly: `getattr` on a module reaches a buffer only through `Module.__getattr__`, after the
        # ordinary lookup failed (a removed buffer still raises the same AttributeError through `getattr`)
        mod, attr = self._entries[i]
        buf = mod._buffers.get(attr)
        return buf if buf is not None else getattr(mod, attr)

    def _current(self) -> list[Tensor]:
        # a DTensor buffer (tensor parallelism) is copied and restored through its local shard (the same tensor object
        # at every call, so the reuse check below holds)
        return [local_tensor(self._buffer(i)) for i in range(len(self._entries))]

    @torch.no_grad()
    def capture(self) -> None:
        seen, storage = self._seen, self._storage
        regroup = False
        swapped = []
        for i in range(len(self._entries)):
            buf = self._buffer(i)
            if buf is seen[i]:  # the tensor captured last time: its storage still fits
                continue
            if type(buf) is not Tensor:
                buf = local_tensor(buf)
                if buf is seen[i]:
                    continue
            seen[i] = buf
            snap = storage[i]
            if snap is None or snap.shape != buf.shape or snap.dtype != buf.dtype or snap.device != buf.device:
                storage[i] = torch.empty_like(buf, memory_format=torch.contiguous_format)
                regroup = True
            swapped.append(i)
        if regroup:
            groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
            for i, buf in enumerate(seen):
                groups.setdefault((buf.device, buf.dtype), []).append(i)  # type: ignore[union-attr]
            self._groups = list(groups.values())
            self._copy_args = [([storage[i] for i in idx], [seen[i] for i in idx]) for idx in self._groups]
            self._position = [(0, 0)] * len(seen)
            for j, idx in enumerate(self._groups):
                for k, i in enumerate(idx):
                    self._position[i] = (j, k)
        else:
            for i in swapped:
                j, k = self._position[i]
                self._copy_args[j][1][k] = seen[i]
        for dst, src in self._copy_args:
            torch._foreach_copy_(dst, src)

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
        value = self._storage[i].clone()  # type: ignore[union-attr]
        current = getattr(mod, attr)
        if is_dtensor(current):
            from torch.distributed.tensor import DTensor

            value = DTensor.from_local(value, current.device_mesh, current.placements, run_check=False)
        setattr(mod, attr, value)

    @torch.no_grad()
    def restore(self, indices: Sequence[int] | None = None) -> None:
        """Copy the captured values back (only the buffers at ``indices``, positions in ``names``, when given)."""
        current = self._current()
        chosen = set(range(len(current)) if indices is None else indices)
        replaced = self._replaced(current) & chosen
        for i in replaced:
            self._put_back(i)
        for idx in self._groups:
            same = [i for i in idx if i in chosen and i not in replaced]
            if same:
                torch._foreach_copy_([current[i] for i in same], [self._storage[i] for i in same])

    @torch.no_grad()
    def restore_where(self, flag: Tensor, indices: Sequence[int] | None = None) -> None:
        """Restore where the 0-dim bool ``flag`` is true, decided on the device (one ``where`` per buffer).

        A buffer the module replaced by one of another shape since ``capture`` cannot be selected with ``where``: for
        those (rare: a batch of another size) the flag is read on the host."""
        current = self._current()
        chosen = set(range(len(current)) if indices is None else indices)
        replaced = self._replaced(current) & chosen
        if replaced and bool(flag):
            for i in replaced:
                self._put_back(i)
        for i, (buf, snap) in enumerate(zip(current, self._storage)):
            if snap is not None and i in chosen and i not in replaced:
                buf.copy_(torch.where(flag.to(buf.device, non_blocking=True), snap, buf))


@dataclass
class _ShardCopy:
    """A copy of one rank's local shard of a DTensor, and what rebuilds the DTensor from it."""

    local: Tensor
    device: torch.device  # where the shard lives (the snapshot copy may be on the CPU)
    mesh: Any
    placements: tuple
    shape: torch.Size
    stride: tuple[int, ...]

    def rebuild(self) -> Tensor:
        from torch.distributed.tensor import DTensor

        local = self.local.to(self.device, copy=True)
        return DTensor.from_local(
            local, self.mesh, self.placements, run_check=False, shape=self.shape, stride=self.stride
        )


def clone_tree(obj: Any, device: torch.device | str | None) -> Any:
    """Deep copy of nested dicts/lists/tuples; tensors are cloned (to ``device`` when given).

    A DTensor becomes a :class:`_ShardCopy` of its local shard; cloning a tree that holds ``_ShardCopy`` entries turns
    them back into DTensors (fresh copies on the shard's device)."""
    if is_dtensor(obj):
        local = local_tensor(obj.detach())
        copy = local.to(device, copy=True) if device is not None else local.clone()
        return _ShardCopy(copy, local.device, obj.device_mesh, tuple(obj.placements), obj.shape, obj.stride())
    if isinstance(obj, _ShardCopy):
        return obj.rebuild()
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
            if isinstance(obj, _ShardCopy):
                obj = obj.local
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
        module.load_state_dict(_rebuilt(self.module_state), strict=True)
        for opt, state in zip(optimizers, self.optimizer_states):
            # load_state_dict may alias the tensors it is given: hand it a copy so the snapshot stays intact
            opt.load_state_dict(clone_tree(state, None))
        return clone_tree(self.extra, None)


def _rebuilt(obj: Any) -> Any:
    """``obj`` with every :class:`_ShardCopy` turned back into a DTensor (plain tensors are not copied)."""
    if isinstance(obj, _ShardCopy):
        return obj.rebuild()
    if isinstance(obj, dict):
        return {k: _rebuilt(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rebuilt(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_rebuilt(v) for v in obj)
    return obj


class Counters(NamedTuple):
    """The counters the guard keeps per optimizer; in this order in the device vector of sync-free mode."""

    num_skipped: int = 0  # guard skips (AMP overflows excluded)
    num_amp_overflows: int = 0
    num_clipped: int = 0
    consecutive: int = 0  # guard skips in a row that count as trouble
    consecutive_amp: int = 0  # AMP overflows in a row
    last_skip_step: int = -1
    num_rebased: int = 0


#: the counters' names, in the order of the device vector (and of ``state_dict()["optimizers"][i]["counters"]``)
COUNTERS = Counters._fields
#: the position of each counter in the device vector: ``counters_t[SLOT.num_skipped]``
SLOT = Counters(*range(len(COUNTERS)))
#: the slice of the two run-length counters (``consecutive``, ``consecutive_amp``) in the device vector
_RUNS = slice(SLOT.consecutive, SLOT.consecutive_amp + 1)


@dataclass
class OptimizerState:
    """What the guard remembers about one optimizer (host numbers, or device tensors in sync-free mode)."""

    stats: NormStats = field(default_factory=NormStats)
    num_skipped: int = 0
    num_amp_overflows: int = 0
    num_clipped: int = 0
    consecutive: int = 0
    consecutive_amp: int = 0
    last_skip_step: int = -1
    num_rebased: int = 0
    # sync-free mode only
    stats_t: Tensor | None = None  # float32, NormStats.as_list()
    counters_t: Tensor | None = None  # int64, in `Counters` order (index with `SLOT`)
    last_code_t: Tensor | None = None
    last_skip_code_t: Tensor | None = None
    last_skip_norms_t: Tensor | None = None  # per-tensor norms of the last skipped step, for a deferred diagnosis
    last_thr_t: Tensor | None = None
    # first-moment signal (track_first_moment / first_moment_zscore)
    mstats: NormStats = field(default_factory=NormStats)
    mstats_t: Tensor | None = None
    moment_t: Tensor | None = None  # this step's first-moment norm (0-dim, device)
    # loss confirmation (loss_zscore): running statistics of the step's loss
    lstats: NormStats = field(default_factory=NormStats)
    lstats_t: Tensor | None = None

    def host_counters(self) -> Counters:
        return Counters(*(getattr(self, name) for name in COUNTERS))

    def reset_runs(self) -> None:
        """Persistent trouble was acted upon: the runs of skips and of AMP overflows start again from zero."""
        self.consecutive = 0
        self.consecutive_amp = 0
        if self.counters_t is not None:
            self.counters_t[_RUNS] = 0

    def to_device(self, device: torch.device) -> bool:
        """Sync-free mode: hold the statistics and counters as tensors on ``device``, built from the host numbers
        (``filled``: no host-to-device copy) unless they are there already; True when they were built."""
        if self.stats_t is not None and self.stats_t.device == device:
            return False
        self.stats_t = filled(self.stats.as_list(), torch.float32, device)
        self.counters_t = filled(self.host_counters(), torch.int64, device)
        self.last_skip_code_t = torch.zeros((), dtype=torch.int32, device=device)
        self.mstats_t = filled(self.mstats.as_list(), torch.float32, device)
        self.lstats_t = filled(self.lstats.as_list(), torch.float32, device)
        return True

    def read_counters(self) -> Counters:
        """The counters (in sync-free mode read from the device: one host sync)."""
        if self.counters_t is not None:
            return Counters(*(int(v) for v in self.counters_t.tolist()))
        return self.host_counters()


def filled(values: list[float] | list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A device tensor holding ``values``, written with ``fill_`` kernels (no host-to-device copy, no sync)."""
    out = torch.empty(len(values), dtype=dtype, device=device)
    for i, v in enumerate(values):
        out[i].fill_(v)
    return out


@dataclass
class StepContext:
    """Everything one optimizer step's decision works on (built in ``on_before_optimizer_step``)."""

    trainer: pl.Trainer
    pl_module: pl.LightningModule
    optimizer: torch.optim.Optimizer
    idx: int  # the optimizer's index in ``trainer.optimizers``
    state: OptimizerState  # what the guard keeps about this optimizer
    params: list[Tensor]  # the parameters that have a gradient
    grads: list[Tensor]  # their gradients (local shards for DTensors)
    norms: GradNorms
    amp_found: Tensor | None  # fp16 AMP: whether GradScaler found an inf (None without a scaler)
    loss_bad: Tensor | None  # fp16 AMP: whether the loss itself was non-finite
    forced: bool  # inside the skip window after a rollback, a rollback is pending, or the batch is quarantined
    loss: Tensor | None  # the step's loss (``loss_zscore``), averaged over ranks

    @property
    def step(self) -> int:
        return self.trainer.global_step
