"""``GradientGuard``'s first-moment signal (``_guard_moments``): the norm, its logging without extra host reads, and the
skip it can trigger."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_stability.callbacks import GradientGuard
from lightning_stability.callbacks.guard._moments import first_moment_norm
from lightning_stability.callbacks.guard._policy import Action, Decision, combine
from tests._helpers_guard import FusedFaultyModule, StepRecorder
from tests.helpers import FAULT_WARNINGS, FaultyModule, assert_same, make_trainer

pytestmark = FAULT_WARNINGS  # these tests inject faults and spikes: the guard's notices are expected


def _expected(optimizer) -> float:
    """The bias-corrected first moment the next step writes, from the state and the gradients (float64)."""
    total = 0.0
    for group in optimizer.param_groups:
        b1 = group["betas"][0]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = optimizer.state.get(p, {})
            m = state.get("exp_avg")
            t = 1 if m is None else int(state["step"]) + 1
            pred = (1 - b1) * p.grad if m is None else b1 * m + (1 - b1) * p.grad
            total += float((pred.double() / (1 - b1**t)).square().sum())
    return math.sqrt(total)


def test_first_moment_norm_is_the_moment_the_step_would_write():
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([{"params": [w], "betas": (0.8, 0.99)}, {"params": [b]}], lr=1e-2)
    w.grad, b.grad = torch.randn(5, 3), torch.randn(3)
    fresh = math.sqrt(w.grad.square().sum() + b.grad.square().sum())  # t = 1: the bias-corrected moment is g
    assert first_moment_norm(opt).item() == pytest.approx(fresh, rel=1e-6)
    opt.step()
    w.grad, b.grad = torch.randn(5, 3), None  # b has no gradient this step: not counted
    assert first_moment_norm(opt).item() == pytest.approx(_expected(opt), rel=1e-6)
    # the step then writes exactly that moment (bias-corrected with its new step count)
    expected = _expected(opt)
    opt.step()
    written = float(opt.state[w]["exp_avg"].norm()) / (1 - 0.8 ** int(opt.state[w]["step"]))
    assert written == pytest.approx(expected, rel=1e-6)
    scaled = first_moment_norm(opt, inv_scale=torch.tensor(1.0))
    assert scaled.item() == pytest.approx(first_moment_norm(opt).item(), rel=1e-6)
    assert first_moment_norm(torch.optim.SGD([w], lr=0.1)) is None  # no first moment to watch


def test_combine_a_first_moment_spike_skips_only_steps_the_gradient_rule_takes():
    spike = Decision(Action.SPIKE, 1.0)
    assert combine(Decision(Action.ACCEPT, 2.0), spike).action is Action.MOMENT_SPIKE
    assert combine(Decision(Action.CLIP, 2.0), spike).action is Action.MOMENT_SPIKE
    assert combine(Decision(Action.NONFINITE, None), spike).action is Action.NONFINITE
    assert combine(Decision(Action.ACCEPT, 2.0), Decision(Action.ACCEPT, 1.0)).action is Action.ACCEPT
    assert combine(Decision(Action.ACCEPT, 2.0), None).action is Action.ACCEPT


class MomentRecorder(StepRecorder):
    """After the guard: the expected first-moment norm of each step, from the optimizer state and the gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.expected: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if any(p.grad is not None for p in pl_module.parameters()):
            self.expected[trainer.global_step] = _expected(optimizer)


class HostReads:
    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("item", "tolist", "__bool__", "__float__"):
            original = getattr(torch.Tensor, name)

            def counted(t, *a, _original=original, **k):
                self.count += 1
                return _original(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_tracking_logs_the_first_moment_norm_with_no_extra_host_read(tmp_path, monkeypatch):
    counts = {}
    for track in (False, True):
        with monkeypatch.context() as m:
            reads = HostReads(m)
            guard = GradientGuard(track_first_moment=track)
            rec = MomentRecorder()
            torch.manual_seed(0)
            make_trainer(tmp_path / str(track), [guard, rec], max_steps=12).fit(FaultyModule())
            counts[track] = reads.count  # the recorder's reads are the same in both runs
    traced = dict(guard.event_log.traces["first_moment_norm"])
    assert sorted(traced) == list(range(12))
    for step, value in traced.items():
        assert value == pytest.approx(rec.expected[step], rel=1e-5), step
    assert counts[True] == counts[False]  # the norm travels in the gradient norm's read


@pytest.mark.parametrize("sync_free", [False, True])
def test_first_moment_zscore_skips_a_spike_the_gradient_rule_does_not_watch(tmp_path, sync_free):
    # spike_ratio=None (and no zscore): the gradient-norm rule only skips non-finite steps; the first-moment detector
    # catches the spike
    cls = FusedFaultyModule if sync_free else FaultyModule
    guard = GradientGuard(
        spike_ratio=None, first_moment_zscore=3.0, zscore_warmup=5, sync_free=sync_free, log_every_n_steps=4
    )
    rec = StepRecorder()
    torch.manual_seed(0)
    make_trainer(tmp_path, [guard, rec], max_steps=16).fit(cls(spike_steps={10}, spike_factor=100.0))
    assert guard.num_skipped == 1
    assert_same(rec.snaps[10], rec.snaps[11])  # a true skip
    skips = [e for e in guard.event_log.events if e.kind == "skip"]
    if sync_free:
        assert skips[0].data["last_skip_step"] == 10
        assert skips[0].data["cause"] == "moment_spike"
    else:
        assert [e.step for e in skips] == [10]
        assert skips[0].data["cause"] == "moment_spike"
        assert skips[0].data["first_moment_norm"] > skips[0].data["first_moment_threshold"]
    state = guard.state_dict()
    assert state["optimizers"][0]["first_moment_stats"]["count"] == 5
    other = GradientGuard(spike_ratio=None, first_moment_zscore=3.0, zscore_warmup=5)
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_an_optimizer_without_a_first_moment_is_warned_about_once(tmp_path):
    guard = GradientGuard(track_first_moment=True)
    with pytest.warns(UserWarning, match="keeps no Adam first moment"):
        make_trainer(tmp_path, [guard], max_steps=4).fit(FaultyModule(optimizer="sgd"))
    assert "first_moment_norm" not in guard.event_log.traces


def test_bad_first_moment_arguments():
    with pytest.raises(ValueError, match="`first_moment_zscore` must be a finite number > 0"):
        GradientGuard(first_moment_zscore=0.0)
    with pytest.raises(TypeError, match="`track_first_moment` must be a bool"):
        GradientGuard(track_first_moment="yes")
    assert GradientGuard(first_moment_zscore=2.0).track_first_moment
