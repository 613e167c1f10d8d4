import json
import math
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn

from lightning_stability.callbacks import ScaleFactorClamp
from lightning_stability.nn import ClampedRMSScale
from tests._helpers_spectral_scale import NoHostReads
from tests.helpers import FaultyModule, assert_same, make_trainer, manual_optimization, snapshot


class LearnableScaleModule(FaultyModule):
    """A learnable ``output_scale`` whose only gradient is ``-10 * push`` (the loss has a ``-10 push . output_scale``
    term): SGD (momentum 0.9) drives it up where ``push > 0`` and down where ``push < 0``."""

    def __init__(self, init=1.0, push=(0.0,), **kwargs) -> None:
        kwargs.setdefault("optimizer", "sgd")
        kwargs.setdefault("lr", 0.1)
        super().__init__(**kwargs)
        self.output_scale = nn.Parameter(torch.full((len(push),), float(init)))
        self.register_buffer("push", torch.tensor(push))
        self.scales_seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.scales_seen.append(self.output_scale.detach().clone())
        out = self.compute(batch)
        out["loss"] = out["loss"] - (self.push * self.output_scale).sum() * 10.0
        self.step_losses.append(float(out["loss"].detach()))
        return out


class RMSScaleModule(FaultyModule):
    """The output goes through a ``ClampedRMSScale`` towards the target's RMS.

    ``gain`` multiplies the network output before the layer: 1e-3 makes it far quieter than the target, so the factor
    is pinned at the ceiling; ``gain=None`` uses the output itself as the reference (factor ~1.0).
    """

    def __init__(self, gain=1e-3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.gain = gain
        self.scale = ClampedRMSScale(0.5, 3.0)  # the callback replaces this range

    def compute(self, batch):
        x, y = batch
        h = self.net(x)
        preds = self.scale(h, h.detach()) if self.gain is None else self.scale(h * self.gain, y)
        mse = nn.functional.mse_loss(preds, y)
        return {"loss": mse, "losses": {"mse": mse.detach()}, "preds": preds.detach(), "target": y}


def scale_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "ScaleFactorClamp" in str(w.message)]


def test_learnable_scale_stays_inside_bounds_under_an_optimizer_pushing_it_out(tmp_path):
    push = (1.0, -1.0, 0.0, 1e-4)
    free = LearnableScaleModule(push=push)
    make_trainer(tmp_path / "free", max_steps=6).fit(free)
    assert free.output_scale[0] > 1.5  # the control: the push does leave the range
    assert free.output_scale[1] < 0.7

    module = LearnableScaleModule(push=push)
    cb = ScaleFactorClamp(log_every_n_steps=3, init_warn_ratio=None)
    trainer = make_trainer(tmp_path / "clamped", [cb], max_steps=6)
    trainer.fit(module)
    seen = torch.stack(module.scales_seen)  # the values every forward saw
    assert seen.min() >= 0.7
    assert seen.max() <= 1.5
    # element 3 moves freely inside the range: SGD with momentum by hand, v <- 0.9 v + g, p <- p - 0.1 v
    p3, v, after_step = 1.0, 0.0, []
    for _ in range(6):
        v = 0.9 * v - 10 * 1e-4
        p3 -= 0.1 * v
        after_step.append(p3)
    assert module.output_scale.tolist() == pytest.approx([1.5, 0.7, 1.0, p3], abs=1e-6)
    # every step pushed elements 0 and 1 out of the range and back: 2 of 4 elements projected
    assert trainer.callback_metrics["scale/output_scale/clamped_fraction"].item() == pytest.approx(0.5)
    window = [(1.5 + 0.7 + 1.0 + p) / 4 for p in after_step[3:]]  # steps 4, 5, 6
    assert trainer.callback_metrics["scale/output_scale"].item() == pytest.approx(sum(window) / 3, abs=1e-6)
    assert [s for s, _ in cb.event_log.traces["output_scale"]] == [3, 6]


def test_projection_applies_under_manual_optimization_and_gradient_accumulation(tmp_path):
    Manual = manual_optimization(LearnableScaleModule)

    module = Manual(push=(1.0,))
    make_trainer(tmp_path / "manual", [ScaleFactorClamp(init_warn_ratio=None)], max_steps=4).fit(module)
    assert torch.stack(module.scales_seen).max() <= 1.5
    assert module.output_scale.item() == 1.5

    module = LearnableScaleModule(push=(1.0,))
    cb = ScaleFactorClamp(log_every_n_steps=1, init_warn_ratio=None)
    make_trainer(tmp_path / "accumulate", [cb], max_steps=3, accumulate_grad_batches=2).fit(module)
    assert len(module.scales_seen) == 6
    assert torch.stack(module.scales_seen).max() <= 1.5
    assert [s for s, _ in cb.event_log.traces["output_scale"]] == [1, 2, 3]  # once per optimizer step


def test_warning_fires_on_a_factor_pinned_at_the_ceiling(tmp_path):
    module = RMSScaleModule(gain=1e-3)
    cb = ScaleFactorClamp(warn_after_steps=3, log_every_n_steps=1)
    trainer = make_trainer(tmp_path, [cb], max_steps=12)
    with pytest.warns(UserWarning, match=r"scale factor `scale` stayed above warn_above=1.3 for 3 consecutive steps"):
        trainer.fit(module)
    assert (module.scale.min_scale, module.scale.max_scale) == (0.7, 1.5)  # the callback's range, not the layer's own
    assert trainer.callback_metrics["scale/scale"].item() == 1.5
    assert trainer.callback_metrics["scale/scale/clamped_fraction"].item() == 1.0
    events = [e for e in cb.event_log.events if e.kind == "scale_high"]
    assert [e.step for e in events] == [3]  # rate-limited: once in 12 steps (next allowed at step 3 + 60)
    assert events[0].data == {"name": "scale", "factor": 1.5, "steps": 3}


def test_no_warning_on_a_factor_at_one(tmp_path):
    module = RMSScaleModule(gain=None)
    cb = ScaleFactorClamp(warn_after_steps=2, log_every_n_steps=1)
    trainer = make_trainer(tmp_path, [cb], max_steps=8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module)
    assert scale_warnings(record) == []
    assert trainer.callback_metrics["scale/scale"].item() == pytest.approx(1.0, abs=1e-4)
    assert trainer.callback_metrics["scale/scale/clamped_fraction"].item() == 0.0
    assert cb.event_log.num_events == {}
    assert len(cb.event_log.traces["scale"]) == 8


def test_streak_between_log_steps_is_not_missed(tmp_path):
    # factor above warn_above for 3 steps (steps 1-3) then back at 1.0; logs only every 5 steps
    class Burst(RMSScaleModule):
        def compute(self, batch):
            self.gain = 1e-3 if self.global_step < 3 else None
            return super().compute(batch)

    cb = ScaleFactorClamp(warn_after_steps=3, log_every_n_steps=5)
    with pytest.warns(UserWarning, match=r"for 3 consecutive steps"):
        make_trainer(tmp_path, [cb], max_steps=5).fit(Burst())
    assert [e.step for e in cb.event_log.events] == [5]


def test_steps_between_log_steps_do_not_read_tensors_on_the_host(tmp_path):
    class Guarded(ScaleFactorClamp):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step % 4:  # not a log step
                with NoHostReads():
                    return super().on_train_batch_end(trainer, *args)
            return super().on_train_batch_end(trainer, *args)

    module = RMSScaleModule(gain=1e-3)
    module.output_scale = nn.Parameter(torch.tensor([2.0, 0.1]))
    cb = Guarded(warn_after_steps=2, log_every_n_steps=4, param_patterns="output_scale", init_warn_ratio=None)
    with pytest.warns(UserWarning, match="stayed above warn_above"):
        make_trainer(tmp_path, [cb], max_steps=8).fit(module)
    assert module.output_scale.tolist() == pytest.approx([1.5, 0.7])
    assert [s for s, _ in cb.event_log.traces["scale"]] == [4, 8]
    with NoHostReads(), pytest.raises(AssertionError, match="host read"):
        float(torch.ones(()))  # the guard itself works


def test_init_check_warns_on_a_learnable_scale_far_from_one_and_projects_it(tmp_path):
    module = LearnableScaleModule(init=3.0)
    cb = ScaleFactorClamp()
    with pytest.warns(UserWarning, match=r"learnable scale `output_scale` starts at 3, more than 2x away from 1"):
        make_trainer(tmp_path / "far", [cb], max_steps=1).fit(module)
    assert module.scales_seen[0].item() == 1.5  # projected before the first forward
    assert cb.event_log.num_events == {"scale_init": 1}

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(tmp_path / "near", [ScaleFactorClamp()], max_steps=1).fit(LearnableScaleModule(init=1.0))
    assert scale_warnings(record) == []


def test_nothing_to_clamp_lists_parameter_names(tmp_path):
    with pytest.raises(RuntimeError, match=r"found nothing to clamp in FaultyModule: .*\['net.0.weight', 'net.0.bias'"):
        make_trainer(tmp_path, [ScaleFactorClamp()], max_steps=1).fit(FaultyModule())


def test_validate_sets_layer_bounds(tmp_path):
    module = RMSScaleModule()
    make_trainer(tmp_path, [ScaleFactorClamp(0.8, 1.2, warn_above=1.1)], limit_val_batches=1).validate(module)
    assert (module.scale.min_scale, module.scale.max_scale) == (0.8, 1.2)
    assert module.scale.last_scale.max().item() == pytest.approx(1.2)


class LateRestoreStrategy(SingleDeviceStrategy):
    """Restores callbacks after ``on_fit_start``, as ``ModelParallelStrategy`` and DeepSpeed do."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


def run(tmp_path, name, max_epochs, ckpt_path=None, save=None, late_restore=False):
    torch.manual_seed(0)
    module = RMSScaleModule(gain=1e-3)
    module.output_scale = nn.Parameter(torch.tensor([1.45]))
    cb = ScaleFactorClamp(warn_after_steps=2, log_every_n_steps=3, param_patterns="output_scale")
    strategy = {"strategy": LateRestoreStrategy("cpu")} if late_restore else {}
    trainer = make_trainer(
        tmp_path / name, [cb], max_steps=-1, max_epochs=max_epochs, limit_train_batches=4, **strategy
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, ckpt_path=ckpt_path)
    if save is not None:
        trainer.save_checkpoint(save)
    return module, cb, trainer, scale_warnings(record)


@pytest.mark.parametrize("late_restore", [False, True])
def test_resume_continues_exactly(tmp_path, late_restore):
    full, full_cb, full_trainer, _ = run(tmp_path, "full", 2)
    run(tmp_path, "first", 1, save=tmp_path / "half.ckpt")
    resumed, resumed_cb, resumed_trainer, resumed_warnings = run(
        tmp_path, "resumed", 2, ckpt_path=tmp_path / "half.ckpt", late_restore=late_restore
    )
    assert_same(snapshot(full, full_trainer.optimizers[0]), snapshot(resumed, resumed_trainer.optimizers[0]))
    assert resumed_cb.state_dict() == full_cb.state_dict()  # window accumulators, streaks, warnings, traces
    assert [s for s, _ in resumed_cb.event_log.traces["scale"]] == [3, 6]
    assert resumed_warnings == []  # warned at step 3 before the interruption; still rate-limited after it
    assert json.loads(json.dumps(full_cb.state_dict())) == full_cb.state_dict()


def test_two_instances_have_distinct_state_keys():
    a, b = ScaleFactorClamp(), ScaleFactorClamp(0.5, 2.0, param_patterns=("*gain*",))
    assert a.state_key == "ScaleFactorClamp{'min_scale': 0.7, 'max_scale': 1.5, 'param_patterns': ('*output_scale*',)}"
    assert a.state_key != b.state_key
    assert a.event_log.source == a.state_key


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision(tmp_path, precision):
    module = RMSScaleModule(gain=1e-3)
    module.output_scale = nn.Parameter(torch.tensor([2.5]))
    cb = ScaleFactorClamp(log_every_n_steps=2, param_patterns="output_scale", init_warn_ratio=None)
    trainer = make_trainer(tmp_path, [cb], max_steps=4, precision=precision)
    trainer.fit(module)
    assert module.output_scale.item() == 1.5
    assert trainer.callback_metrics["scale/scale"].item() == 1.5
    assert all(math.isfinite(v) for _, v in cb.event_log.traces["scale/clamped_fraction"])


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"min_scale": 0}, ValueError, r"`min_scale` must be a finite number > 0, got 0"),
        ({"max_scale": float("inf")}, ValueError, r"`max_scale` must be a finite number > 0, got inf"),
        ({"min_scale": 2.0, "max_scale": 1.0}, ValueError, r"min_scale=2.0 > max_scale=1.0"),
        ({"min_scale": "low"}, TypeError, r"`min_scale` must be a float, got 'low'"),
        ({"warn_above": 1.5}, ValueError, r"`warn_above` must lie in \[min_scale, max_scale\) = \[0.7, 1.5\) .* 1.5"),
        ({"warn_above": 0.5}, ValueError, r"`warn_above` must lie in .* got 0.5"),
        ({"warn_above": float("nan")}, ValueError, r"`warn_above` must be a finite number, got nan"),
        ({"warn_above": "1.3"}, TypeError, r"`warn_above` must be a number or None, got '1.3'"),
        ({"warn_after_steps": 0}, ValueError, r"`warn_after_steps` must be >= 1, got 0"),
        ({"warn_after_steps": 2.0}, TypeError, r"`warn_after_steps` must be an int, got 2.0"),
        ({"param_patterns": 3}, TypeError, r"`param_patterns` must be a glob pattern or an iterable of them, got 3"),
        ({"param_patterns": ["*scale*", 4]}, TypeError, r"`param_patterns` must contain non-empty glob pattern .* 4"),
        ({"param_patterns": ["*scale*", ""]}, ValueError, r"`param_patterns` must contain non-empty glob .* got ''"),
        ({"init_warn_ratio": 1.0}, ValueError, r"`init_warn_ratio` must be a finite number > 1, got 1.0"),
        ({"init_warn_ratio": True}, TypeError, r"`init_warn_ratio` must be a number or None, got True"),
        ({"log_every_n_steps": -2}, ValueError, r"`log_every_n_steps` must be >= 0, got -2"),
        ({"log_every_n_steps": "10"}, TypeError, r"`log_every_n_steps` must be an int or None, got '10'"),
    ],
)
def test_argument_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ScaleFactorClamp(**kwargs)


class DumpEvents(Callback):
    def __init__(self, out_dir, clamp) -> None:
        self.out_dir, self.clamp = out_dir, clamp

    def on_train_end(self, trainer, pl_module):
        state = {
            "events": self.clamp.event_log.to_json(),
            "bounds": [pl_module.scale.min_scale, pl_module.scale.max_scale],
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(state))


class RankGainModule(RMSScaleModule):
    """Pinned at the ceiling on rank 1 only: the warning decision must still be the same on both ranks."""

    def compute(self, batch):
        self.gain = 1e-3 if self.global_rank == 1 else None
        return super().compute(batch)


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_ddp_ranks_agree(tmp_path):
    module = RankGainModule()
    clamp = ScaleFactorClamp(warn_after_steps=2, log_every_n_steps=2, param_patterns=())
    trainer = make_trainer(tmp_path, [clamp, DumpEvents(tmp_path, clamp)], devices=2, strategy="ddp_spawn", max_steps=4)
    trainer.fit(module)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1
    assert r0["events"]["num_events"] == {"scale_high": 1}
    # rank 0 sat at 1.0 and rank 1 at 1.5: the logged factor is their mean
    assert r0["events"]["traces"]["scale"] == [[2, pytest.approx(1.25, abs=1e-3)], [4, pytest.approx(1.25, abs=1e-3)]]


@pytest.mark.parametrize("shape", [(), (1,), (2,)], ids=["0-dim", "1", "2"])
@pytest.mark.parametrize("fold_every", [1, 3, 7, 100])
def test_window_statistics_do_not_depend_on_when_records_are_folded(fold_every, shape):
    # a parameter's per-step values drift in and out of [0.7, 1.5] and above warn_above=1.3; the sums, the streak and
    # the longest streak must equal a plain per-step loop whatever the fold points
    from lightning_stability.callbacks.scale_clamp import _Tracked

    g = torch.Generator().manual_seed(3)
    n = math.prod(shape)
    values = (0.5 + 1.3 * torch.rand(40, n, generator=g)).tolist()
    param = nn.Parameter(torch.zeros(shape))
    t = _Tracked("p", "param", param)
    t.init(torch.device("cpu"))
    t.streak.fill_(2)  # a streak carried in from the previous window
    for i, v in enumerate(values):
        with torch.no_grad():
            param.copy_(torch.tensor(v).reshape(shape))
        t.record(0.7, 1.5)
        if (i + 1) % fold_every == 0:
            t.fold(0.7, 1.5, 1.3)
    t.fold(0.7, 1.5, 1.3)
    factor_sum = clamped_sum = 0.0
    streak, peak = 2, 0
    for v in values:
        clipped = [min(max(x, 0.7), 1.5) for x in v]
        factor = sum(clipped) / n
        factor_sum += factor
        clamped_sum += sum(x < 0.7 or x > 1.5 for x in v) / n
        streak = streak + 1 if factor > 1.3 else 0
        peak = max(peak, streak)
    assert t.steps == 40
    assert t.pending == []
    assert t.factor_sum.item() == pytest.approx(factor_sum, rel=1e-6)
    assert t.clamped_sum.item() == pytest.approx(clamped_sum, rel=1e-6)
    assert (int(t.streak), int(t.peak)) == (streak, peak)
    assert torch.all((param >= 0.7) & (param <= 1.5))  # projected every step


def test_folding_between_log_steps_reads_nothing_on_the_host(tmp_path, monkeypatch):
    from lightning_stability.callbacks import scale_clamp

    monkeypatch.setattr(scale_clamp, "_FOLD_EVERY", 2)  # fold on non-log steps 2, 4, 6 (logs every 8)
    folds = []

    class Guarded(ScaleFactorClamp):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step % 8:
                with NoHostReads():
                    return super().on_train_batch_end(trainer, *args)
            return super().on_train_batch_end(trainer, *args)

    original = scale_clamp._Tracked.fold

    def counted(self, *args):
        folds.append(len(self.pending))
        return original(self, *args)

    monkeypatch.setattr(scale_clamp._Tracked, "fold", counted)
    module = RMSScaleModule(gain=1e-3)
    module.output_scale = nn.Parameter(torch.tensor([2.0, 0.1]))
    cb = Guarded(warn_after_steps=2, log_every_n_steps=8, param_patterns="output_scale", init_warn_ratio=None)
    with pytest.warns(UserWarning, match="stayed above warn_above"):
        make_trainer(tmp_path, [cb], max_steps=8).fit(module)
    assert 2 in folds  # records were folded between log steps, under NoHostReads
    assert [s for s, _ in cb.event_log.traces["scale"]] == [8]
    assert [round(f, 6) for s, f in cb.event_log.traces["scale"]] == [1.5]  # the layer sat at its ceiling throughout


def test_warning_names_the_likely_cause_for_layers_and_for_learnable_scales(tmp_path):
    layer_cb = ScaleFactorClamp(warn_after_steps=2, log_every_n_steps=2)
    with pytest.warns(UserWarning, match=r"the path that feeds it may be collapsing"):
        make_trainer(tmp_path / "layer", [layer_cb], max_steps=4).fit(RMSScaleModule(gain=1e-3))
    module = RMSScaleModule(gain=None)
    module.output_scale = nn.Parameter(torch.tensor([1.45]))  # starts (and, a few Adam steps on, stays) above 1.3
    param_cb = ScaleFactorClamp(warn_after_steps=2, log_every_n_steps=2, param_patterns="output_scale")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(tmp_path / "param", [param_cb], max_steps=4).fit(module)
    texts = [str(w.message) for w in record if "stayed above" in str(w.message)]
    assert any("`output_scale`" in t and "learnable scale keeps growing" in t for t in texts), texts
    assert not any("`output_scale`" in t and "feeds it" in t for t in texts)


# ------------------------------------------------------------------------------------ the codec's gated level terms
def _quiet_codec(gate):
    """A tiny codec whose decoder starts 100x too quiet, so its output-RMS safety net sits at its 1.5 bound, with the
    ``rms`` term behind a correlation gate ``gate``."""
    from lightning_stability.modules import CodecModule
    from tests._helpers_codec import TINY

    codec = CodecModule(
        **{**TINY, "lr": 1e-5}, output_rms_clamp=(0.7, 1.5), rms_correlation_gate=gate, quality_metrics=None
    )
    last = [m for m in codec.decoder.modules() if isinstance(m, nn.Conv1d)][-1]
    with torch.no_grad():
        last.weight.mul_(0.01)
        last.bias.zero_()
    return codec


def _fit_quiet_codec(tmp_path, gate):
    from tests._helpers_codec import loader

    codec = _quiet_codec(gate)
    clamp = ScaleFactorClamp(0.7, 1.5, warn_above=1.3, warn_after_steps=2, log_every_n_steps=2)
    make_trainer(tmp_path, [clamp], max_steps=6).fit(codec, loader(24))
    return codec, clamp


def test_no_collapse_warning_while_the_codecs_level_term_is_gated_off(tmp_path, recwarn):
    # an untrained output barely correlates with its input: a gate from 0.98 to 0.99 stays shut (weight 0)
    codec, clamp = _fit_quiet_codec(tmp_path, (0.98, 0.99))
    assert float(codec.level_gate) == 0.0
    (trace,) = [v for k, v in clamp.event_log.traces.items() if k.endswith("output_scale")]
    assert all(factor == pytest.approx(1.5) for _, factor in trace)  # pinned high: the warning's symptom ...
    assert not [w for w in recwarn if "stayed above" in str(w.message)]  # ... but the level term is not acting yet
    assert "scale_high" not in {e.kind for e in clamp.event_log.events}


@pytest.mark.filterwarnings("ignore:ScaleFactorClamp. scale factor .* stayed above:UserWarning")
def test_the_collapse_warning_returns_once_the_gate_is_open(tmp_path):
    # a gate from -1 to -0.99 is open for any output (weight 1): the same pinned factor is warned about
    codec, clamp = _fit_quiet_codec(tmp_path, (-1.0, -0.99))
    assert float(codec.level_gate) == 1.0
    assert "scale_high" in {e.kind for e in clamp.event_log.events}
