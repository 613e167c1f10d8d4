"""Sharded rows of the fault matrix: the codec and the cascade shard themselves with FSDP2 (``configure_model``) on 2
CPU processes under ``ModelParallelStrategy``, the whole callback stack on, every fault on rank 1 only.

Faults: a NaN batch, an inf written into rank 1's local shard of one gradient (rank 0's shard is clean), a x1000 loss
spike, a persistent fault the guard rolls back, and a NaN written into rank 1's shard of one weight. Each run is
bounded by ``pytest.mark.timeout`` (ranks that disagreed would hang in the next collective); each rank writes its
gathered parameters and every callback's state, and the main process checks that the ranks took identical decisions
and hold identical, finite parameters and replicated state (the codec's codebooks, spectral norm's ``u``/``v``).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests._helpers_fsdp import ShardFault, full_state, sharded_trainer
from tests.reliability._stack import full_stack, loader, make_module, record_fault, stack_state

pytestmark = [pytest.mark.fsdp, pytest.mark.slow, pytest.mark.timeout(400)]

# per-rank records of a forward pass, not state the ranks share (each rank scales its own batch)
_RANK_LOCAL = ("last_scale", "last_clamped_fraction")


class RankDump(pl.Callback):
    """Each rank saves what the assertions need at the end of training (a collective: every rank gathers)."""

    def __init__(self, out: Path, faults: list[ShardFault]) -> None:
        self.out, self.faults = out, faults

    def on_train_end(self, trainer, pl_module):
        state = {
            "global_step": trainer.global_step,
            "full": full_state(pl_module),
            "callbacks": stack_state(trainer.callbacks),
            "injected": list(pl_module.injected) + [(s, f.where) for f in self.faults for s in f.injected],
            "sharded": any(hasattr(p, "to_local") for p in pl_module.parameters()),
        }
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")


def _fsdp(tmp_path, kind, faults=None, shard_faults=(), *, guard=None, max_steps=10):
    module = make_module(kind, faults or {}, fault_ranks={1})
    stack = full_stack(kind, tmp_path / "report", guard=guard)
    trainer = sharded_trainer(
        tmp_path, [*shard_faults, *stack, RankDump(tmp_path, list(shard_faults))], max_steps=max_steps,
        use_distributed_sampler=True,
    )  # fmt: skip
    trainer.fit(module, loader(kind, n=32))
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def _guard(state: dict) -> dict:
    return next(v for k, v in state["callbacks"].items() if k.startswith("GradientGuard"))


def _events(state: dict) -> list[tuple[int, str]]:
    return [(e["step"], e["kind"]) for e in _guard(state)["event_log"]["events"]]


def _assert_ranks_agree(ranks: list[dict]) -> None:
    a, b = ranks
    assert a["sharded"]
    assert b["sharded"]
    assert a["global_step"] == b["global_step"]
    for k, v in a["full"].items():
        if not k.endswith(_RANK_LOCAL):
            assert torch.equal(v, b["full"][k]), k  # parameters gathered; codebooks and u/v replicated
    for key, state in a["callbacks"].items():
        other = b["callbacks"][key]
        events = [(e["step"], e["kind"], e["reason"]) for e in state["event_log"]["events"]]
        assert events == [(e["step"], e["kind"], e["reason"]) for e in other["event_log"]["events"]], key
        for name in ("weight", "history", "num_rejected", "num_spikes", "num_changes", "optimizers", "num_rollbacks"):
            assert state.get(name) == other.get(name), (key, name)


def _finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state["full"].values() if v.is_floating_point())


@pytest.mark.parametrize("kind", ["codec", "cascade"])
def test_transient_faults_on_one_rank_are_skipped_on_both(tmp_path, kind):
    """A NaN batch (step 2), inf in rank 1's shard of one gradient (step 4), a x1000 loss spike (step 6)."""
    param = (
        "decoder.model.0.conv.parametrizations.weight.original1" if kind == "codec" else "model.stages.0.in_proj.weight"
    )
    inf_grad = ShardFault(param, {4}, rank=1)
    ranks = _fsdp(tmp_path, kind, {"nan_batch": {2}, "spike": {6}}, [inf_grad], guard={"max_norm": 1e3})
    assert sorted(ranks[1]["injected"]) == [(2, "nan_batch"), (4, "grad"), (6, "spike")]
    assert ranks[0]["injected"] == []
    _assert_ranks_agree(ranks)
    assert [s for s, k in _events(ranks[0]) if k == "skip"] == [2, 4, 6]
    skip4 = next(e for e in _guard(ranks[0])["event_log"]["events"] if e["step"] == 4)
    assert skip4["data"]["nonfinite_params"] == [param]  # the whole-gradient norms name the corrupted parameter
    survived = all(_finite(r) for r in ranks)
    assert survived
    for fault in ("nan_batch", "inf_grad (rank 1's shard)", "spike x1000"):
        record_fault("fsdp2/one-rank", kind, fault, "skip", 1, survived=survived)


def test_persistent_fault_on_one_rank_rolls_back_both(tmp_path):
    """inf in rank 1's gradient shard at steps 3-6: the third skip in a row rolls every rank back to its own
    snapshot (parameters, optimizer shards, buffers), then training recovers."""
    inf_grad = ShardFault("model.stages.1.output_proj.parametrizations.weight.original", set(range(3, 7)), rank=1)
    guard = {"max_consecutive_skips": 3, "snapshot_every": 2, "skip_batches_after_rollback": 1}
    ranks = _fsdp(tmp_path, "cascade", shard_faults=[inf_grad], guard=guard, max_steps=12)
    _assert_ranks_agree(ranks)
    events = _events(ranks[0])
    assert (5, "rollback") in events
    assert _guard(ranks[0])["num_rollbacks"] == 1
    assert ranks[0]["global_step"] == 12
    survived = all(_finite(r) for r in ranks)
    assert survived
    record_fault("fsdp2/one-rank", "cascade", "inf_grad x4 (rank 1's shard)", "rollback", 4, survived=survived)


def test_nan_weight_shard_on_one_rank_rolls_back_both(tmp_path):
    """NaN written into rank 1's shard of one weight: every rank's forward all-gathers it, so both ranks see a NaN
    loss; the guard finds the weights themselves non-finite and rolls back at once (each rank restores its shard)."""
    nan_weight = ShardFault("encoder.model.0.conv.parametrizations.weight.original1", {5}, rank=1,
                            value=float("nan"), where="weight")  # fmt: skip
    ranks = _fsdp(tmp_path, "codec", shard_faults=[nan_weight], guard={"max_consecutive_skips": 3, "snapshot_every": 2})
    assert ranks[1]["injected"] == [(5, "weight")]
    _assert_ranks_agree(ranks)
    assert (5, "rollback") in _events(ranks[0])
    survived = all(_finite(r) for r in ranks)
    assert survived
    record_fault("fsdp2/one-rank", "codec", "nan weight (rank 1's shard)", "rollback", 1, survived=survived)
