"""Shared test helpers: a tiny LightningModule that injects faults at chosen steps, and its data.

``FaultyModule`` follows the project's protocols (docs/design.md, "Protocols"): ``training_step`` returns
``{"loss": total, "losses": {name: unweighted}, "preds": ..., "target": ...}``.

Faults are keyed by ``global_step`` (the optimizer-step index; it still advances on a step the guard skipped, because
``optimizer.step`` ran). With gradient accumulation every micro-batch of that step gets the fault.

- ``inf_grad_steps``: the loss stays finite but the backward pass produces ``inf`` gradients for every parameter
  upstream of the output (an identity whose backward multiplies by inf);
- ``nan_loss_steps``: the loss is NaN (and so are all gradients);
- ``spike_steps``: the loss is multiplied by ``spike_factor`` (finite, large gradients);
- ``nan_input_steps``: the input batch is NaN (poisons forward-mutated buffers such as BatchNorm statistics);
- ``fault_ranks``: inject only on these global ranks (``None``: every rank).
"""

from __future__ import annotations

import gc
from collections.abc import Iterable

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# What a test that injects faults provokes on purpose (the package's warnings are errors elsewhere, see pyproject):
# the guard's skip / rollback / stop notices, the scale clamp's "stays high" warning (a fault or a tiny model) and the
# cascade's RMS-factor notice. Use as ``pytestmark = FAULT_WARNINGS`` (or ``*FAULT_WARNINGS`` on one test). A ":"
# would end a filter's message, hence the "." in "ScaleFactorClamp. ".
FAULT_WARNINGS = [
    pytest.mark.filterwarnings("ignore:GradientGuard:UserWarning"),
    pytest.mark.filterwarnings("ignore:ScaleFactorClamp. scale factor .* stayed above:UserWarning"),
    pytest.mark.filterwarnings(r"ignore:cascade stage \d+. mean RMS factor:UserWarning"),
]


class _ScaleGrad(torch.autograd.Function):
    """Identity in forward; multiplies the incoming gradient by ``factor`` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    return _ScaleGrad.apply(x, factor)


def regression_data(n: int = 64, in_dim: int = 8, out_dim: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_dim, generator=g)
    w = torch.randn(in_dim, out_dim, generator=g)
    y = x @ w + 0.1 * torch.randn(n, out_dim, generator=g)
    return TensorDataset(x, y)


def regression_loader(n: int = 64, batch_size: int = 8, **kwargs) -> DataLoader:
    return DataLoader(regression_data(n, **kwargs), batch_size=batch_size, shuffle=False)


class FaultyModule(pl.LightningModule):
    def __init__(
        self,
        in_dim: int = 8,
        hidden: int = 16,
        out_dim: int = 4,
        *,
        batchnorm: bool = False,
        optimizer: str = "adam",
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        inf_grad_steps: Iterable[int] = (),
        nan_loss_steps: Iterable[int] = (),
        spike_steps: Iterable[int] = (),
        spike_factor: float = 100.0,
        nan_input_steps: Iterable[int] = (),
        fault_ranks: Iterable[int] | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.Tanh(), nn.Linear(hidden, out_dim)]
        self.net = nn.Sequential(*layers)
        self.optimizer_name = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.inf_grad_steps = set(inf_grad_steps)
        self.nan_loss_steps = set(nan_loss_steps)
        self.spike_steps = set(spike_steps)
        self.spike_factor = spike_factor
        self.nan_input_steps = set(nan_input_steps)
        self.fault_ranks = None if fault_ranks is None else set(fault_ranks)
        self.step_losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _fault(self, steps: set[int]) -> bool:
        if self.global_step not in steps:
            return False
        return self.fault_ranks is None or self.global_rank in self.fault_ranks

    def compute(self, batch) -> dict:
        x, y = batch
        if self._fault(self.nan_input_steps):
            x = torch.full_like(x, float("nan"))
        preds = self(x)
        if self._fault(self.inf_grad_steps):
            preds = scale_grad(preds, float("inf"))
        mse = nn.functional.mse_loss(preds, y)
        loss = mse
        if self._fault(self.spike_steps):
            loss = loss * self.spike_factor
        if self._fault(self.nan_loss_steps):
            loss = loss * float("nan")
        return {"loss": loss, "losses": {"mse": mse.detach()}, "preds": preds.detach(), "target": y}

    def training_step(self, batch, batch_idx):
        out = self.compute(batch)
        self.step_losses.append(float(out["loss"].detach()))
        return out

    def validation_step(self, batch, batch_idx):
        out = self.compute(batch)
        self.log("val_loss", out["loss"])
        return out

    def configure_optimizers(self):
        params = self.parameters()
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay or 0.01)
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        raise ValueError(f"unknown optimizer {self.optimizer_name!r}")

    def train_dataloader(self):
        return regression_loader()

    def val_dataloader(self):
        return regression_loader(n=16, seed=1)


class _ShutdownLauncher(_MultiProcessingLauncher):
    """Lightning's spawn launcher, plus an orderly gloo shutdown in each worker before it exits.

    Without it a worker that leaves the default gloo process group alive can die with SIGABRT ("terminate called
    without an active exception") while the interpreter finalises: a gloo worker thread is still releasing the last
    collective's tensors, needs the GIL to drop their Python objects, and is killed mid-destructor (seen in CI about
    one run in ten; core dump: ``ProcessGroupGloo::runLoop`` -> ``~AsyncAllreduceWork`` -> ``PyThread_exit_thread``).
    Lightning registers this shutdown only for NCCL. After a successful fit every rank meets at a barrier, drops the
    group and collects garbage, so the group's destructor joins its threads while the interpreter is still whole.
    """

    def _wrapping_function(self, process_idx, *args, **kwargs):
        super()._wrapping_function(process_idx, *args, **kwargs)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        gc.collect()


class SpawnStrategy(DDPStrategy):
    """``strategy="ddp_spawn"`` (gloo on CPU) whose workers shut their process group down before exiting."""

    def __init__(self, **kwargs) -> None:
        super().__init__(start_method="spawn", **kwargs)

    def _configure_launcher(self) -> None:
        self._launcher = _ShutdownLauncher(self, start_method=self._start_method)

    def setup(self, trainer: pl.Trainer) -> None:
        # Spawning hands the module to every worker through shared memory, and on the CPU nothing copies it out
        # again: parameters and buffers end up private, but torchmetrics states stay one storage for all ranks,
        # so every rank's `update` lands in the same tensor and a DDP sum counts it world-size times (measured:
        # a SumMetric updated 3 times per rank read 6 on each of 2 ranks). Each worker gets its own copies.
        from torchmetrics import Metric

        for module in trainer.lightning_module.modules():
            if isinstance(module, Metric):
                module._apply(lambda t: t.clone())
        super().setup(trainer)


def make_trainer(tmp_path, callbacks=(), **kwargs) -> pl.Trainer:
    """A quiet CPU Trainer writing under ``tmp_path`` (``strategy="ddp_spawn"`` becomes :class:`SpawnStrategy`)."""
    defaults = {
        "default_root_dir": tmp_path,
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 8,
        "limit_val_batches": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        "num_sanity_val_steps": 0,
        "deterministic": True,
    }
    defaults.update(kwargs)
    if defaults.get("strategy") == "ddp_spawn":
        defaults["strategy"] = SpawnStrategy()
    return pl.Trainer(callbacks=list(callbacks), **defaults)


def snapshot(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Deep copy of parameters, buffers and (optionally) optimizer state, for bit-identity checks."""
    snap = {"module": {k: v.detach().clone() for k, v in module.state_dict().items()}}
    if optimizer is not None:
        state = optimizer.state_dict()
        snap["optim"] = {
            i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for i, s in state["state"].items()
        }
    return snap


def assert_same(a: dict, b: dict) -> None:
    """Bit-identical snapshots (NaN == NaN)."""
    assert a.keys() == b.keys()
    for part in a:
        assert a[part].keys() == b[part].keys(), part
        for k in a[part]:
            x, y = a[part][k], b[part][k]
            if isinstance(x, dict):
                for kk in x:
                    xx, yy = x[kk], y[kk]
                    if torch.is_tensor(xx):
                        assert torch.equal(xx, yy) or torch.allclose(xx, yy, rtol=0, atol=0, equal_nan=True), (k, kk)
                    else:
                        assert xx == yy, (k, kk)
            else:
                assert torch.equal(x, y) or torch.allclose(x, y, rtol=0, atol=0, equal_nan=True), k


def manual_optimization(cls: type[pl.LightningModule]) -> type[pl.LightningModule]:
    """A subclass of ``cls`` trained with manual optimization: the parent's ``training_step`` output, then
    ``zero_grad`` / ``manual_backward(out["loss"])`` / ``step`` on its single optimizer."""

    class Manual(cls):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(out["loss"])
            opt.step()
            return out

    Manual.__name__ = Manual.__qualname__ = f"Manual{cls.__name__}"
    return Manual
