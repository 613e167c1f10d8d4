"""Gradient norms for ``GradientGuard``: foreach kernels grouped by device and dtype, accumulated in float32; and the
diagnosis of a step built from them (non-finite parameters, largest layers)."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch
from torch import Tensor

from lightning_stability.callbacks._sharding import ShardLayout, local_tensor


@dataclass
class GradNorms:
    """``per_tensor[i]`` is the L2 norm of ``grads[i]`` (float32, on the first gradient's device); ``total`` is
    ``sqrt(sum per_tensor**2)`` (a 0-dim float32 tensor). Both are unscaled when an ``inv_scale`` was given."""

    per_tensor: Tensor
    total: Tensor


def collect_grads(optimizer: torch.optim.Optimizer) -> tuple[list[Tensor], list[Tensor]]:
    """The parameters of ``optimizer`` that have a gradient, and those gradients (local shards for DTensors)."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grads = [p.grad for p in params]
    for i, g in enumerate(grads):
        if g.is_sparse:
            grads[i] = g.coalesce()._values()
        elif type(g) is not Tensor:  # DTensor (FSDP2 / tensor parallel): this rank's shard, possibly empty
            grads[i] = local_tensor(g)
    return params, grads


def grad_norms(
    grads: list[Tensor],
    *,
    inv_scale: Tensor | None = None,
    shards: ShardLayout | None = None,
    shard_index: Tensor | None = None,
) -> GradNorms:
    """Per-tensor and total L2 norms with one ``torch._foreach_norm`` per (device, dtype) group.

    Norms are computed with ``dtype=torch.float32`` so fp16/bf16 gradients cannot overflow the sum of squares.
    ``inv_scale`` multiplies the result (fp16 AMP with a fused optimizer: gradients are still scaled in the hook).

    ``shards`` (sharded strategies, see :mod:`lightning_stability.callbacks._sharding`): ``grads`` are this rank's local
    shards (possibly empty), at positions ``shard_index`` of the layout. The local squared norms are all-reduced as one
    vector, so ``per_tensor`` holds the norms of the *whole* gradients and ``total`` the norm of the whole model, the
    same on every rank; a NaN or inf in any rank's shard makes that tensor's norm (and the total) non-finite on every
    rank. No host synchronisation.
    """
    if not grads:  # a rank that holds no part of any gradient still takes part in the reduction
        device = shards.device if shards is not None else torch.device("cpu")
        per_tensor = torch.zeros(0, dtype=torch.float32, device=device)
        if shards is None:
            return GradNorms(per_tensor, per_tensor.sum())
        whole = shards.reduce(per_tensor, shard_index)
        return GradNorms(per_tensor, whole.sum().sqrt())
    first = grads[0]
    device, dtype = first.device, first.dtype
    # one (device, dtype) group, the usual case, checked without building a `torch.device` per gradient
    single = first.is_cuda or first.is_cpu
    if first.is_cuda:
        index = first.get_device()
        for g in grads:  # a plain loop: no generator frame per gradient
            if not (g.is_cuda and g.dtype is dtype and g.get_device() == index):
                single = False
                break
    elif single:
        for g in grads:
            if not (g.is_cpu and g.dtype is dtype):
                single = False
                break
    if single:
        groups = None
    else:
        groups = defaultdict(list)
        for i, g in enumerate(grads):
            groups[(g.device, g.dtype)].append(i)
        if len(groups) == 1:
            groups = None
    if groups is None:
        per_tensor = torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32))
    else:
        ordered: list[Tensor | None] = [None] * len(grads)
        for (dev, _), idx in groups.items():
            norms = torch._foreach_norm([grads[i] for i in idx], 2.0, dtype=torch.float32)
            for i, n in zip(idx, norms):
                ordered[i] = n if dev == device else n.to(device, non_blocking=True)
        per_tensor = torch.stack(ordered)  # type: ignore[arg-type]
    if inv_scale is not None:
        per_tensor = per_tensor * inv_scale.to(device=device, dtype=torch.float32)
    if shards is not None:
        whole = shards.reduce(per_tensor.square(), shard_index)  # squared norms of the whole tensors
        per_tensor = (whole if shard_index is None else whole[shard_index]).sqrt().to(device)
        total = whole.sum().sqrt().to(device)
    else:
        total = torch.linalg.vector_norm(per_tensor)
    return GradNorms(per_tensor, total)


@torch.no_grad()
def all_finite(tensors: list[Tensor]) -> Tensor:
    """A 0-dim bool tensor: every element of every tensor (local shards of DTensors, empty ones skipped) is finite.

    One max-abs reduction (``_foreach_norm(inf)``: it cannot overflow the way a sum of squares can, NaN propagates)
    per (device, dtype) group. Ranks are not combined here (callers reduce the flag across ranks).
    """
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for t in tensors:
        t = local_tensor(t)
        if t.numel():  # the inf-norm of an empty shard is undefined (FSDP2: a layer smaller than the world)
            groups[(t.device, t.dtype)].append(t)
    if not groups:
        return torch.ones((), dtype=torch.bool)
    flags = [torch.stack(torch._foreach_norm(ts, math.inf)).isfinite().all() for ts in groups.values()]
    return torch.stack([f.cpu() for f in flags]).all() if len(flags) > 1 else flags[0]


def layer_norms(names: list[str], per_tensor: list[float], top_k: int) -> list[tuple[str, float]]:
    """The ``top_k`` layers (parameter paths without their last component) by gradient norm, non-finite first."""
    sums: dict[str, float] = {}
    for name, n in zip(names, per_tensor):
        layer = name.rsplit(".", 1)[0] if "." in name else name
        sums[layer] = sums.get(layer, 0.0) + n * n
    ranked = sorted(sums.items(), key=lambda kv: (kv[1] == kv[1], -kv[1] if kv[1] == kv[1] else 0.0))
    return [(layer, float(s) ** 0.5 if s == s else float("nan")) for layer, s in ranked[:top_k]]


def diagnose(
    params: list[Tensor],
    param_names: dict[int, str],
    per_tensor: list[float],
    action: IntEnum,
    norm: float,
    thr: float | None,
    top_k: int,
) -> dict[str, Any]:
    """What the event of a step that was not simply accepted records: its cause, norm and threshold, the parameters
    whose gradient norm is non-finite (module paths from ``param_names``, keyed by ``id``), the ``top_k`` largest
    layers."""
    names = [param_names.get(id(p), f"param[{i}]") for i, p in enumerate(params)]
    if len(names) != len(per_tensor):
        names = [f"param[{i}]" for i in range(len(per_tensor))]
    data: dict[str, Any] = {"cause": action.name.lower(), "norm": norm}
    if thr is not None:
        data["threshold"] = thr
    data["nonfinite_params"] = [n for n, v in zip(names, per_tensor) if not math.isfinite(v)]
    data["top_layers"] = layer_norms(names, per_tensor, top_k)
    return data


def describe(data: dict[str, Any]) -> str:
    """The one-line summary of a :func:`diagnose` record that the guard's warnings end with."""
    parts = [f"norm={data['norm']:.4g}"]
    if data.get("nonfinite_params"):
        shown = data["nonfinite_params"][:8]
        more = len(data["nonfinite_params"]) - len(shown)
        parts.append("non-finite gradients in: " + ", ".join(shown) + (f" (+{more} more)" if more > 0 else ""))
    parts.append("largest layers: " + ", ".join(f"{n}={v:.3g}" for n, v in data["top_layers"]))
    return "; ".join(parts)
