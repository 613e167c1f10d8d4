"""Test helpers for ``GradientGuard``: recording callbacks and small modules (two optimizers, an EMA quantizer)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from tests.helpers import FaultyModule, regression_loader, scale_grad, snapshot


class StepRecorder(pl.Callback):
    """Snapshots the module (and first optimizer) at the start of every batch, keyed by ``global_step``.

    Registered *after* the guard in the callback list, so its ``on_train_batch_start`` sees the state the step begins
    from. ``norms_after_guard`` holds the total gradient norm that reached the optimizer (read after the guard ran).
    """

    def __init__(self, with_optimizer: bool = True) -> None:
        self.with_optimizer = with_optimizer
        self.snaps: dict[int, dict] = {}
        self.norms_after_guard: dict[int, float] = {}
        self.final: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        opt = trainer.optimizers[0] if self.with_optimizer else None
        self.snaps.setdefault(trainer.global_step, snapshot(pl_module, opt))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
        self.norms_after_guard[trainer.global_step] = norm

    def on_train_end(self, trainer, pl_module):
        self.final = snapshot(pl_module, trainer.optimizers[0] if self.with_optimizer else None)


class RankDump(pl.Callback):
    """Writes each rank's parameters, buffers and guard counters to ``out_dir/rank{r}.pt`` (for ddp_spawn tests)."""

    def __init__(self, out_dir: Path, guard) -> None:
        self.out_dir = Path(out_dir)
        self.guard = guard
        self.before: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = snapshot(pl_module)["module"]

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {
                "state": snapshot(pl_module)["module"],
                "before": self.before,
                "num_skipped": self.guard.num_skipped,
                "skip_steps": [e.step for e in self.guard.event_log.events if e.kind == "skip"],
                "losses": pl_module.step_losses,
            },
            self.out_dir / f"rank{trainer.global_rank}.pt",
        )


class TwoOptimizerModule(pl.LightningModule):
    """Manual optimization with two optimizers on two sub-networks; inf gradients in ``net_b`` at chosen batches, or a
    NaN input to ``net_b`` (which then has BatchNorm, so the NaN reaches its running statistics)."""

    def __init__(self, inf_b_batches=(), nan_b_batches=()) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net_a = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))
        self.net_b = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))
        self.inf_b_batches = set(inf_b_batches)
        self.nan_b_batches = set(nan_b_batches)

    def training_step(self, batch, batch_idx):
        opt_a, opt_b = self.optimizers()
        x, y = batch
        loss_a = nn.functional.mse_loss(self.net_a(x), y)
        opt_a.zero_grad()
        self.manual_backward(loss_a)
        opt_a.step()
        out_b = self.net_b(torch.full_like(x, float("nan")) if batch_idx in self.nan_b_batches else x)
        if batch_idx in self.inf_b_batches:
            out_b = scale_grad(out_b, float("inf"))
        loss_b = nn.functional.mse_loss(out_b, y)
        opt_b.zero_grad()
        self.manual_backward(loss_b)
        opt_b.step()

    def configure_optimizers(self):
        return torch.optim.Adam(self.net_a.parameters(), lr=1e-2), torch.optim.AdamW(self.net_b.parameters(), lr=1e-2)

    def train_dataloader(self):
        return regression_loader()


class FusedFaultyModule(FaultyModule):
    """``FaultyModule`` with a fused optimizer (skipped through ``found_inf``)."""

    def configure_optimizers(self):
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[self.optimizer_name]
        kwargs = {"momentum": 0.9} if self.optimizer_name == "sgd" else {}
        return cls(self.parameters(), lr=self.lr, weight_decay=self.weight_decay, fused=True, **kwargs)
