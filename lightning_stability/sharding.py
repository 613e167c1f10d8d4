"""Sharding a LightningModule with torch's FSDP2 (``fully_shard``) under Lightning's ``ModelParallelStrategy``.

:func:`shard_module` is what :meth:`CodecModule.configure_model <lightning_stability.reference.codec.CodecModule>` and
:meth:`CascadeTransformerModule.configure_model <lightning_stability.reference.cascade.CascadeTransformerModule>` call,
and what a user's own module can call from its ``configure_model``: it does nothing unless the trainer's strategy gave
the module a device mesh (``ModelParallelStrategy``), so the same module trains unchanged on one device or under DDP::

    trainer = Trainer(strategy=ModelParallelStrategy(data_parallel_size=4, tensor_parallel_size=1), devices=4)

Units: each module in ``units`` is sharded on its own (its parameters all-gathered for its forward and freed after,
so peak memory is one unit's full weights plus every unit's shards), then the LightningModule itself takes whatever
parameters remain. Modules in ``replicate`` are not sharded at all: every rank keeps the whole module, their
gradients are averaged over the data-parallel ranks during backward (as DDP does) and their initial values (and
buffers) are broadcast from the first rank, so they stay identical on every rank. The codec replicates its quantizer
that way: codebook updates written during the forward pass (k-means initialisation, EMA, dead-code replacement)
would be lost on a sharded parameter, which FSDP2 re-gathers from the unchanged shards at the next forward.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["layers_with_parameters", "shard_module"]


def layers_with_parameters(*modules: nn.Module) -> list[nn.Module]:
    """The children of each module's ``nn.Sequential`` body (``module.model``, as in SEANet) that own parameters,
    or the module itself when it has no such body: the natural FSDP2 units of a convolutional stack."""
    units: list[nn.Module] = []
    for module in modules:
        body = getattr(module, "model", None)
        if isinstance(body, nn.Sequential):
            units += [m for m in body if any(True for _ in m.parameters())]
        elif any(True for _ in module.parameters()):
            units.append(module)
    return units


def _is_sharded(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        return False
    return isinstance(module, FSDPModule)


class _AverageGradient:
    """Post-accumulate-grad hook: average a replicated parameter's gradient over ``group`` (SUM, then divide: gloo has
    no AVG). Runs as soon as the parameter's gradient is complete, so it is reduced before any callback reads it."""

    def __init__(self, group: Any, size: int) -> None:
        self.group, self.size = group, size

    def __call__(self, param: torch.Tensor) -> None:
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=self.group)
            param.grad.div_(self.size)


def _module_list(name: str, value: Any) -> list[nn.Module]:
    """``value`` (an iterable of modules: a list, a ``ModuleList``, a generator) as a list; a ``TypeError`` naming
    ``name`` for anything else."""
    try:
        modules = list(value)
    except TypeError:
        raise TypeError(f"`{name}` must be an iterable of modules, got {value!r}") from None
    for m in modules:
        if not isinstance(m, nn.Module):
            raise TypeError(f"`{name}` must contain `torch.nn.Module`s, got {type(m).__name__}: {m!r}")
    return modules


def shard_module(
    pl_module: Any,
    units: Iterable[nn.Module],
    *,
    replicate: Sequence[nn.Module] = (),
    **fsdp_kwargs: Any,
) -> bool:
    """Shard ``pl_module`` with FSDP2 over the data-parallel mesh of ``ModelParallelStrategy``; no-op otherwise.

    Call it from ``configure_model``. Returns ``True`` when it sharded the module, ``False`` when there is no device
    mesh (any other strategy) or the module is already sharded (``configure_model`` runs again for each
    ``fit``/``validate``/``test``).

    Args:
        pl_module: the LightningModule (``pl_module.device_mesh`` comes from the strategy).
        units: submodules to shard one by one, innermost first (e.g. every transformer block, then every stage).
        replicate: submodules kept whole and identical on every rank (gradients averaged during backward).
        **fsdp_kwargs: passed to every ``fully_shard`` call (``reshard_after_forward``, ``mp_policy``,
            ``offload_policy``).

    Raises:
        TypeError: ``pl_module`` is not a module, or ``units``/``replicate`` is not an iterable of modules.
        RuntimeError: the mesh has a tensor-parallel dimension larger than 1 (this helper only shards data-parallel;
            pass ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)``), or ``fully_shard`` is
            not available in this torch.
        ValueError: a unit holds parameters of a replicated module, or ``fsdp_kwargs`` sets ``mesh`` or
            ``ignored_params``.
    """
    if not isinstance(pl_module, nn.Module):
        raise TypeError(f"`pl_module` must be the LightningModule to shard, got {type(pl_module).__name__}")
    units, replicate = _module_list("units", units), _module_list("replicate", replicate)
    for reserved in ("mesh", "ignored_params"):
        if reserved in fsdp_kwargs:
            raise ValueError(f"`shard_module` sets `{reserved}` itself; got `{reserved}={fsdp_kwargs[reserved]!r}`")
    mesh = getattr(pl_module, "device_mesh", None)
    if mesh is None or _is_sharded(pl_module):
        return False
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as err:  # pragma: no cover - torch < 2.6
        raise RuntimeError(f"`shard_module` needs torch's FSDP2 `fully_shard` (torch >= 2.6): {err}") from err
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise RuntimeError(
            "`shard_module` shards over the data-parallel dimension only, but the device mesh has"
            f" tensor_parallel size {mesh['tensor_parallel'].size()} (ModelParallelStrategy's default gives every"
            " device to tensor parallelism): use `ModelParallelStrategy(data_parallel_size=<devices>,"
            " tensor_parallel_size=1)`, or shard the module yourself in `configure_model`."
        )
    dp_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
    replicated = list({id(p): p for m in replicate for p in m.parameters()}.values())  # ordered: same on every rank
    replicated_ids = {id(p) for p in replicated}
    modules = {id(m): n for n, m in pl_module.named_modules()}
    for unit in units:
        shared = [n for n, p in unit.named_parameters() if id(p) in replicated_ids]
        if shared:
            raise ValueError(
                f"unit `{modules.get(id(unit), type(unit).__name__)}` holds parameters of a replicated module"
                f" ({shared[:3]}): a parameter is either sharded or replicated"
            )
        fully_shard(unit, mesh=dp_mesh, **fsdp_kwargs)
    fully_shard(pl_module, mesh=dp_mesh, ignored_params=set(replicated) or None, **fsdp_kwargs)
    if not replicate:
        return True
    # FSDP2 moved the sharded parameters to the mesh's device; the replicated ones go there too (a collective needs
    # them on the device of its backend)
    sharded = next((p for p in pl_module.parameters() if id(p) not in replicated_ids), None)
    device = sharded.to_local().device if sharded is not None and hasattr(sharded, "to_local") else None
    for m in replicate:
        if device is not None:
            m.to(device)
    if dp_mesh.size() > 1:
        group = dp_mesh.get_group()
        source = dist.get_global_rank(group, 0)
        hook = _AverageGradient(group, dp_mesh.size())
        buffers = list({id(b): b for m in replicate for b in m.buffers()}.values())
        with torch.no_grad():
            for t in [*replicated, *buffers]:  # identical from the start, even if the ranks built them differently
                dist.broadcast(t.data, src=source, group=group)
        for p in replicated:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(hook)
    return True
