"""Sharded training on GPUs (NCCL): FSDP1 (``FSDPStrategy``, which refuses a CPU accelerator) and FSDP2 over NCCL.

Skipped without 2 CUDA devices. The CPU tests (gloo) cover the same logic for FSDP2; these check what only a GPU
run has: FSDP1's flat-parameter shards (``use_orig_params=True``: a rank may hold no part of a parameter, whose
gradient is then ``None`` there), NCCL collectives, and sync-free mode making no host synchronisation at all
(``torch.cuda.set_sync_debug_mode("error")`` around the guard's hook).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from lightning_stability.callbacks import GradientGuard, SpectralNormInjection
from tests._helpers_fsdp import ShardedFaultyModule, ShardedSpawnStrategy, ShardFault, optimizer_steps
from tests.helpers import _ShutdownLauncher, make_trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.fsdp,
    pytest.mark.timeout(600),
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL, FSDP1)"),
]


class SpawnFSDP(FSDPStrategy):
    """FSDP1 with spawned workers (the default launcher re-runs the script, i.e. pytest)."""

    def _configure_launcher(self) -> None:
        self._launcher = _ShutdownLauncher(self, start_method="spawn")


class WholeNorms(pl.Callback):
    """After the guard: the norm of the whole gradients (FSDP1: gathered with ``summon_full_params(with_grads)``)."""

    def __init__(self) -> None:
        self.total: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if isinstance(trainer.strategy, FSDPStrategy):
            from torch.distributed.fsdp import FullyShardedDataParallel

            with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, with_grads=True):
                grads = [p.grad.double() for p in pl_module.parameters() if p.grad is not None]
                norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
        else:
            grads = [p.grad.full_tensor().double() for p in pl_module.parameters() if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
        if grads:
            self.total[trainer.global_step] = norm


class Dump(pl.Callback):
    def __init__(self, out: Path, guard: GradientGuard, norms: WholeNorms) -> None:
        self.out, self.guard, self.norms = out, guard, norms

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {
                "events": [e.to_dict() for e in self.guard.event_log.events],
                "trace": dict(self.guard.event_log.traces.get("grad_norm", [])),
                "whole": self.norms.total,
                "steps": optimizer_steps(trainer.optimizers[0]),
                "sigma": {k: v for cb in trainer.callbacks if isinstance(cb, SpectralNormInjection)
                          for k, v in cb.event_log.traces.items()},
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )  # fmt: skip


class Projected(ShardedFaultyModule):
    """``ShardedFaultyModule`` with an ``output_proj`` layer (for spectral norm)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.output_proj = nn.Linear(self.out_dim, self.out_dim)

    def forward(self, x):
        return self.output_proj(self.net(x))


def _strategy(kind: str):
    if kind == "fsdp1":
        return SpawnFSDP(auto_wrap_policy={nn.Linear}, use_orig_params=True)
    return ShardedSpawnStrategy()


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
def test_inf_in_one_ranks_gradient_shard_skips_that_step_on_every_gpu(tmp_path, kind):
    guard, norms = GradientGuard(), WholeNorms()
    callbacks = [ShardFault("net.0.weight", {3}, rank=1), guard, norms, SpectralNormInjection("output_proj")]
    torch.manual_seed(0)
    module = Projected(optimizer="adamw", out_dim=3)
    trainer = make_trainer(
        tmp_path, [*callbacks, Dump(tmp_path, guard, norms)], accelerator="cuda", devices=2, strategy=_strategy(kind),
        max_steps=6, use_distributed_sampler=False, log_every_n_steps=1, deterministic=False,
    )  # fmt: skip
    trainer.fit(module)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for r in ranks:
        assert [(e["step"], e["kind"]) for e in r["events"]] == [(3, "skip")]
        assert "net.0.weight" in r["events"][0]["data"]["nonfinite_params"]
        assert set(r["steps"]) == {5.0}
        for s, whole in r["whole"].items():
            assert r["trace"][s] == pytest.approx(whole, rel=1e-4)
        assert r["sigma"]  # sigma estimates from the gathered weight
    assert ranks[0]["trace"] == ranks[1]["trace"]
    assert ranks[0]["sigma"] == ranks[1]["sigma"]


class NoSync(pl.Callback):
    """Around the guard's hook: ``set_sync_debug_mode("error")`` on steps that are not the guard's read steps."""

    def __init__(self, before: bool, every: int) -> None:
        self.before, self.every = before, every

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        quiet = step > 0 and (step + 1) % self.every != 0
        torch.cuda.set_sync_debug_mode("error" if self.before and quiet else "default")


def test_sync_free_sharded_guard_makes_no_host_sync_on_gpu(tmp_path):
    guard, norms = GradientGuard(sync_free=True, log_every_n_steps=4), WholeNorms()
    callbacks = [ShardFault("net.0.weight", {5}, rank=1), NoSync(True, 4), guard, NoSync(False, 4), norms]
    torch.manual_seed(0)
    module = ShardedFaultyModule(optimizer="adamw", out_dim=3, fused=True)
    trainer = make_trainer(
        tmp_path, [*callbacks, Dump(tmp_path, guard, norms)], accelerator="cuda", devices=2,
        strategy=ShardedSpawnStrategy(), max_steps=8, use_distributed_sampler=False, deterministic=False,
    )  # fmt: skip
    trainer.fit(module)  # a host sync inside the guard's hook on a quiet step raises
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for r in ranks:
        assert [(e["step"], e["kind"], e["data"]["last_skip_step"]) for e in r["events"]] == [(7, "skip", 5)]
        assert set(r["steps"]) == {7.0}
