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
    HostReads,
    ShardedFaultyModule,
    ShardFault,
    full_state,
    load_ranks,
    optimizer_steps,
    sharded_trainer,
)
from tests.helpers import FAULT_WARNINGS, make_trainer

pytestmark = [pytest.mark.fsdp, pytest.mark.timeout(300), *FAULT_WARNINGS]  # injected faults: guard notices expected


class GuardDump(pl.Callback):
    """Each rank writes what the assertions need to ``out/rank{r}.pt`` at the end of training."""

    def __init__(self, out: Path, guard: GradientGuard, norms: GatheredNorms | None = None, reads=None) -> None:
        self.out, self.guard, self.norms, self.reads = out, guard, norms, reads
        self.shards: dict[int, dict] = {}  # this rank's local shards at the start of each step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        local = {n: p.detach().to_local().clone() for n, p in pl_module.named_parameters()}
        opt = trainer.optimizers[0]
        for i, state in enumerate(opt.state.values()):
            for k, v in state.items():
                local[f"optim.{i}.{k}"] = (v.to_local() if hasattr(v, "to_local") else v).detach().clone()
        self.shards[trainer.global_step] = local

    def on_train_end(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        torch.save(
            {
                "guard": self.guard.state_dict(),
                "events": [e.to_dict() for e in self.guard.event_log.events],
                "trace": dict(self.guard.event_log.traces.get("grad_norm", [])),
                "gathered": None if self.norms is None else self.norms.total,
                "steps": optimizer_steps(opt),
                "reads": None if self.reads is None else self.reads.per_step,
                "local_numel": {n: p.to_local().numel() for n, p in pl_module.named_parameters()},
                "shards": self.shards,
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
        assert r["steps"]
        assert set(r["steps"]) == {7.0}
        # the guard's norm on every healthy step is the norm of the gathered full gradient
        healthy = [s for s in range(8) if s != 3]
        assert sorted(r["gathered"]) == healthy
        for s in healthy:
            assert r["trace"][s] == pytest.approx(r["gathered"][s], rel=1e-5)
        assert math.isinf(r["trace"][3]) or math.isnan(r["trace"][3])
        assert all(torch.isfinite(v).all() for v in r["full"].values())
        # the skipped step left this rank's shards of the parameters and of the AdamW state bit-identical
        before, after = r["shards"][3], r["shards"][4]
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert not all(torch.equal(r["shards"][2][k], before[k]) for k in before if not k.startswith("optim"))
    assert ranks[1]["local_numel"]["net.2.weight"] == 0
    assert ranks[1]["local_numel"]["net.2.bias"] == 0
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


@pytest.mark.slow
def test_persistent_fault_on_one_rank_rolls_back_every_shard_like_an_unsharded_run(tmp_path):
    """inf in rank 1's shard at steps 4 and 5: two skips in a row roll back to the snapshot taken before step 3 (each
    rank restores its shard of the parameters and of the AdamW state, undoing the accepted step 3); the weights end
    where one device's end."""
    kw = {"max_consecutive_skips": 2, "on_persistent": "rollback", "snapshot_every": 3}
    guard = GradientGuard(**kw)
    torch.manual_seed(0)
    module = ShardedFaultyModule(optimizer="adamw", out_dim=1)
    fault = ShardFault("net.0.weight", {4, 5}, rank=1)
    sharded_trainer(tmp_path, [fault, guard, GuardDump(tmp_path, guard)], max_steps=10).fit(module)
    ranks = load_ranks(tmp_path)
    ref_state, ref_guard = _reference(tmp_path, GradientGuard(**kw), 10, optimizer="adamw", out_dim=1,
                                      inf_grad_steps={4, 5})  # fmt: skip
    expected = [(4, "skip"), (5, "skip"), (5, "rollback"), (5, "replay")]
    assert [(e.step, e.kind) for e in ref_guard.event_log.events] == expected
    assert ref_guard.event_log.events[3].data["cause"] == "data"  # one device: the replayed step's inf came back
    for r in ranks:
        assert [(e["step"], e["kind"]) for e in r["events"]] == expected
        assert r["events"][2]["data"]["to_step"] == 3
        assert r["events"][3]["data"]["cause"] == "unavailable"  # sharded parameters: not replayed, said so
        assert set(r["steps"]) == {7.0}  # steps 0-2, then 6-9: the rollback undid step 3 on every shard
        for k, v in ref_state.items():
            torch.testing.assert_close(r["full"][k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sync_free_mode_reads_nothing_back_between_log_steps_when_sharded(tmp_path):
    """Fused AdamW, ``sync_free=True``: the sharded norm is an all-reduce on the device, the skip is ``found_inf``;
    the host reads the guard's state only every ``log_every_n_steps`` steps (and at the first, host-decided step)."""
    guard = GradientGuard(sync_free=True, log_every_n_steps=4)
    reads = HostReads()
    torch.manual_seed(0)
    module = ShardedFaultyModule(optimizer="adamw", out_dim=1, fused=True)
    fault = ShardFault("net.0.weight", {5}, rank=1)
    callbacks = [fault, reads.start, guard, reads.stop, GuardDump(tmp_path, guard, reads=reads)]
    sharded_trainer(tmp_path, callbacks, max_steps=8).fit(module)
    ranks = load_ranks(tmp_path)
    ref_state, ref_guard = _reference(tmp_path, GradientGuard(), 8, optimizer="adamw", out_dim=1, fused=True,
                                      inf_grad_steps={5})  # fmt: skip
    for r in ranks:
        # the read after step 7 reports the skip of step 5
        assert [(e["step"], e["kind"], e["data"]["last_skip_step"]) for e in r["events"]] == [(7, "skip", 5)]
        assert r["events"][0]["data"]["nonfinite_params"] == ["net.0.weight"]
        assert set(r["steps"]) == {7.0}
        quiet = {s: n for s, n in r["reads"].items() if s not in (0, 3, 7)}  # first step, then reads after 3 and 7
        assert quiet == dict.fromkeys(quiet, 0), r["reads"]
        assert r["reads"][3] > 0
        for k, v in ref_state.items():
            torch.testing.assert_close(r["full"][k], v, rtol=1e-5, atol=1e-6)
