"""Distributed: ``ddp_spawn`` with 2 CPU processes, the whole stack on the codec and the cascade, faults injected on
rank 1 only. Every run is bounded by ``pytest.mark.timeout`` (a rank that disagreed would hang in the next collective);
each rank writes its final parameters and every callback's state to ``tmp_path``, and the main process asserts that
both ranks hold bit-identical parameters and took identical decisions.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests.helpers import FAULT_WARNINGS, make_trainer
from tests.reliability._stack import full_stack, loader, make_module, record_fault, stack_state

pytestmark = [pytest.mark.ddp, *FAULT_WARNINGS]  # faults on one rank: the guard's notices are expected


class RankDump(pl.Callback):
    """Each rank saves what the assertions need after every batch and at the end of training (when one rank raises,
    ``torch.multiprocessing.spawn`` terminates the others, so an ``on_exception`` record is not guaranteed)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def _dump(self, trainer, pl_module, status: str) -> None:
        state = {
            "status": status,
            "global_step": trainer.global_step,
            "should_stop": bool(trainer.should_stop),
            "module": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "callbacks": stack_state(trainer.callbacks),
            "weights": pl_module.loss_weights.as_dict(),
            "injected": list(pl_module.injected),
        }
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._dump(trainer, pl_module, "running")

    def on_train_end(self, trainer, pl_module):
        self._dump(trainer, pl_module, "finished")


def _ddp(tmp_path, kind, faults, *, guard=None, max_steps=10, n=32):
    module = make_module(kind, faults, fault_ranks={1})
    stack = full_stack(kind, tmp_path / "report", guard=guard)
    trainer = make_trainer(
        tmp_path,
        [*stack, RankDump(tmp_path)],
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=max_steps,
    )
    error = None
    try:
        trainer.fit(module, loader(kind, n=n))
    except Exception as err:  # noqa: BLE001 - the ranks' own records say what happened
        error = err
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return ranks, error


def _decisions(state: dict) -> dict:
    """Everything a callback decided (not the per-rank loss values it traced): events, counters, weights."""
    out = {}
    for key, cb in state["callbacks"].items():
        log = cb.get("event_log", {})
        out[key] = {
            "events": [(e["step"], e["kind"], e["reason"]) for e in log.get("events", [])],
            "num_events": log.get("num_events"),
        }
        for name in ("weight", "history", "num_rejected", "num_spikes", "num_changes", "optimizers", "num_rollbacks"):
            if name in cb:
                out[key][name] = cb[name]
    return out


def _assert_ranks_agree(ranks: list[dict]) -> None:
    a, b = ranks
    assert a["global_step"] == b["global_step"]
    for k in a["module"]:
        x, y = a["module"][k], b["module"][k]
        assert torch.equal(torch.nan_to_num(x, 7.0), torch.nan_to_num(y, 7.0)), k
    assert _decisions(a) == _decisions(b)
    assert a["weights"] == b["weights"]


def _finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state["module"].values() if v.is_floating_point())


@pytest.mark.timeout(180)
def test_codec_faults_on_one_rank_are_skipped_on_both(tmp_path):
    faults = {"nan_batch": {2}, "inf_grad": {4}, "spike": {7}}
    # a x1000 spike on one rank is about x500 after DDP's average: with the codec's healthy norms of 17-35 that sits
    # right at the stack's max_norm of 1e4, so the bound is 1e3 here (as in the sharded rows), 30x the healthy norm
    ranks, error = _ddp(tmp_path, "codec", faults, guard={"max_norm": 1e3})
    assert error is None
    assert ranks[0]["injected"] == []  # rank 0 saw clean data...
    assert [s for s, _ in ranks[1]["injected"]] == [2, 4, 7]  # ...rank 1 all three faults
    _assert_ranks_agree(ranks)
    guard = next(v for k, v in ranks[0]["callbacks"].items() if k.startswith("GradientGuard"))
    assert [e["step"] for e in guard["event_log"]["events"] if e["kind"] == "skip"] == [2, 4, 7]
    adaptive = next(v for k, v in ranks[0]["callbacks"].items() if k.startswith("AdaptiveLossWeight"))
    assert adaptive["num_rejected"] == 1  # the rank-averaged term was NaN on both ranks at step 2
    assert all(_finite(r) for r in ranks)
    for fault in faults:
        record_fault("ddp/one-rank", "codec", fault, "skip", 1, survived=all(_finite(r) for r in ranks))


@pytest.mark.timeout(180)
def test_cascade_nan_parameter_on_one_rank_rolls_back_both(tmp_path):
    # the NaN weight exists on rank 1 only (parameters differ across ranks!); the all-reduced gradient is NaN on both,
    # both skip, both roll back to their (identical) snapshots and the ranks agree again
    guard = {"max_consecutive_skips": 3, "snapshot_every": 2}
    ranks, error = _ddp(tmp_path, "cascade", {"nan_param": {5}}, guard=guard, max_steps=12)
    assert error is None
    _assert_ranks_agree(ranks)
    guard_state = next(v for k, v in ranks[0]["callbacks"].items() if k.startswith("GradientGuard"))
    kinds = [(e["step"], e["kind"]) for e in guard_state["event_log"]["events"]]
    assert (5, "rollback") in kinds  # at the first non-finite step: the weights themselves are non-finite
    assert all(_finite(r) for r in ranks)
    spectral = next(v for k, v in ranks[0]["callbacks"].items() if k.startswith("SpectralNormInjection"))
    assert len(spectral["wrapped"]) == 3
    record_fault("ddp/one-rank", "cascade", "nan_param", "rollback", 1, survived=all(_finite(r) for r in ranks))


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["codec", "cascade"])
def test_persistent_fault_on_one_rank_stops_both_ranks_without_a_hang(tmp_path, kind):
    guard = {"max_consecutive_skips": 3, "on_persistent": "stop"}
    ranks, error = _ddp(tmp_path, kind, {"inf_grad": set(range(3, 40))}, guard=guard, max_steps=40)
    assert error is None
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 6
    assert ranks[0]["should_stop"]
    assert ranks[1]["should_stop"]
    _assert_ranks_agree(ranks)
    record_fault("ddp/one-rank", kind, "inf_grad x37", "stop", 3, survived=all(_finite(r) for r in ranks))


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["codec", "cascade"])
def test_persistent_fault_on_one_rank_raises_on_both_ranks_without_a_hang(tmp_path, kind):
    guard = {"max_consecutive_skips": 3, "on_persistent": "raise"}
    ranks, error = _ddp(tmp_path, kind, {"nan_batch": set(range(3, 40))}, guard=guard, max_steps=40)
    assert error is not None
    assert "persistent trouble" in str(error)
    # both ranks got through the same batches (the third bad step raised on every rank, none hung in a collective)
    assert [r["status"] for r in ranks] == ["running", "running"]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 5
    _assert_ranks_agree(ranks)
    record_fault("ddp/one-rank", kind, "nan_batch x37", "raise", 3, survived=all(_finite(r) for r in ranks))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_cascade_transient_faults_on_one_rank(tmp_path):
    faults = {"nan_batch": {2}, "inf_grad": {4}, "spike": {7}}
    ranks, error = _ddp(tmp_path, "cascade", faults)
    assert error is None
    _assert_ranks_agree(ranks)
    assert all(_finite(r) for r in ranks)
    for fault in faults:
        record_fault("ddp/one-rank", "cascade", fault, "skip", 1, survived=all(_finite(r) for r in ranks))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_codec_nan_parameter_on_one_rank_rolls_back_both(tmp_path):
    guard = {"max_consecutive_skips": 3, "snapshot_every": 2}
    ranks, error = _ddp(tmp_path, "codec", {"nan_param": {5}}, guard=guard, max_steps=12)
    assert error is None
    _assert_ranks_agree(ranks)
    assert all(_finite(r) for r in ranks)
    assert math.isfinite(ranks[0]["weights"]["mel"])
    record_fault("ddp/one-rank", "codec", "nan_param", "rollback", 1, survived=all(_finite(r) for r in ranks))


def _ddp_resumable(tmp_path: Path, name: str, max_steps: int, ckpt: Path | None = None) -> dict:
    from lightning.pytorch.callbacks import ModelCheckpoint

    out = tmp_path / name
    out.mkdir()
    pl.seed_everything(0, verbose=False)
    module = make_module("codec", {"nan_batch": {2}}, fault_ranks={1})
    stack = full_stack("codec", out / "report")
    saver = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer = make_trainer(
        out,
        [*stack, saver, RankDump(out)],
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=max_steps,
        enable_checkpointing=True,
    )
    trainer.fit(module, loader("codec", n=32, resumable=True), ckpt_path=ckpt)
    return {r: torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mid_epoch_resume_under_ddp_equals_the_uninterrupted_run(tmp_path):
    """32 clips, 2 ranks, batches of 4: 4 batches per rank per epoch; the checkpoint of step 3 is mid-epoch. Lightning
    rebuilds the resumable loader with a DistributedSampler; each rank skips its own 3 consumed batches."""
    full = _ddp_resumable(tmp_path, "full", max_steps=7)
    _ddp_resumable(tmp_path, "first", max_steps=4)
    ckpt = tmp_path / "first" / "ckpt" / "epoch=0-step=3.ckpt"
    assert torch.load(ckpt, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"consumed": 3}
    ]
    resumed = _ddp_resumable(tmp_path, "resumed", max_steps=7, ckpt=ckpt)
    for r in (0, 1):
        assert resumed[r]["global_step"] == full[r]["global_step"] == 7
        for k, v in full[r]["module"].items():
            assert torch.equal(v, resumed[r]["module"][k]), (r, k)
        assert _decisions(full[r]) == _decisions(resumed[r])
    _assert_ranks_agree([resumed[0], resumed[1]])
    record_fault("kill_resume", "codec", "mid-epoch resume under ddp", "resume", 1, survived=True)


class _CountingModule(pl.LightningModule):
    """Updates a torchmetrics sum once per step and saves its rank-local value at the end."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        from torchmetrics import SumMetric

        self.out = out
        self.lin = torch.nn.Linear(2, 1)
        self.count = SumMetric()

    def training_step(self, batch, batch_idx):
        self.count.update(torch.tensor(1.0))
        return self.lin(batch).sum()

    def on_train_end(self) -> None:
        torch.save(float(self.count.sum_value), self.out / f"count{self.global_rank}.pt")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(12, 2), batch_size=2)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_spawned_ranks_do_not_share_metric_state(tmp_path):
    # The harness itself: without SpawnStrategy.setup's copies both ranks update one shared storage (read 6, not 3),
    # and every DDP test of a metric's reduction would count each rank's data twice.
    trainer = make_trainer(tmp_path, accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3)
    trainer.fit(_CountingModule(tmp_path))
    assert [torch.load(tmp_path / f"count{r}.pt") for r in (0, 1)] == [3.0, 3.0]
