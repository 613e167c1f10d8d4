"""The first-moment norm ``GradientGuard`` can watch besides the gradient norm (Adam-family optimizers).

Marin's 32B runs saw Adam *update*-norm spikes (the first moment doubling while the second moment stayed flat) come
before loss spikes. The quantity computed here is the norm of the bias-corrected first moment that the coming step
would write, the numerator of Adam's update,

    m_t = beta1 * m_{t-1} + (1 - beta1) * g_t,   m_hat_t = m_t / (1 - beta1**t)   (m_0 = 0)

from the optimizer's ``exp_avg`` and ``step`` state and this step's gradients, on the device, before the step is
taken (so the guard can still skip it). The bias correction matters: the raw ``m_t`` climbs from zero over the first
``1 / (1 - beta1)`` steps, which a z-score detector would take for a spike. ``t`` is read from the first parameter of
each param group that has state (a device tensor; parameters of one group normally step together). Optimizers without
``betas`` in their param groups, or whose state has no ``exp_avg`` after their first step, have no first moment to
watch: :func:`first_moment_norm` returns ``None`` for them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def has_first_moment(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every param group has ``betas`` and every initialised parameter state an ``exp_avg``."""
    if not all("betas" in g for g in optimizer.param_groups):
        return False
    states = [optimizer.state.get(p) for g in optimizer.param_groups for p in g["params"]]
    return all(s is None or len(s) == 0 or "exp_avg" in s for s in states)


@torch.no_grad()
def first_moment_norm(
    optimizer: torch.optim.Optimizer,
    *,
    inv_scale: Tensor | None = None,
    process_group=None,
) -> Tensor | None:
    """``||m_hat_t||`` (module docstring) over the parameters with a gradient, a 0-dim float32 tensor on the
    first gradient's device (``None`` if the optimizer keeps no first moment or no parameter has a gradient).

    ``inv_scale`` unscales the gradients (fp16 AMP with a fused optimizer: they are still scaled in the hook; the
    moments are not). ``process_group`` (sharded strategies): the squared total is all-reduced so every rank sees the
    whole model's norm. Cost: one foreach lerp into temporaries the size of the gradients, and one foreach norm.
    """
    if not has_first_moment(optimizer):
        return None
    squares: list[Tensor] = []
    device = None
    for group in optimizer.param_groups:
        beta1 = float(group["betas"][0])
        moments, grads, fresh = [], [], []
        for p in group["params"]:
            if p.grad is None or p.grad.is_sparse:
                continue
            g = _local(p.grad)
            device = device or g.device
            state = optimizer.state.get(p)
            if state and "exp_avg" in state:
                moments.append(_local(state["exp_avg"]))
                grads.append(g if g.dtype == moments[-1].dtype else g.to(moments[-1].dtype))
            else:
                fresh.append(g)
        if inv_scale is not None:
            grads = torch._foreach_mul(grads, inv_scale.to(grads[0].device)) if grads else grads
            fresh = torch._foreach_mul(fresh, inv_scale.to(fresh[0].device)) if fresh else fresh
        if moments:
            predicted = torch._foreach_lerp(moments, grads, 1.0 - beta1)
            norms = torch._foreach_norm(predicted, 2.0, dtype=torch.float32)
            step = next(optimizer.state[p]["step"] for p in group["params"] if optimizer.state.get(p))
            t = torch.as_tensor(step, dtype=torch.float32).to(device) + 1.0
            correction = 1.0 - torch.pow(torch.tensor(beta1, dtype=torch.float32, device=device), t)
            squares.append(torch.stack([n.to(device) for n in norms]).square().sum() / correction.square())
        if fresh:  # t = 1: m_hat = g
            norms = torch._foreach_norm(fresh, 2.0, dtype=torch.float32)
            squares.append(torch.stack([n.to(device) for n in norms]).square().sum())
    if not squares:
        return None
    total_sq = torch.stack(squares).sum()
    if process_group is not None:
        torch.distributed.all_reduce(total_sq, group=process_group)
    return total_sq.sqrt()
