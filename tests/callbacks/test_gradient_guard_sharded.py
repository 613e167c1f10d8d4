"""``GradientGuard`` under ``ModelParallelStrategy`` (FSDP2 ``fully_shard``, 2 CPU processes over gloo).

Each rank holds a shard of every parameter, gradient and optimizer state (rank 1's shards of the last layer are
empty). Every run is compared with the same model trained on one device with the same samples (two ranks at batch 8
see what one device sees at 16), so "the guard made the same decisions as unsharded" is checked on the weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_stability.callbacks import GradientGuard
from tests._helpers_fsdp import (
    GatheredNorms,
    ShardedFaultyModule,
    ShardFault,
    full_state,
    load_ranks,
    optimizer_steps,
    sharded_trainer,
)
from tests.helpers import make_trainer

pytestmark = [pytest.mark.fsdp, pytest.mark.timeout(300)]


class GuardDump(pl.Callback):
    """Each rank writes what the assertions need to ``out/rank{r}.pt`` at the end of training."""

    def __init__(self, out: Path, guard: GradientGuard, norms: GatheredNorms | None = None) -> None:
        self.out, self.guard, self.norms = out, guard, norms

    def on_train_end(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        torch.save(
            {
                "guard": self.guard.state_dict(),
                "events": [e.to_dict() for e in self.guard.event_log.events],
                "trace": dict(self.guard.event_log.traces.get("grad_norm", [])),
                "gathered": None if self.norms is None else self.norms.total,
                "steps": optimizer_steps(opt),
                "local_numel": {n: p.to_local().numel() for n, p in pl_module.named_parameters()},
                "full": full_state(pl_module),
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


def _reference(tmp_path, guard: GradientGuard, max_steps: int, **module_kw):
    """The same model on one device, batch 16; returns (final parameters, guard)."""
    torch.manual_seed(0)
    module = ShardedFaultyModule(batch_size=16, **module_kw)
    trainer = make_trainer(tmp_path / "reference", [guard], max_steps=max_steps)
    trainer.fit(module)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, guard


def test_inf_in_one_ranks_gradient_shard_skips_that_step_on_every_rank(tmp_path):
    """The issue's scenario: inf in rank 1's local shard of one gradient at step 3 of 8 (AdamW)."""
    guard, norms = GradientGuard(), GatheredNorms()
    fault = ShardFault("net.0.weight", {3}, rank=1)
    torch.manual_seed(0)
    module = ShardedFaultyModule(optimizer="adamw", out_dim=1)
    trainer = sharded_trainer(tmp_path, [fault, guard, norms, GuardDump(tmp_path, guard, norms)], max_steps=8)
    trainer.fit(module)
    ranks = load_ranks(tmp_path)

    for r in ranks:
        assert [(e["step"], e["kind"]) for e in r["events"]] == [(3, "skip")]
        assert r["events"][0]["data"]["nonfinite_params"] == ["net.0.weight"]  # named from the whole-gradient norms
        assert r["guard"]["optimizers"][0]["counters"]["num_skipped"] == 1
        assert r["steps"] and set(r["steps"]) == {7.0}  # AdamW: 8 optimizer steps, one skipped, on every shard
        # the guard's norm on every healthy step is the norm of the gathered full gradient
        healthy = [s for s in range(8) if s != 3]
        assert sorted(r["gathered"]) == healthy
        for s in healthy:
            assert r["trace"][s] == pytest.approx(r["gathered"][s], rel=1e-5)
        assert math.isinf(r["trace"][3]) or math.isnan(r["trace"][3])
        assert all(torch.isfinite(v).all() for v in r["full"].values())
    assert ranks[1]["local_numel"]["net.2.weight"] == 0 and ranks[1]["local_numel"]["net.2.bias"] == 0
    assert ranks[0]["trace"] == ranks[1]["trace"]
    for k in ranks[0]["full"]:
        assert torch.equal(ranks[0]["full"][k], ranks[1]["full"][k]), k

    # unsharded, one device, the same samples, inf at step 3: the same weights and the same norms
    ref_state, ref_guard = _reference(tmp_path, GradientGuard(), 8, optimizer="adamw", out_dim=1, inf_grad_steps={3})
    assert [e.step for e in ref_guard.event_log.events] == [3]
    for k, v in ref_state.items():
        torch.testing.assert_close(ranks[0]["full"][k], v, rtol=1e-5, atol=1e-6)
    ref_trace = dict(ref_guard.event_log.traces["grad_norm"])
    for s in healthy:
        assert ranks[0]["trace"][s] == pytest.approx(ref_trace[s], rel=1e-4)
    # the main process got the gathered weights back
    for k, v in module.state_dict().items():
        assert torch.equal(v, ranks[0]["full"][k]), k
