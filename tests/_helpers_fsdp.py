"""Sharded training in tests: ``ModelParallelStrategy`` (torch's FSDP2 ``fully_shard``) over 2 spawned CPU processes.

Lightning launches ``ModelParallelStrategy`` by re-running the script (``_SubprocessScriptLauncher``), which under
pytest would re-run pytest. :class:`ShardedSpawnStrategy` spawns the workers instead (as ``ddp_spawn`` does), shuts
their gloo group down before they exit (see ``tests.helpers._ShutdownLauncher``: CPU gloo workers otherwise abort at
exit about one run in ten) and sends the *gathered* full parameters back, so the main process's module holds the
trained weights.

``ShardedFaultyModule`` is ``FaultyModule`` sharded layer by layer in ``configure_model``; with ``out_dim=1`` its last
layer has one row, so rank 1's local shards of its weight and bias are empty. ``ShardFault`` writes a value into one
rank's local gradient shard (or parameter shard) at chosen steps; it must come before the callbacks it tests.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _WorkerOutput
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from tests.helpers import FaultyModule, _ShutdownLauncher, make_trainer, regression_data


def _shard(module: nn.Module, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    fully_shard(module, mesh=mesh)


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` as a whole CPU tensor (DTensors gathered: a collective)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, t in module.state_dict().items():
        t = t.detach()
        out[name] = (t.full_tensor() if isinstance(t, DTensor) else t).cpu().clone()
    return out


class _ShardedLauncher(_ShutdownLauncher):
    """Spawns the workers; rank 0 returns the gathered full state dict instead of its shards."""

    def _collect_rank_zero_results(self, trainer: pl.Trainer, results):
        checkpoint_callback = trainer.checkpoint_callback
        best = getattr(checkpoint_callback, "best_model_path", None) if checkpoint_callback else None
        state = full_state(trainer.lightning_module)  # every rank takes part in the all-gathers
        if self._strategy.local_rank != 0:
            return None
        weights_path = None
        if trainer.state.fn == TrainerFn.FITTING:
            weights_path = os.path.join(tempfile.mkdtemp(), ".temp.ckpt")
            torch.save(state, weights_path)
        return _WorkerOutput(best, weights_path, trainer.state, results, self.get_extra_results(trainer))


class ShardedSpawnStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with 2-way data parallelism (FSDP2), spawned on CPU over gloo."""

    def __init__(self, data_parallel_size: int = 2, tensor_parallel_size: int = 1, **kwargs) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size, **kwargs)

    def _configure_launcher(self) -> None:
        self._launcher = _ShardedLauncher(self, start_method="spawn")


def sharded_trainer(tmp_path, callbacks=(), **kwargs) -> pl.Trainer:
    """``make_trainer`` on 2 CPU processes under :class:`ShardedSpawnStrategy`, without Lightning's (shuffling)
    distributed sampler: modules give every rank its part with :func:`sequential_loader`."""
    strategy = kwargs.pop("strategy", None) or ShardedSpawnStrategy()
    kwargs.setdefault("use_distributed_sampler", False)
    return make_trainer(tmp_path, callbacks, accelerator="cpu", devices=2, strategy=strategy, **kwargs)


class RankSplitSampler(torch.utils.data.Sampler):
    """Samples ``r, r + w, ...`` for rank ``r`` of ``w``, in order, decided when iterated (so one loader object serves
    a one-device reference and a spawned run alike; pass ``use_distributed_sampler=False``)."""

    def __init__(self, dataset) -> None:
        self.n = len(dataset)

    def _split(self) -> tuple[int, int]:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __iter__(self):
        rank, world = self._split()
        return iter(range(rank, self.n - self.n % world, world))

    def __len__(self) -> int:
        return self.n // self._split()[1]


def split_loader(dataset, batch_size: int) -> DataLoader:
    """A loader over :class:`RankSplitSampler`: ``w`` ranks at ``batch_size`` see per step what one device sees at
    ``w * batch_size``."""
    return DataLoader(dataset, batch_size=batch_size, sampler=RankSplitSampler(dataset))


def sequential_loader(trainer: pl.Trainer | None, dataset, batch_size: int) -> DataLoader:
    """Rank ``r`` of ``w`` gets samples ``r, r + w, ...`` in order (Lightning's own sampler would shuffle them), so
    ``w`` ranks at ``batch_size`` see per step exactly what one device sees at ``w * batch_size``."""
    world = trainer.world_size if trainer is not None else 1
    if world == 1:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=trainer.global_rank, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler)


class ShardedFaultyModule(FaultyModule):
    """``FaultyModule`` whose layers (each with parameters) and root are sharded with FSDP2 in ``configure_model``
    (nothing happens without a device mesh, so the same module is the single-device reference). ``batch_size`` is
    per rank: two ranks at 8 see the samples one device sees at 16, in the same order."""

    def __init__(self, *args, batch_size: int = 8, out_dim: int = 4, fused: bool = False, **kwargs) -> None:
        super().__init__(*args, out_dim=out_dim, **kwargs)
        self.batch_size, self.out_dim, self.fused = batch_size, out_dim, fused

    def configure_optimizers(self):
        if not self.fused:
            return super().configure_optimizers()
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[self.optimizer_name]
        return cls(self.parameters(), lr=self.lr, weight_decay=self.weight_decay, fused=True)

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if any(True for _ in layer.parameters(recurse=False)):
                _shard(layer, mesh)
        _shard(self, mesh)

    def train_dataloader(self):
        return sequential_loader(self.trainer, regression_data(out_dim=self.out_dim), self.batch_size)


class ShardFault(pl.Callback):
    """At the given steps, on ``rank`` only, write ``value`` into the first element of this rank's local shard.

    ``where="grad"``: the gradient of ``param`` after backward (before any later callback's
    ``on_before_optimizer_step``); ``where="weight"``: the parameter itself at the start of the batch.
    """

    def __init__(self, param: str, steps, *, rank: int = 1, value: float = float("inf"), where: str = "grad") -> None:
        self.param, self.steps, self.rank, self.value, self.where = param, set(steps), rank, value, where
        self.injected: list[int] = []

    def _local(self, t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    def _write(self, trainer, t: torch.Tensor) -> None:
        local = self._local(t)
        assert local.numel() > 0, f"rank {trainer.global_rank} holds no part of {self.param}"
        with torch.no_grad():
            local.view(-1)[0] = self.value
        self.injected.append(trainer.global_step)

    def _due(self, trainer) -> bool:
        return trainer.global_rank == self.rank and trainer.global_step in self.steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.where == "weight" and self._due(trainer):
            self._write(trainer, pl_module.get_parameter(self.param))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.where == "grad" and self._due(trainer):
            self._write(trainer, pl_module.get_parameter(self.param).grad)


class GatheredNorms(pl.Callback):
    """After the guard: the norm of the gathered full gradients (every parameter and the total), per step."""

    def __init__(self) -> None:
        self.total: dict[int, float] = {}
        self.per_param: dict[int, dict[str, float]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        norms = {}
        for name, p in pl_module.named_parameters():
            if p.grad is None:
                continue
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            norms[name] = float(g.double().norm())
        if not norms:  # a skipped step (the guard set every gradient to None)
            return
        self.per_param[trainer.global_step] = norms
        self.total[trainer.global_step] = sum(v * v for v in norms.values()) ** 0.5


def optimizer_steps(optimizer: torch.optim.Optimizer) -> list[float]:
    """Every parameter's optimizer step count (Adam/AdamW ``step``)."""
    return [float(s["step"]) for s in optimizer.state.values() if "step" in s]


def load_ranks(out: Path, world: int = 2) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


class HostReads:
    """Counts host reads of tensor values (``item``, ``tolist``, ``bool``/``float``/``int``, ``cpu``, ``numpy``) made
    by the callbacks between :meth:`start` and :meth:`stop` in ``on_before_optimizer_step``: put ``reads.start`` before
    the callback under test and ``reads.stop`` after it. ``per_step[step]`` is the count of that step."""

    _NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")

    def __init__(self) -> None:
        self.per_step: dict[int, int] = {}
        self._saved: dict[str, object] = {}
        self._count = 0
        self.start, self.stop = _ReadsStart(self), _ReadsStop(self)

    def _install(self) -> None:
        self._count = 0
        for name in self._NAMES:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(t, *args, _original=original, **kwargs):
                self._count += 1
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, counted)

    def _uninstall(self) -> int:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
        return self._count


class _ReadsStart(pl.Callback):
    def __init__(self, reads: HostReads) -> None:
        self.reads = reads

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.reads._install()


class _ReadsStop(_ReadsStart):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.reads.per_step[trainer.global_step] = self.reads._uninstall()
