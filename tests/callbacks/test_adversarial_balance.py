"""AdversarialBalanceMonitor on a user's GAN (manual optimization, two optimizers) and on CodecModule."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_stability.callbacks import AdversarialBalanceMonitor, StabilityReport
from tests._helpers_user_codec import UserGAN, loader


def _fit(module, monitor, *, steps, callbacks=()):
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[monitor, *callbacks],
    )  # fmt: skip
    trainer.fit(module, loader(n=64, batch_size=8, shuffle=True))
    return trainer


def _monitor(**kw):
    return AdversarialBalanceMonitor(every_n_steps=5, window=3, drift_window=4, warmup_steps=20, **kw)


def _kinds(monitor):
    return [e.kind for e in monitor.event_log.events]


def test_healthy_gan_raises_no_alarm_and_logs_the_game():
    monitor = _monitor()
    _fit(UserGAN(disc_lr=4e-3), monitor, steps=150)  # manual optimization: 2 optimizer steps per batch
    assert not monitor.event_log.events
    assert set(monitor.last_values) == {
        f"adversarial/{k}" for k in ("disc_loss", "balance", "adv_loss", "feat_loss", "disc_accuracy", "grad_ratio")
    }
    v = monitor.last_values
    assert v["adversarial/balance"] == pytest.approx(v["adversarial/disc_loss"] / 2.0)  # hinge chance value 2
    assert 0.0 <= v["adversarial/disc_accuracy"] <= 1.0
    assert len(monitor.event_log.traces["grad_ratio"]) == 15  # 75 batches / 5: both players' norms every window


def test_discriminator_blow_up_is_reported_as_winning():
    monitor = _monitor()
    with pytest.warns(UserWarning, match="the discriminator is winning"):
        _fit(UserGAN(disc_lr=1e-2, gen_lr=1e-6), monitor, steps=80)
    event = next(e for e in monitor.event_log.events if e.kind == "disc_winning")
    assert event.data["disc_loss"] < 0.2
    assert "learning rate" in event.data["advice"]
    assert monitor.last_values["adversarial/disc_accuracy"] > 0.95


@pytest.mark.filterwarnings("ignore:AdversarialBalanceMonitor. the discriminator learns nothing:UserWarning")
def test_leaked_generator_gradient_is_reported_as_a_collapsed_term(tmp_path):
    monitor = _monitor()
    report = StabilityReport(dirpath=tmp_path, print_summary=False)
    with pytest.warns(UserWarning, match="adversarial term fell"):
        _fit(UserGAN(leak=True), monitor, steps=220, callbacks=[report])
    event = next(e for e in monitor.event_log.events if e.kind == "feature_matching_collapse")
    assert event.data["term"] == "adv"
    assert event.data["value"] < 0.05 * event.data["reference"]
    recs = report.last_report["summary"]["recommendations"]
    assert any(r.startswith("adversarial: ") and "zero_grad" in r for r in recs)


def test_discriminator_stuck_at_chance_is_reported():
    monitor = _monitor()
    with pytest.warns(UserWarning, match="learns nothing"):
        _fit(UserGAN(disc_lr=1e-9), monitor, steps=80)
    assert "disc_learning_nothing" in _kinds(monitor)


def test_gradient_ratio_drift_is_reported():
    # generator and discriminator steps both go through `on_before_optimizer_step`; a ratio 100x off its first value
    # after warm-up for 4 checks is a drift
    monitor = AdversarialBalanceMonitor(every_n_steps=5, window=3, drift_window=2, warmup_steps=0, drift_factor=10.0)
    with pytest.warns(UserWarning, match="gradient-norm ratio"):
        _fit(UserGAN(disc_lr=1e-2, gen_lr=1e-6), monitor, steps=80)
    event = next(e for e in monitor.event_log.events if e.kind == "grad_ratio_drift")
    assert event.data["ratio"] > 10 * event.data["reference"]


def test_state_round_trip_and_bad_arguments(tmp_path):
    monitor = _monitor()
    _fit(UserGAN(disc_lr=4e-3), monitor, steps=30)
    state = monitor.state_dict()
    torch.save(state, tmp_path / "ab.pt")
    resumed = _monitor()
    resumed.load_state_dict(torch.load(tmp_path / "ab.pt", weights_only=True))
    assert resumed.state_dict() == state
    assert state["batches"] == 15
    with pytest.raises(ValueError, match="loss_type"):
        AdversarialBalanceMonitor(loss_type="wgan")
    with pytest.raises(TypeError, match="disc_loss"):
        AdversarialBalanceMonitor(disc_loss=3)
    with pytest.raises(ValueError, match="drift_factor"):
        AdversarialBalanceMonitor(drift_factor=1.0)


@pytest.mark.filterwarnings("ignore:AdversarialBalanceMonitor. the discriminator is winning:UserWarning")
@pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization:UserWarning")  # after the step: ok
def test_checkpoint_round_trip_through_a_trainer_matches_an_uninterrupted_run(tmp_path):
    """A GAN with two optimizers fit 8 batches (16 optimizer steps) with a ModelCheckpoint, then resumed to 40
    batches: the monitor's state, its events (the discriminator winning, after the resume) and every logged value
    equal one uninterrupted run. The checkpoint falls mid-window (checks every 5 batches)."""
    from tests._helpers_user_codec import assert_same_state, resume_round_trip

    (full, full_logged), (resumed, resumed_logged) = resume_round_trip(
        tmp_path,
        lambda: UserGAN(disc_lr=1e-2, gen_lr=1e-6),
        _monitor,
        steps=16,
        total=80,
        prefix="adversarial/",
        batches=8,
    )
    assert "disc_winning" in _kinds(full)
    assert full.event_log.events[0].step >= 8  # after the checkpoint (logged steps count batches)
    assert_same_state(resumed.state_dict(), full.state_dict())
    assert resumed_logged
    assert set(resumed_logged) == {s for s in full_logged if s >= 8}
    assert resumed_logged == {s: v for s, v in full_logged.items() if s >= 8}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"disc_loss": ""}, ValueError, "`disc_loss` must be a non-empty string or None, got ''"),
        ({"real_scores": 1}, TypeError, "`real_scores` must be a non-empty string or None, got 1"),
        ({"win_fraction": 1.0}, ValueError, r"`win_fraction` must be a number in \(0, 1\), got 1.0"),
        ({"chance_tolerance": "0.1"}, TypeError, "`chance_tolerance` must be a number, got '0.1'"),
        ({"collapse_fraction": 0.0}, ValueError, r"`collapse_fraction` must be a number in \(0, 1\), got 0.0"),
        ({"drift_factor": 1.0}, ValueError, "`drift_factor` must be a finite number > 1, got 1.0"),
        ({"drift_factor": None}, TypeError, "`drift_factor` must be a number, got None"),
        ({"window": 0}, ValueError, "`window` must be >= 1, got 0"),
        ({"window": 2.0}, TypeError, "`window` must be an int, got 2.0"),
        ({"prefix": 3}, TypeError, "`prefix` must be a string, got 3"),
    ],
)
def test_argument_errors_name_the_argument_and_value(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdversarialBalanceMonitor(**kwargs)
