"""The other callbacks under ``ModelParallelStrategy`` (FSDP2, 2 CPU processes): each run is compared with the same
model on one device seeing the same samples (see ``test_gradient_guard_sharded``), and the ranks with each other."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_stability.callbacks import AdaptiveLossWeight, ScaleFactorClamp, SpectralNormInjection, StabilityReport
from lightning_stability.callbacks._events import EventLog
from lightning_stability.losses import LossWeights
from lightning_stability.nn.spectral import inject_spectral_norm
from tests._helpers_fsdp import ShardedFaultyModule, full_state, load_ranks, sharded_trainer
from tests.helpers import make_trainer
from tests.reliability._stack import stack_state

pytestmark = [pytest.mark.fsdp, pytest.mark.timeout(300)]


class ScaledModule(ShardedFaultyModule):
    """Learnable output scales (3 elements: rank 1's shard holds one; 1 element: rank 1's shard is empty) and two
    loss terms combined by ``loss_weights``."""

    def __init__(self, **kw) -> None:
        super().__init__(out_dim=3, **kw)
        self.output_scale = nn.Parameter(torch.tensor([3.0, 0.5, 1.0]))
        self.gain_output_scale = nn.Parameter(torch.tensor([1.2]))
        self.loss_weights = LossWeights({"mse": 1.0, "l1": 0.5})

    def compute(self, batch) -> dict:
        x, y = batch
        preds = self(x) * self.output_scale * self.gain_output_scale
        losses = {"mse": nn.functional.mse_loss(preds, y), "l1": nn.functional.l1_loss(preds, y)}
        loss = self.loss_weights.weighted_sum(losses)
        return {"loss": loss, "losses": {k: v.detach() for k, v in losses.items()}}


class RankNote(pl.Callback):
    """A rank-local event source: an event at step 2 on rank 1 only, and one at step 3 on every rank."""

    state_key = "RankNote"

    def __init__(self) -> None:
        self.event_log = EventLog(source="RankNote")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3 and trainer.global_rank == 1:
            self.event_log.add(2, "note", "rank 1 saw something")
        if trainer.global_step == 4:
            self.event_log.add(3, "note", "every rank saw this")


class StateDump(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        state = {"full": full_state(pl_module), "callbacks": stack_state(trainer.callbacks)}
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")


def _stack(report_dir: Path) -> list[pl.Callback]:
    return [
        AdaptiveLossWeight("mse", base_weight=1.0, min_weight=0.5, max_weight=5.0, warmup_steps=2, cooling_steps=1,
                           variance_window=3),
        ScaleFactorClamp(warn_after_steps=2, log_every_n_steps=2),
        RankNote(),
        StabilityReport(dirpath=report_dir, log_to_wandb=False, print_summary=False, flush_every_n_steps=3),
    ]  # fmt: skip


def _by_name(states: dict, name: str) -> dict:
    return next(v for k, v in states.items() if k.startswith(name))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:ScaleFactorClamp. learnable scale .* starts at:UserWarning")  # on purpose,
@pytest.mark.filterwarnings("ignore:ScaleFactorClamp. scale factor .* stayed above:UserWarning")  # and so it grows
def test_adaptive_weight_scale_clamp_and_report_match_one_device(tmp_path):
    """AdaptiveLossWeight computes the whole model's gradient norm itself (no guard), ScaleFactorClamp projects and
    averages the sharded learnable scales (one shard empty), StabilityReport (rank 0) holds rank 1's own event."""
    torch.manual_seed(0)
    module = ScaledModule(lr=5e-2)
    sharded_trainer(tmp_path, [*_stack(tmp_path / "report"), StateDump(tmp_path)], max_steps=12).fit(module)
    ranks = load_ranks(tmp_path)

    torch.manual_seed(0)
    reference = ScaledModule(lr=5e-2, batch_size=16)
    ref_stack = _stack(tmp_path / "ref_report")
    make_trainer(tmp_path / "ref", ref_stack, max_steps=12).fit(reference)
    ref_states = stack_state(ref_stack)

    for k, v in reference.state_dict().items():
        torch.testing.assert_close(ranks[0]["full"][k], v, rtol=1e-4, atol=1e-6)
    assert ranks[0]["full"]["output_scale"].min() >= 0.7
    assert ranks[0]["full"]["output_scale"].max() <= 1.5
    for r in ranks:
        adaptive, ref_adaptive = _by_name(r["callbacks"], "AdaptiveLossWeight"), _by_name(ref_states, "Adaptive")
        for key in ("num_changes", "num_spikes", "last_decision", "observed"):
            assert adaptive[key] == ref_adaptive[key], key
        assert adaptive["weight"] == pytest.approx(ref_adaptive["weight"], rel=1e-6)
        assert adaptive["history"] == ref_adaptive["history"]  # [[step, weight before the change], ...]
        assert adaptive["grad_window"] == pytest.approx(ref_adaptive["grad_window"], rel=1e-4)  # the whole norm
        clamp, ref_clamp = _by_name(r["callbacks"], "ScaleFactorClamp"), _by_name(ref_states, "ScaleFactorClamp")
        events = [(e["step"], e["kind"], e["data"].get("name")) for e in clamp["event_log"]["events"]]
        assert events == [(e["step"], e["kind"], e["data"].get("name")) for e in ref_clamp["event_log"]["events"]]
        init = {e["data"]["name"]: e["data"] for e in clamp["event_log"]["events"] if e["kind"] == "scale_init"}
        assert (init["output_scale"]["min"], init["output_scale"]["max"]) == (0.5, 3.0)
        for name, trace in ref_clamp["event_log"]["traces"].items():
            got = clamp["event_log"]["traces"][name]
            assert [s for s, _ in got] == [s for s, _ in trace]
            assert [v for _, v in got] == pytest.approx([v for _, v in trace], rel=1e-4, abs=1e-6), name
    # every rank holds the same records of the sharded scales (so rank 0's checkpointed state resumes anywhere)
    assert _by_name(ranks[0]["callbacks"], "ScaleFactorClamp") == _by_name(ranks[1]["callbacks"], "ScaleFactorClamp")

    report = json.loads((tmp_path / "report" / "stability_report.json").read_text())
    notes = report["sources"]["RankNote"]["events"]
    assert [(e["step"], e["reason"], e["data"].get("rank")) for e in notes] == [
        (2, "rank 1 saw something", 1),
        (3, "every rank saw this", None),
    ]
    assert report["sources"]["RankNote"]["num_events"] == {"note": 2}


def test_spectral_norm_refuses_a_layer_that_is_already_sharded():
    """Applied after sharding, spectral norm would run its power iteration on a shard: a clear error with the order."""
    layer = nn.Linear(4, 4)
    layer.weight._fsdp_flattened = True  # what FSDP1 marks its flat-parameter views with
    model = nn.Sequential()
    model.output_proj = layer
    with pytest.raises(RuntimeError, match=r"already sharded.*before sharding.*`__init__`.*before `fully_shard`"):
        inject_spectral_norm(model, "output_proj")


class LateLayerModule(ShardedFaultyModule):
    """Builds ``head.output_proj`` in ``configure_model`` and shards it there: too late for spectral norm."""

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        self.head = nn.Module()
        self.head.output_proj = nn.Linear(4, 4)
        fully_shard(self.head, mesh=self.device_mesh["data_parallel"])
        super().configure_model()


@pytest.mark.slow
def test_spectral_norm_on_a_layer_sharded_in_configure_model_fails_with_the_order_to_use(tmp_path):
    trainer = sharded_trainer(tmp_path, [SpectralNormInjection("*.output_proj")], max_steps=2)
    with pytest.raises(Exception, match=r"already sharded") as info:
        trainer.fit(LateLayerModule())
    assert "before `fully_shard`" in str(info.value)
