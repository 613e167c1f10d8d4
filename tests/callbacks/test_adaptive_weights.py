"""``AdaptiveLossWeight``: The seed table of docs/design.md (post-mortem 1) through a real Trainer, the old
controller's failure for
contrast, the decision table, state/resume, manual control, rank agreement and argument errors."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stability.callbacks import AdaptiveLossWeight
from lightning_stability.callbacks.adaptive_weights import Decision
from lightning_stability.losses import LossWeights
from tests.helpers import make_trainer, manual_optimization

CUDA = torch.cuda.is_available()

# --------------------------------------------------------------------------------------------------------------------
# Scenario module and scripts


class ScriptedLossModule(pl.LightningModule):
    """Follows the loss-dict protocol and reports scripted unweighted terms.

    ``scripts[name][i]`` is the value of term ``name`` at index ``i`` (the global step, or the batch index with
    ``by_batch``; per rank with ``rank_scripts``). The term is ``value * p / p.detach()``: exactly ``value``, with a
    gradient on the parameter ``p`` so the optimizer and the gradient norm are real. ``grad_gain[i]`` adds
    ``(p - p.detach()) * gain``: zero in value, ``gain`` more gradient. lr is 0, so ``p`` stays 1.
    """

    def __init__(
        self,
        scripts: dict[str, Sequence[float]],
        weights: dict[str, float] | None = None,
        *,
        rank_scripts: dict[int, dict[str, Sequence[float]]] | None = None,
        grad_gain: Sequence[float] | None = None,
        by_batch: bool = False,
        record_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(()))
        self.scripts = {k: list(v) for k, v in scripts.items()}
        self.rank_scripts = rank_scripts
        self.grad_gain = None if grad_gain is None else list(grad_gain)
        self.by_batch = by_batch
        self.record_dir = record_dir
        self.loss_weights = LossWeights(weights or dict.fromkeys(scripts, 1.0))
        self.records: list[dict] = []

    def _index(self, batch_idx: int) -> int:
        return self.trainer.fit_loop.total_batch_idx if self.by_batch else self.global_step

    def training_step(self, batch, batch_idx):
        i = self._index(batch_idx)
        scripts = self.rank_scripts[self.global_rank] if self.rank_scripts else self.scripts
        gain = self.p / self.p.detach()
        losses = {}
        for name, values in scripts.items():
            term = torch.tensor(values[i]) * gain
            if name == "mel" and self.grad_gain is not None:
                term = term + (self.p - self.p.detach()) * self.grad_gain[i]
            losses[name] = term
        total = self.loss_weights.weighted_sum(losses)
        self.records.append({"step": self.global_step, "weights": self.loss_weights.as_dict(), "total": total.item()})
        return {"loss": total, "losses": {k: v.detach() for k, v in losses.items()}}

    def on_train_end(self) -> None:
        if self.record_dir is not None:
            cb = next(c for c in self.trainer.callbacks if isinstance(c, AdaptiveLossWeight))
            out = {"records": self.records, "state": cb.state_dict()}
            Path(self.record_dir, f"rank{self.global_rank}.json").write_text(json.dumps(out))

    def on_before_optimizer_step(self, optimizer) -> None:
        # (after the callbacks' hook has seen the gradients) keep `p` at 1 even after a NaN step: lr 0 times NaN is NaN
        for p in self.parameters():
            p.grad = None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        n = max(len(v) for v in self.scripts.values())
        return DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=1)


def seed_table_losses(n: int = 500) -> list[float]:
    """The seed table of docs/design.md (post-mortem 1), read under the controller's rules.

    The table's "gradual -4 %" is the loss trajectory: the mel loss sits at 2.0 / 0.96**6 = 2.555 (±1 % noise) until
    step 150, then falls by 4 % every 25 steps (smoothly) to 2.0 at step 300, and stays at 2.0 (±1 %): 2.0 exactly at
    step 349, 100.0 at step 350. Under the defaults this gives: hold at 2.5 through warm-up and the plateau (ratio about
    1); once the decline has pulled the ratio below 0.9 (about 95 steps into it: the 0.99 average lags), a -5 % step at
    step 245 (2.375) and, after the 50-step cooling, another at step 296 (2.256, "~2.2"); on the 2.0 plateau the
    average catches up, the ratio returns above 0.9 and the weight holds; the spike at 350 (ratio about 46) is damped
    to 2x the average and changes nothing.
    """
    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(n, generator=g) * 2 - 1).tolist()
    high, low = 2.0 / 0.96**6, 2.0
    losses = []
    for t in range(n):
        if t < 150:
            level = high
        elif t < 300:
            level = high * 0.96 ** ((t - 150) / 25)
        else:
            level = low
        losses.append(level * (1 + 0.01 * noise[t]))
    losses[349], losses[350] = 2.0, 100.0
    return losses


def f32(x: float) -> float:
    """``x`` rounded to fp32, as the module reports it."""
    return float(torch.tensor(x, dtype=torch.float32))


def f32_mean(a: float, b: float) -> float:
    """The mean of two fp32 values as the callback forms it (fp32 sum, then / 2)."""
    return float((torch.tensor(a, dtype=torch.float32) + torch.tensor(b, dtype=torch.float32)) / 2)


def same_state(a: dict, b: dict) -> bool:
    """State dicts equal, NaN included."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def change_steps(cb: AdaptiveLossWeight) -> list[int]:
    return [e.step for e in cb.event_log.events if e.kind in ("increase", "decrease")]


def replay(cb: AdaptiveLossWeight, losses: Sequence[float]) -> list[float]:
    """The weight in effect at each step, replaying ``losses`` through ``cb._observe`` with the callback's timing.

    Step ``t`` is decided at the end of step ``t + 1`` against the reference published before step ``t`` (the
    average after step ``t - 2``), so a change decided about step ``t`` is in effect from step ``t + 2``.
    """
    weights, published, pending = [], None, None
    for t, loss in enumerate(losses):
        weights.append(cb.weight)
        reference = published
        if pending is not None:
            cb._observe(*pending)
            published = cb.avg
        pending = (t, f32(loss), None, reference)
    return weights


# --------------------------------------------------------------------------------------------------------------------
# The seed table and the old controller


class OldTanhController(Callback):
    """The controller the post-mortem replaced (kept only for contrast).

    Every step: ``f = clip(0.5 + 0.5 * tanh(loss / avg - 1), 0.8, 1.2)``, ``weight = clip(weight / f, 1, 5)``.
    ``0.5 + 0.5 tanh(r - 1)`` is below 1 for every ratio, so after the clip the weight grows by up to 25 % a step
    whatever the loss does: dividing by the factor is the reading under which the weight "climbed to its ceiling while
    the loss fell", as the post-mortem reports. There is no damping and no spike handling.
    """

    def __init__(self, base_weight: float = 2.5) -> None:
        self.weight = base_weight
        self.avg: float | None = None

    def on_train_start(self, trainer, pl_module):
        pl_module.loss_weights["mel"] = self.weight

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = float(outputs["losses"]["mel"])
        self.avg = loss if self.avg is None else 0.99 * self.avg + 0.01 * loss
        factor = min(max(0.5 + 0.5 * math.tanh(loss / self.avg - 1), 0.8), 1.2)
        self.weight = min(max(self.weight / factor, 1.0), 5.0)
        pl_module.loss_weights["mel"] = self.weight


def test_seed_table_through_a_real_trainer(tmp_path):
    losses = seed_table_losses()
    module = ScriptedLossModule({"mel": losses})
    cb = AdaptiveLossWeight("mel")  # every default: base 2.5, [1, 5], warm-up 100, cooling 50, ...
    make_trainer(tmp_path, [cb], max_steps=len(losses)).fit(module)

    weights = [r["weights"]["mel"] for r in module.records]
    totals = [r["total"] for r in module.records]
    assert len(weights) == 500
    assert all(math.isfinite(t) for t in totals)
    assert all(1.0 <= w <= 5.0 for w in weights)
    # steps 0-150 hold at 2.5
    assert weights[: 151 + 2] == [2.5] * 153
    changes = change_steps(cb)
    assert changes == [245, 296]  # see seed_table_losses for why these two
    assert changes[0] >= 100
    assert all(b - a > 50 for a, b in zip(changes, changes[1:]))
    # every change <= 5 %, and a change decided about step t is in effect from step t + 2
    moves = [(t, a, b) for t, (a, b) in enumerate(zip(weights, weights[1:]), start=1) if a != b]
    assert [t - 2 for t, _, _ in moves] == changes
    assert all(abs(b / a - 1) <= 0.05 + 1e-12 for _, a, b in moves)
    assert weights[-1] == pytest.approx(2.5 * 0.95**2)  # ~2.2 by step 500
    assert 2.1 < weights[-1] < 2.3

    # the spike: damped by 2 / ratio on the device in the same step, weight unchanged
    (spike,) = [e for e in cb.event_log.events if e.kind == "spike"]
    assert spike.step == 350
    assert cb.num_spikes == 1
    avg = losses[0]  # the reference of step 350 is the average after step 348, computed here by hand
    for value in losses[1:349]:
        avg = 0.99 * avg + 0.01 * value
    ratio = losses[350] / avg
    assert spike.data["reference"] == pytest.approx(avg, rel=1e-6)
    assert spike.data["ratio"] == pytest.approx(ratio, rel=1e-6)
    w350 = weights[350]
    assert totals[350] == pytest.approx(w350 * losses[350] * (2.0 / ratio), rel=1e-5)
    assert totals[350] == pytest.approx(w350 * 2.0 * avg, rel=1e-5)
    assert totals[349] == pytest.approx(w350 * 2.0, rel=1e-6)  # the step before: undamped
    assert weights[349:] == [w350] * (500 - 349)
    # without the spike the weight trajectory is the same: the spike left no trace on the weight
    calm = list(losses)
    calm[350] = calm[351]
    assert replay(AdaptiveLossWeight("mel", grad_growth=None), calm) == weights


def test_old_controller_rides_to_the_ceiling_and_lets_the_spike_through(tmp_path):
    losses = seed_table_losses(360)
    module = ScriptedLossModule({"mel": losses})
    make_trainer(tmp_path, [OldTanhController()], max_steps=len(losses)).fit(module)
    weights = [r["weights"]["mel"] for r in module.records]
    totals = [r["total"] for r in module.records]
    # at the ceiling within a handful of steps, and still there while the loss falls 150 -> 300
    first_at_ceiling = weights.index(5.0)
    assert first_at_ceiling < 10
    assert all(w == 5.0 for w in weights[first_at_ceiling:])
    assert losses[299] < 0.8 * losses[149]
    # the 50x spike goes straight into the total: 5 x 100 = 500, against ~2.26 x 2 x 2.0 = 9 with the new controller
    assert totals[350] == pytest.approx(5.0 * 100.0)
    assert totals[350] / totals[349] == pytest.approx(50.0, rel=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# The decision table


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ({"ratio": 2.5}, Decision.SPIKE),
        ({"ratio": 2.5, "frozen": True, "observed": 1}, Decision.SPIKE),
        ({"ratio": 1.5, "frozen": True}, Decision.FROZEN),
        ({"ratio": 1.5, "observed": 100}, Decision.WARMUP),
        ({"ratio": 1.5, "since_change": 50}, Decision.COOLING),
        ({"ratio": 1.5, "variance": 0.51}, Decision.HIGH_VARIANCE),
        ({"ratio": 1.11}, Decision.INCREASE),
        ({"ratio": 1.11, "grad_growing": True}, Decision.DECREASE),
        ({"ratio": 0.89}, Decision.DECREASE),
        ({"ratio": 1.0, "grad_growing": True}, Decision.DECREASE),
        ({"ratio": 1.0}, Decision.HOLD),
        ({"ratio": 1.1}, Decision.HOLD),
        ({"ratio": 0.9}, Decision.HOLD),
        ({"ratio": 1.5, "variance": 0.5}, Decision.INCREASE),
        ({"ratio": 1.5, "observed": 101, "since_change": 51}, Decision.INCREASE),
    ],
)
def test_evaluate_decision_table(inputs, expected):
    cb = AdaptiveLossWeight()
    args = {"ratio": 1.0, "variance": 0.0, "grad_growing": False, "observed": 500, "since_change": 500}
    args["frozen"] = False
    args.update(inputs)
    decision, reason = cb._evaluate(**args)
    assert decision is expected
    assert reason


def test_decision_codes_are_the_documented_mapping():
    assert {d.name: int(d) for d in Decision} == {
        "DECREASE": -1,
        "HOLD": 0,
        "INCREASE": 1,
        "SPIKE": 2,
        "REJECTED": 3,
        "WARMUP": 4,
        "COOLING": 5,
        "HIGH_VARIANCE": 6,
        "FROZEN": 7,
        "INVALID": 8,
    }


def test_non_finite_losses_are_rejected_counted_and_never_averaged():
    cb = AdaptiveLossWeight(warmup_steps=0, cooling_steps=0)
    cb._observe(0, 2.0)
    for step, bad in enumerate([math.nan, math.inf, -math.inf], start=1):
        if bad < 0:
            with pytest.warns(UserWarning, match=r"the `mel` term is negative \(-inf\); it is rejected"):
                assert cb._observe(step, bad)[0] is Decision.REJECTED
        else:
            assert cb._observe(step, bad)[0] is Decision.REJECTED
    assert cb.num_rejected == 3
    assert cb.avg == 2.0
    assert cb.observed == 1
    assert [e.kind for e in cb.event_log.events] == ["rejected"]  # one event for the run of rejections
    assert cb.event_log.events[0].step == 1


def test_invalid_weight_is_rejected_at_the_bounds():
    cb = AdaptiveLossWeight(base_weight=4.9, warmup_steps=0, cooling_steps=0, grad_growth=None)
    cb._observe(0, 1.0)
    decision, reason = cb._observe(1, 1.5)  # ratio 1.5 -> increase to 5.145 > 5: rejected
    assert decision is Decision.INVALID
    assert "outside [1, 5]; kept 4.9" in reason
    assert cb.weight == 4.9
    assert cb.num_invalid == 1


def test_high_relative_variance_gates_changes():
    values = [1.0, 1.9, 0.2, 1.9, 0.2]  # the last window [1.9, 0.2, 1.9, 0.2]: relative variance 0.655
    gated = AdaptiveLossWeight(warmup_steps=0, cooling_steps=0, variance_window=4, grad_growth=None)
    free = AdaptiveLossWeight(warmup_steps=0, cooling_steps=0, variance_window=4, variance_limit=math.inf)
    for step, value in enumerate(values):
        gated._observe(step, value)
        free._observe(step, value)
    assert gated.last_variance == pytest.approx(0.7225 / 1.05**2)
    assert gated.last_decision is Decision.HIGH_VARIANCE
    assert free.last_decision is Decision.DECREASE


# --------------------------------------------------------------------------------------------------------------------
# Gradient-norm awareness


class FakeGuard(Callback):
    """Duck-types ``GradientGuard.last_grad_norm`` with a scripted norm per step."""

    def __init__(self, norms):
        self.norms = norms
        self.last_grad_norm = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.last_grad_norm = torch.tensor(self.norms[trainer.global_step])


def growing(n: int, start: int, rate: float = 1.1) -> list[float]:
    return [1.0 if t < start else rate ** (t - start) for t in range(n)]


@pytest.mark.parametrize("source", ["own", "guard"])
def test_growing_gradient_norm_decreases_the_weight(tmp_path, source):
    n = 40
    flat = [1.0] * n  # ratio 1: the loss alone would hold
    kwargs = {"warmup_steps": 5, "cooling_steps": 3, "variance_window": 5}
    if source == "own":
        module = ScriptedLossModule({"mel": flat}, grad_gain=growing(n, 15))
        callbacks = [AdaptiveLossWeight(**kwargs)]
    else:
        module = ScriptedLossModule({"mel": flat})  # its own gradients are constant
        callbacks = [AdaptiveLossWeight(**kwargs), FakeGuard(growing(n, 15))]
    make_trainer(tmp_path, callbacks, max_steps=n).fit(module)
    cb = callbacks[0]
    decreases = [e for e in cb.event_log.events if e.kind == "decrease"]
    assert decreases
    assert all("gradient norm growing" in e.reason for e in decreases)
    assert decreases[0].step > 15
    assert cb.weight < 2.5
    # without gradient awareness the same run holds
    module = ScriptedLossModule({"mel": flat}, grad_gain=growing(n, 15))
    quiet = AdaptiveLossWeight(grad_growth=None, **kwargs)
    make_trainer(tmp_path, [quiet], max_steps=n).fit(module)
    assert quiet.num_changes == 0


def test_reads_the_norm_of_a_real_gradient_guard_instead_of_computing_it(tmp_path, monkeypatch):
    from lightning_stability.callbacks import GradientGuard, adaptive_weights

    def not_expected(grads):
        raise AssertionError("the norm should come from the guard")

    monkeypatch.setattr(adaptive_weights, "_total_grad_norm", not_expected)
    guard = GradientGuard()
    cb = AdaptiveLossWeight(warmup_steps=2)
    module = ScriptedLossModule({"mel": [1.0] * 6}, grad_gain=[3.0] * 6)
    make_trainer(tmp_path, [cb, guard], max_steps=6).fit(module)
    assert cb._guard is guard
    assert cb.grad_avg == pytest.approx(2.5 * (1.0 + 3.0))  # d total / dp = w * (value + gain)
    assert cb.observed == 5


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="fp16 AMP with a GradScaler needs CUDA (Lightning turns CPU 16-mixed into bf16)")
@pytest.mark.parametrize("fused", [False, True])
def test_own_gradient_norm_is_unscaled_under_fp16_amp(tmp_path, fused):
    class Fused(ScriptedLossModule):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.0, fused=fused)

    module = Fused({"mel": [1.0] * 6}, grad_gain=[3.0] * 6)
    cb = AdaptiveLossWeight(warmup_steps=2)
    make_trainer(tmp_path, [cb], max_steps=6, precision="16-mixed", accelerator="gpu").fit(module)
    # d(total)/dp = w * (value + gain) = 2.5 * (1 + 3): the GradScaler's 2**16 is divided back out
    assert cb.grad_avg == pytest.approx(2.5 * 4.0)


# --------------------------------------------------------------------------------------------------------------------
# Loop variants


def decline(n: int, rate: float = 0.97) -> list[float]:
    return [2.0 * rate**t for t in range(n)]


@pytest.mark.parametrize(
    "precision",
    [
        "32-true",
        "bf16-mixed",
        pytest.param("16-mixed", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="fp16 AMP needs CUDA")]),
    ],
)
def test_precisions_take_the_same_decisions(tmp_path, precision):
    module = ScriptedLossModule({"mel": decline(30)})
    cb = AdaptiveLossWeight(warmup_steps=5, cooling_steps=3)
    accelerator = "gpu" if precision == "16-mixed" else "cpu"
    make_trainer(tmp_path, [cb], max_steps=30, precision=precision, accelerator=accelerator).fit(module)
    expected = replay(AdaptiveLossWeight(warmup_steps=5, cooling_steps=3, grad_growth=None), decline(30))
    assert [r["weights"]["mel"] for r in module.records] == expected
    assert cb.num_changes >= 3


ManualModule = manual_optimization(ScriptedLossModule)


def test_manual_optimization(tmp_path):
    module = ManualModule({"mel": decline(30)})
    cb = AdaptiveLossWeight(warmup_steps=5, cooling_steps=3)
    make_trainer(tmp_path, [cb], max_steps=30).fit(module)
    expected = replay(AdaptiveLossWeight(warmup_steps=5, cooling_steps=3, grad_growth=None), decline(30))
    assert [r["weights"]["mel"] for r in module.records] == expected
    assert cb.grad_avg is not None  # the norm was computed in on_before_optimizer_step


def test_gradient_accumulation_decides_once_per_optimizer_step_on_the_mean(tmp_path):
    per_batch = decline(60)
    module = ScriptedLossModule({"mel": per_batch}, by_batch=True)
    cb = AdaptiveLossWeight(warmup_steps=5, cooling_steps=3, grad_growth=None)
    make_trainer(tmp_path, [cb], max_steps=30, accumulate_grad_batches=2).fit(module)
    means = [f32_mean(per_batch[2 * i], per_batch[2 * i + 1]) for i in range(30)]
    expected = replay(AdaptiveLossWeight(warmup_steps=5, cooling_steps=3, grad_growth=None), means)
    assert [r["weights"]["mel"] for r in module.records][::2] == expected
    assert cb.observed == 29  # the 30th step is still pending
    assert cb.last_step == 28


def test_logs_weight_ratio_variance_and_decision(tmp_path):
    module = ScriptedLossModule({"mel": decline(12)})
    cb = AdaptiveLossWeight(warmup_steps=3, cooling_steps=2)
    logger = CSVLogger(tmp_path, name="csv")
    make_trainer(tmp_path, [cb], max_steps=12, logger=logger, log_every_n_steps=1).fit(module)
    rows = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    for key in ("weight", "ratio", "variance", "decision"):
        assert f"adaptive/mel/{key}" in header
    col = header.index("adaptive/mel/decision")
    codes = [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]]
    assert len(codes) == 11  # one per decided step
    assert codes[:3] == [Decision.WARMUP] * 3
    assert Decision.DECREASE in codes


def test_damping_is_off_during_validation_and_removed_after_fit(tmp_path):
    class WithVal(ScriptedLossModule):
        def validation_step(self, batch, batch_idx):
            total = self.loss_weights.weighted_sum({"mel": torch.tensor(1000.0)})
            self.val_totals.append(total.item())

        def val_dataloader(self):
            return DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=1)

    module = WithVal({"mel": [1.0] * 8})
    module.val_totals = []
    cb = AdaptiveLossWeight()
    make_trainer(tmp_path, [cb], max_steps=8, limit_val_batches=1, val_check_interval=4).fit(module)
    assert module.val_totals == [2500.0, 2500.0]  # undamped although 1000 > 2 x the running average
    assert module.loss_weights.damping("mel") is None


# --------------------------------------------------------------------------------------------------------------------
# State, resume, coexistence


def test_state_key_and_two_instances_coexist(tmp_path):
    mel, l1 = decline(40), [1.0 + 0.02 * t for t in range(40)]
    module = ScriptedLossModule({"mel": mel, "l1": l1}, {"mel": 2.5, "l1": 1.0})
    a = AdaptiveLossWeight("mel", warmup_steps=5, cooling_steps=3, grad_growth=None)
    b = AdaptiveLossWeight("l1", base_weight=1.5, warmup_steps=5, cooling_steps=3, grad_growth=None)
    assert a.state_key == "AdaptiveLossWeight{'loss': 'mel'}"
    assert b.state_key == "AdaptiveLossWeight{'loss': 'l1'}"
    trainer = make_trainer(tmp_path, [a, b], max_steps=40)
    trainer.fit(module)
    assert a.weight < 2.5  # mel fell: decreased
    assert b.weight > 1.5  # l1 rose: increased
    assert module.loss_weights.as_dict() == {"mel": a.weight, "l1": b.weight}
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    states = torch.load(tmp_path / "two.ckpt", weights_only=False)["callbacks"]
    assert states[a.state_key]["weight"] == a.weight
    assert states[b.state_key]["weight"] == b.weight
    assert a.event_log.source == a.state_key


def resume_script(n: int = 40) -> list[float]:
    losses = decline(n, 0.96)
    losses[23] = 50.0  # a spike just after the interruption
    losses[11] = math.nan  # a rejected step before it
    return losses


def test_resume_continues_with_the_identical_weight_trajectory(tmp_path):
    kwargs = {"warmup_steps": 4, "cooling_steps": 3, "variance_window": 4}
    full_module = ScriptedLossModule({"mel": resume_script()})
    full = AdaptiveLossWeight(**kwargs)
    make_trainer(tmp_path / "full", [full], max_steps=40).fit(full_module)

    first_module = ScriptedLossModule({"mel": resume_script()})
    first = AdaptiveLossWeight(**kwargs)
    trainer = make_trainer(tmp_path / "a", [first], max_steps=20)
    trainer.fit(first_module)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    second_module = ScriptedLossModule({"mel": resume_script()})
    second = AdaptiveLossWeight(**kwargs)
    make_trainer(tmp_path / "b", [second], max_steps=40).fit(second_module, ckpt_path=tmp_path / "half.ckpt")

    trajectory = [r["weights"]["mel"] for r in full_module.records]
    resumed = [r["weights"]["mel"] for r in first_module.records + second_module.records]
    assert resumed == trajectory
    assert full.num_changes >= 3
    assert full.num_spikes == 1
    assert full.num_rejected == 1
    assert same_state(second.state_dict(), full.state_dict())


def test_resume_from_a_checkpoint_saved_mid_run_with_a_step_in_flight(tmp_path):
    # ModelCheckpoint saves in on_train_batch_end after this callback launched the step's reduction: the in-flight
    # step is materialised into the checkpoint and decided after the resume exactly when the full run decides it
    kwargs = {"warmup_steps": 4, "cooling_steps": 3, "variance_window": 4}
    full_module = ScriptedLossModule({"mel": resume_script()})
    full = AdaptiveLossWeight(**kwargs)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=17, save_top_k=-1)
    make_trainer(tmp_path / "full", [full, saver], max_steps=40, enable_checkpointing=True).fit(full_module)
    ckpt = tmp_path / "ckpt" / "epoch=0-step=17.ckpt"
    saved = torch.load(ckpt, weights_only=False)["callbacks"][full.state_key]
    assert saved["pending"]["step"] == 16
    assert saved["last_step"] == 15

    resumed_module = ScriptedLossModule({"mel": resume_script()})
    resumed = AdaptiveLossWeight(**kwargs)
    make_trainer(tmp_path / "b", [resumed], max_steps=40).fit(resumed_module, ckpt_path=ckpt)
    trajectory = [r["weights"]["mel"] for r in full_module.records]
    assert [r["weights"]["mel"] for r in resumed_module.records] == trajectory[17:]
    assert same_state(resumed.state_dict(), full.state_dict())


def test_state_dict_round_trip_continues_identically():
    a = AdaptiveLossWeight(warmup_steps=3, cooling_steps=2, variance_window=3)
    losses = decline(30, 0.95)
    for t, value in enumerate(losses[:15]):
        a._observe(t, value, grad_norm=1.0 + 0.1 * t, reference=a.avg)
    a.freeze()
    a.unfreeze()
    b = AdaptiveLossWeight(warmup_steps=3, cooling_steps=2, variance_window=3)
    b.load_state_dict(a.state_dict())
    assert same_state(b.state_dict(), a.state_dict())
    for t, value in enumerate(losses[15:], start=15):
        assert a._observe(t, value, 2.0, a.avg) == b._observe(t, value, 2.0, b.avg)
    assert same_state(b.state_dict(), a.state_dict())
    with pytest.raises(ValueError, match="state for loss 'mel' loaded into AdaptiveLossWeight\\('l1'\\)"):
        AdaptiveLossWeight("l1").load_state_dict(a.state_dict())


# --------------------------------------------------------------------------------------------------------------------
# Manual control


def test_rollback_set_weight_freeze_unfreeze(tmp_path):
    cb = AdaptiveLossWeight(warmup_steps=0, cooling_steps=0, variance_limit=math.inf, grad_growth=None)
    with pytest.raises(RuntimeError, match="no earlier weight to roll back to"):
        cb.rollback()
    cb._observe(0, 1.0)
    cb._observe(1, 0.5)  # decrease
    assert cb.weight == pytest.approx(2.375)
    assert cb.rollback() == 2.5
    assert cb.weight == 2.5
    assert cb.since_change == 0
    cb.set_weight(4.0)
    assert cb.weight == 4.0
    assert cb.rollback() == 2.5
    for bad in (0.5, 5.5, math.nan):
        with pytest.raises(ValueError, match=r"`weight` must be a finite number >= 1 and <= 5, got"):
            cb.set_weight(bad)
    with pytest.raises(TypeError, match="`weight` must be a number, got '3'"):
        cb.set_weight("3")
    cb.freeze()
    for step in range(2, 6):
        assert cb._observe(step, 0.2)[0] is Decision.FROZEN
    assert cb._observe(6, 100.0)[0] is Decision.SPIKE  # spikes are still caught while frozen
    cb.unfreeze()
    assert cb._observe(7, 0.2)[0] is Decision.DECREASE
    kinds = [e.kind for e in cb.event_log.events]
    assert kinds == ["decrease", "rollback", "set", "rollback", "freeze", "spike", "unfreeze", "decrease"]

    # in a real run: manual calls reach the module's LossWeights
    class Override(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                adaptive.set_weight(3.0)
            if trainer.global_step == 6:
                adaptive.rollback()

    adaptive = AdaptiveLossWeight()
    module = ScriptedLossModule({"mel": [1.0] * 9})
    make_trainer(tmp_path, [adaptive, Override()], max_steps=9).fit(module)
    assert [r["weights"]["mel"] for r in module.records] == [2.5] * 3 + [3.0] * 3 + [2.5] * 3


# --------------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"loss": ""}, ValueError, "`loss` must be a non-empty string, got ''"),
        ({"loss": 3}, TypeError, "`loss` must be a non-empty string, got 3"),
        ({"base_weight": 0.5}, ValueError, "`base_weight` must be a finite number >= 1 and <= 5, got 0.5"),
        ({"base_weight": math.nan}, ValueError, "`base_weight` must be a finite number >= 1 and <= 5, got nan"),
        ({"base_weight": "2"}, TypeError, "`base_weight` must be a number or None, got '2'"),
        ({"min_weight": 0.0}, ValueError, "`min_weight` must be a finite number > 0, got 0.0"),
        ({"min_weight": "1"}, TypeError, "`min_weight` must be a number, got '1'"),
        ({"max_weight": None}, TypeError, "`max_weight` must be a number, got None"),
        ({"max_weight": 1.0}, ValueError, r"`max_weight` must be finite and > `min_weight` \(1.0\), got 1.0"),
        ({"max_weight": math.inf}, ValueError, "`max_weight` must be a finite number, got inf"),
        ({"warmup_steps": -1}, ValueError, "`warmup_steps` must be >= 0, got -1"),
        ({"warmup_steps": 1.5}, TypeError, "`warmup_steps` must be an int, got 1.5"),
        ({"cooling_steps": True}, TypeError, "`cooling_steps` must be an int, got True"),
        ({"variance_window": "20"}, TypeError, "`variance_window` must be an int, got '20'"),
        ({"variance_window": 1}, ValueError, "`variance_window` must be >= 2, got 1"),
        ({"variance_limit": 0.0}, ValueError, "`variance_limit` must be a finite number > 0, got 0.0"),
        ({"variance_limit": math.nan}, ValueError, "`variance_limit` must be a finite number > 0, got nan"),
        ({"variance_limit": -math.inf}, ValueError, "`variance_limit` must be a finite number > 0, got -inf"),
        ({"variance_limit": "inf"}, TypeError, "`variance_limit` must be a number, got 'inf'"),
        ({"increase_ratio": 1.0}, ValueError, "`increase_ratio` must be a finite number > 1, got 1.0"),
        ({"increase_ratio": [1.2]}, TypeError, r"`increase_ratio` must be a number, got \[1.2\]"),
        ({"decrease_ratio": 1.0}, ValueError, r"`decrease_ratio` must be a number in \(0, 1\), got 1.0"),
        ({"decrease_ratio": None}, TypeError, "`decrease_ratio` must be a number, got None"),
        ({"max_change": 0.0}, ValueError, r"`max_change` must be a number in \(0, 1\), got 0.0"),
        ({"max_change": math.inf}, ValueError, "`max_change` must be a finite number, got inf"),
        ({"spike_ratio": 1.05}, ValueError, r"`spike_ratio` must be finite and > `increase_ratio` \(1.1\), got 1.05"),
        ({"spike_ratio": "2"}, TypeError, "`spike_ratio` must be a number, got '2'"),
        ({"ema_decay": 1.0}, ValueError, r"`ema_decay` must be a number in \(0, 1\), got 1.0"),
        ({"ema_decay": True}, TypeError, "`ema_decay` must be a number, got True"),
        ({"grad_growth": 1.0}, ValueError, "`grad_growth` must be a finite number > 1, got 1.0"),
        ({"grad_growth": "1.5"}, TypeError, "`grad_growth` must be a number or None, got '1.5'"),
        ({"max_history": 0}, ValueError, "`max_history` must be >= 1, got 0"),
        ({"max_events": 0}, ValueError, "`max_events` must be >= 1, got 0"),
        ({"max_events": 10.0}, TypeError, "`max_events` must be an int, got 10.0"),
    ],
)
def test_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdaptiveLossWeight(**kwargs)


def test_setup_error_without_loss_weights(tmp_path):
    class NoWeights(ScriptedLossModule):
        def __init__(self):
            super().__init__({"mel": [1.0] * 4})
            del self.loss_weights

    with pytest.raises(RuntimeError, match="NoWeights has no attribute `loss_weights`"):
        make_trainer(tmp_path, [AdaptiveLossWeight()], max_steps=2).fit(NoWeights())
    module = ScriptedLossModule({"mel": [1.0] * 4})
    module.loss_weights = {"mel": 1.0}
    with pytest.raises(RuntimeError, match=r"needs the module to keep a LossWeights.*`loss_weights` = \{'mel': 1.0\}"):
        make_trainer(tmp_path, [AdaptiveLossWeight()], max_steps=2).fit(module)


def test_setup_error_when_the_module_has_no_weight_for_the_term(tmp_path):
    module = ScriptedLossModule({"l1": [1.0] * 4, "stft": [1.0] * 4})
    with pytest.raises(RuntimeError, match=r"has no weight for 'mel'; it has \['l1', 'stft'\]"):
        make_trainer(tmp_path, [AdaptiveLossWeight("mel")], max_steps=2).fit(module)


def test_first_batch_error_lists_the_reported_terms(tmp_path):
    class Unreported(ScriptedLossModule):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            return {"loss": out["loss"], "losses": {"l1": out["losses"]["mel"], "stft": out["losses"]["mel"]}}

    module = Unreported({"mel": [1.0] * 4})
    with pytest.raises(RuntimeError, match=r"'losses': \{'mel': .* but its `losses` reports \['l1', 'stft'\]"):
        make_trainer(tmp_path, [AdaptiveLossWeight()], max_steps=2).fit(module)

    class BareLoss(ScriptedLossModule):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)["loss"]

    with pytest.raises(
        RuntimeError,
        match=r"needs the unweighted term `outputs\['losses'\]\['mel'\]`, but `BareLoss.training_step` returned only "
        r"the loss \(a bare tensor; Lightning passes it on as \{'loss': loss\}\): return the loss-dict instead, "
        r"\{'loss': total, 'losses': \{name: unweighted term",
    ):
        make_trainer(tmp_path, [AdaptiveLossWeight()], max_steps=2).fit(BareLoss({"mel": [1.0] * 4}))


def test_two_instances_on_one_loss_are_refused_by_their_state_key(tmp_path):
    module = ScriptedLossModule({"mel": [1.0] * 4})
    with pytest.raises(RuntimeError, match="`callback.state_key` must be unique"):
        make_trainer(tmp_path, [AdaptiveLossWeight(), AdaptiveLossWeight(base_weight=3.0)], max_steps=2).fit(module)


def test_base_weight_none_takes_the_modules_weight_and_checks_the_bounds(tmp_path):
    module = ScriptedLossModule({"mel": [1.0] * 4}, {"mel": 3.5})
    cb = AdaptiveLossWeight(base_weight=None)
    make_trainer(tmp_path, [cb], max_steps=2).fit(module)
    assert cb.weight == 3.5
    module = ScriptedLossModule({"mel": [1.0] * 4}, {"mel": 15.0})
    with pytest.raises(RuntimeError, match=r"module's weight 15.0 is outside \[`min_weight`, `max_weight`\]"):
        make_trainer(tmp_path, [AdaptiveLossWeight(base_weight=None)], max_steps=2).fit(module)


# --------------------------------------------------------------------------------------------------------------------
# Rank agreement


def rank_losses(n: int) -> dict[int, list[float]]:
    """Rank 0 sees a flat loss (alone it would hold); rank 1 a steep decline: their mean declines."""
    return {0: [1.0] * n, 1: decline(n, 0.9)}


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_ranks_agree_on_the_weight_from_the_rank_averaged_loss(tmp_path):
    n = 30
    per_rank = rank_losses(n)
    module = ScriptedLossModule(
        {"mel": per_rank[0]}, rank_scripts={r: {"mel": v} for r, v in per_rank.items()}, record_dir=str(tmp_path)
    )
    kwargs = {"warmup_steps": 4, "cooling_steps": 2, "grad_growth": None}
    trainer = make_trainer(
        tmp_path,
        [AdaptiveLossWeight(**kwargs)],
        max_steps=n,
        devices=2,
        strategy="ddp_spawn",
        use_distributed_sampler=False,
    )
    trainer.fit(module)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    weights = [[rec["weights"]["mel"] for rec in rank["records"]] for rank in ranks]
    assert len(weights[0]) == n
    assert weights[0] == weights[1]
    assert same_state(ranks[0]["state"], ranks[1]["state"])
    mean = [f32_mean(a, b) for a, b in zip(per_rank[0], per_rank[1])]
    assert weights[0] == replay(AdaptiveLossWeight(**kwargs), mean)
    assert weights[0] != replay(AdaptiveLossWeight(**kwargs), per_rank[0])  # not rank 0's own view
    assert ranks[0]["state"]["num_changes"] >= 2
