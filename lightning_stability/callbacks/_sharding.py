"""Sharded tensors for the callbacks: local shards, and sums over the shards of a whole tensor.

Under ``ModelParallelStrategy`` (torch's FSDP2 ``fully_shard``, tensor parallelism) parameters, gradients and optimizer
state are ``DTensor``s: each rank holds a *local shard* (``to_local()``), possibly empty (a layer with fewer rows than
ranks), and an operation on the whole tensor is a local computation plus a collective. Under ``FSDPStrategy`` (FSDP1,
``use_orig_params=True``) they are plain tensors holding this rank's part of a flat parameter (empty, or with
``grad=None``, where the rank holds none of it).

A sum over the elements of a whole tensor (a squared norm, a count of non-finite values) is the SUM over ranks of
the sums over local shards, with one correction: along a mesh dimension where the tensor is *replicated* every rank
holds the same values, so each rank contributes ``1 / size`` of its partial sum. With that weight every tensor of a
mesh reduces over the same ranks, so the per-tensor sums of a whole model are combined by one ``all_reduce`` of one
vector, and the result is bit-identical on every rank (the decision made from it agrees without another collective).
Plain tensors under ``ModelParallelStrategy`` (parameters the user left unsharded) count as replicated over the world,
which also makes ranks agree when such a tensor differs between them (their mean is used).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

try:  # torch builds without distributed support have no DTensor
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - every supported Linux/macOS wheel has it
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]

__all__ = [
    "ShardLayout",
    "ShardReducer",
    "is_dtensor",
    "local_tensor",
    "sharded_strategy",
    "whole_extremes",
]


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of ``t`` (``t`` itself when it is a plain tensor). In-place writes reach ``t``."""
    if is_dtensor(t):
        with torch.no_grad():
            return t.to_local()
    return t


def sharded_strategy(trainer: Any) -> str | None:
    """``"model_parallel"`` (FSDP2 / DTensor), ``"fsdp"`` (FSDP1) or ``None`` for the trainer's strategy."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    if isinstance(strategy, ModelParallelStrategy):
        return "model_parallel"
    if isinstance(strategy, FSDPStrategy):
        return "fsdp"
    return None


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass(frozen=True)
class _Spec:
    """How one tensor's local partial sum becomes the whole tensor's sum: weight, then SUM over ``groups``."""

    groups: tuple[Any, ...]
    weight: float


def _mesh_groups(mesh: Any) -> tuple[Any, ...]:
    """Process groups whose successive SUM reductions cover every rank of ``mesh`` exactly once."""
    if mesh.ndim == 1:
        return (mesh.get_group(0),)
    if mesh.size() == _world():
        return (dist.group.WORLD,)
    return tuple(mesh.get_group(d) for d in range(mesh.ndim))


def _dtensor_spec(t: Any, name: str) -> _Spec:
    mesh = t.device_mesh
    weight = 1.0
    for dim, placement in enumerate(t.placements):
        if placement.is_partial():
            raise RuntimeError(
                f"`{name}` is a DTensor with a Partial placement {tuple(t.placements)} (its local values are summands,"
                " not a shard): its norm cannot be read from the local values. Reduce it (`redistribute` to"
                " `Replicate()`/`Shard()`) before the optimizer step."
            )
        if not isinstance(placement, Shard):  # replicated along this mesh dim: every rank there holds the same values
            weight /= mesh.size(dim)
    return _Spec(_mesh_groups(mesh), weight)


class ShardLayout:
    """Combines per-tensor partial sums over local shards into per-tensor sums over whole tensors.

    Built for one ordered list of tensors (an optimizer's parameters); ``index`` maps the tensors a caller holds (e.g.
    those with a gradient on this rank) into that list, so every rank reduces a vector of the same length even when
    some of its tensors have no local gradient (FSDP1 ranks that hold none of a parameter).
    """

    def __init__(self, specs: Sequence[_Spec], device: torch.device) -> None:
        self.size = len(specs)
        self.device = device
        buckets: dict[tuple[Any, ...], list[int]] = {}
        for i, spec in enumerate(specs):
            buckets.setdefault(spec.groups, []).append(i)
        self._buckets = [
            (groups, None if len(idx) == self.size else torch.tensor(idx, dtype=torch.long, device=device))
            for groups, idx in buckets.items()
        ]
        weights = [s.weight for s in specs]
        self.weights = (
            None if all(w == 1.0 for w in weights) else torch.tensor(weights, dtype=torch.float32, device=device)
        )

    @torch.no_grad()
    def reduce(self, partial: Tensor, index: Tensor | None = None) -> Tensor:
        """``partial[i]``: this rank's sum(s) for tensor ``index[i]`` (all tensors in order when ``index`` is None);
        extra trailing dims hold several sums per tensor.

        Returns the whole-tensor sums (float32, first dim ``self.size``; tensors absent here contribute 0), identical
        on every rank. One ``all_reduce`` per distinct group set (one for a model sharded over one mesh); no host
        sync.
        """
        partial = partial.to(device=self.device, dtype=torch.float32)
        if index is None:
            full = partial.clone()
        else:
            full = torch.zeros((self.size, *partial.shape[1:]), dtype=torch.float32, device=self.device)
            full[index] = partial
        if self.weights is not None:
            full.mul_(self.weights.reshape(-1, *([1] * (full.dim() - 1))))
        for groups, idx in self._buckets:
            part = full if idx is None else full[idx]
            for group in groups:
                dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
            if idx is not None:
                full[idx] = part
        return full


@torch.no_grad()
def whole_extremes(t: Tensor) -> tuple[float, float]:
    """``(min, max)`` over every element of ``t``, all ranks' shards together (an empty local shard counts as
    ``(inf, -inf)``); two all-reduces over the world when distributed. Host values: for rare checks only."""
    local = local_tensor(t.detach()).float()
    if local.numel():
        lo_hi = torch.stack([local.min(), -local.max()])
    else:
        lo_hi = torch.full((2,), math.inf, device=local.device)
    if _world() > 1:
        dist.all_reduce(lo_hi, op=dist.ReduceOp.MIN)
    lo, neg_hi = lo_hi.tolist()
    return lo, -neg_hi


class ShardReducer:
    """The sharding rules of one trainer's strategy, and a cached :class:`ShardLayout` per optimizer.

    ``for_trainer`` returns ``None`` when nothing is sharded (one device, DDP): callers keep their local fast path.
    """

    def __init__(self, kind: str, fsdp1_group: Any = None, fsdp1_sharded: bool = True) -> None:
        self.kind = kind
        self._fsdp1_group = fsdp1_group
        self._fsdp1_sharded = fsdp1_sharded
        self._layouts: dict[int, tuple] = {}

    @classmethod
    def for_trainer(cls, trainer: Any) -> ShardReducer | None:
        kind = sharded_strategy(trainer)
        if kind is None or _world() <= 1:
            return None
        if kind == "fsdp":
            group, sharded = dist.group.WORLD, True
            try:
                from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

                root = next(m for m in trainer.strategy.model.modules() if isinstance(m, FullyShardedDataParallel))
                group = root.process_group
                sharded = root.sharding_strategy != ShardingStrategy.NO_SHARD
            except (ImportError, StopIteration, AttributeError):
                pass
            return cls(kind, group, sharded)
        return cls(kind)

    def spec(self, t: Tensor, name: str = "tensor") -> _Spec:
        if is_dtensor(t):
            return _dtensor_spec(t, name)
        if self.kind == "fsdp" and self._fsdp1_sharded and getattr(t, "_fsdp_flattened", False):
            return _Spec((self._fsdp1_group,), 1.0)
        return _Spec((dist.group.WORLD,), 1.0 / _world())

    def layout(
        self, key: Any, tensors: Sequence[Tensor], present: Sequence[Tensor], names: Sequence[str] | None = None
    ) -> tuple[ShardLayout, Tensor | None]:
        """The layout of ``tensors`` (cached under ``id(key)`` while the tensors stay the same), and the index of
        ``present`` (a subsequence of ``tensors``) in it, ``None`` when ``present`` is all of them in order. Both are
        built once (device tensors, no per-step host-to-device copy)."""
        ids = tuple(id(t) for t in tensors)
        cached = self._layouts.get(id(key))
        if cached is None or cached[0] != ids:
            device = local_tensor(tensors[0]).device if tensors else torch.device("cpu")
            specs = [self.spec(t, names[i] if names else f"tensor {i}") for i, t in enumerate(tensors)]
            cached = (ids, ShardLayout(specs, device), {tid: i for i, tid in enumerate(ids)}, {})
            self._layouts[id(key)] = cached
        _, layout, position, indices = cached
        present_ids = tuple(id(t) for t in present)
        if present_ids == ids:
            return layout, None
        index = indices.get(present_ids)
        if index is None:
            if len(indices) >= 16:  # the set of tensors with a local gradient keeps changing: do not grow forever
                indices.clear()
            index = torch.tensor([position[i] for i in present_ids], dtype=torch.long, device=layout.device)
            indices[present_ids] = index
        return layout, index

    def clear(self) -> None:
        self._layouts.clear()
