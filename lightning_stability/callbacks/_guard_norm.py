"""Gradient norms for ``GradientGuard``: foreach kernels grouped by device and dtype, accumulated in float32."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GradNorms:
    """``per_tensor[i]`` is the L2 norm of ``grads[i]`` (float32, on the first gradient's device); ``total`` is
    ``sqrt(sum per_tensor**2)`` (a 0-dim float32 tensor). Both are unscaled when an ``inv_scale`` was given."""

    per_tensor: Tensor
    total: Tensor


def collect_grads(optimizer: torch.optim.Optimizer) -> tuple[list[Tensor], list[Tensor]]:
    """The parameters of ``optimizer`` that have a gradient, and those gradients (local shards for DTensors)."""
    params, grads = [], []
    for group in optimizer.param_groups:
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                g = g.coalesce()._values()
            elif hasattr(g, "to_local"):  # DTensor (FSDP2 / tensor parallel): this rank's shard
                g = g.to_local()
            params.append(p)
            grads.append(g)
    return params, grads


def grad_norms(grads: list[Tensor], *, inv_scale: Tensor | None = None, process_group=None) -> GradNorms:
    """Per-tensor and total L2 norms with one ``torch._foreach_norm`` per (device, dtype) group.

    Norms are computed with ``dtype=torch.float32`` so fp16/bf16 gradients cannot overflow the sum of squares.
    ``inv_scale`` multiplies the result (fp16 AMP with a fused optimizer: gradients are still scaled in the hook).
    ``process_group`` (sharded strategies): the squared total is all-reduced (SUM) so every rank sees the norm of the
    whole model; per-tensor norms stay local.
    """
    device = grads[0].device
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, g in enumerate(grads):
        groups[(g.device, g.dtype)].append(i)
    if len(groups) == 1:
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
    if process_group is not None:
        total_sq = per_tensor.square().sum()
        torch.distributed.all_reduce(total_sq, group=process_group)
        total = total_sq.sqrt()
    else:
        total = torch.linalg.vector_norm(per_tensor)
    return GradNorms(per_tensor, total)


def layer_norms(names: list[str], per_tensor: list[float], top_k: int) -> list[tuple[str, float]]:
    """The ``top_k`` layers (parameter paths without their last component) by gradient norm, non-finite first."""
    sums: dict[str, float] = {}
    for name, n in zip(names, per_tensor):
        layer = name.rsplit(".", 1)[0] if "." in name else name
        sums[layer] = sums.get(layer, 0.0) + n * n
    ranked = sorted(sums.items(), key=lambda kv: (kv[1] == kv[1], -kv[1] if kv[1] == kv[1] else 0.0))
    return [(layer, float(s) ** 0.5 if s == s else float("nan")) for layer, s in ranked[:top_k]]
