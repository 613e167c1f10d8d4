"""``log_scalars``: callback scalars reach every logger at Lightning's logging step and ``trainer.callback_metrics``."""

from __future__ import annotations

import csv

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_stability.callbacks import GradientGuard
from lightning_stability.callbacks._logging import log_scalars, logger_step
from tests.helpers import FaultyModule, make_trainer


class Publish(Callback):
    """Logs ``probe = global_step`` every step and records what Lightning's step counter said."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(logger_step(trainer))
        log_scalars(trainer, {"probe": trainer.global_step, "probe_t": torch.tensor(2.0 * trainer.global_step)})


def test_values_reach_csv_at_lightnings_step_and_callback_metrics(tmp_path):
    pub = Publish()
    trainer = make_trainer(tmp_path, [pub], max_steps=4, logger=CSVLogger(tmp_path, name="logs"))
    trainer.fit(FaultyModule())
    rows = list(csv.DictReader((tmp_path / "logs" / "version_0" / "metrics.csv").open()))
    probes = [(int(r["step"]), float(r["probe"]), float(r["probe_t"])) for r in rows if r.get("probe")]
    assert probes == [(s, float(s + 1), 2.0 * (s + 1)) for s in pub.steps]  # the step counter after optimizer.step
    assert pub.steps == [0, 1, 2, 3]  # Lightning's own self.log in training_step of batch k logs at step k
    assert trainer.callback_metrics["probe"].item() == 4.0
    assert trainer.callback_metrics["probe_t"].item() == 8.0


def test_guard_metrics_can_be_monitored_by_model_checkpoint(tmp_path):
    guard = GradientGuard(log_every_n_steps=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="guard/grad_norm", mode="min", save_top_k=1)
    trainer = make_trainer(tmp_path, [guard, ckpt], max_steps=6, enable_checkpointing=True)
    trainer.fit(FaultyModule())
    assert ckpt.best_model_path  # the monitored key existed when the checkpoint was due
    assert torch.isfinite(ckpt.best_model_score)
    assert trainer.callback_metrics["guard/grad_norm"].item() == guard.event_log.traces["grad_norm"][-1][1]


def test_nothing_to_log_is_a_no_op(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit(FaultyModule())
    before = dict(trainer.callback_metrics)
    log_scalars(trainer, {})
    assert dict(trainer.callback_metrics) == before


class Snapshots(Callback):
    """After every training batch (last in the callback list): what the loggers got so far, and callback_metrics."""

    def __init__(self, logger) -> None:
        self.logger = logger
        self.rows_seen = 0
        self.batches: list[tuple[list[dict], dict[str, float]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        new = [row for _, row in self.logger.rows[self.rows_seen :] if "hparams" not in row]
        self.rows_seen = len(self.logger.rows)
        published = {k: float(v) for k, v in trainer.callback_metrics.items()}
        self.batches.append((new, published))


def test_every_callback_scalar_is_in_callback_metrics_at_the_step_it_is_logged(tmp_path):
    from torch import nn

    from lightning_stability.callbacks import (
        AdaptiveLossWeight,
        ScaleFactorClamp,
        SignalMonitor,
        SpectralNormInjection,
    )
    from lightning_stability.modules import CodecModule
    from tests._helpers_codec import TINY, loader
    from tests._helpers_signal import RecordingLogger

    logger = RecordingLogger()
    snaps = Snapshots(logger)
    callbacks = [
        GradientGuard(log_every_n_steps=2),
        AdaptiveLossWeight("mel", warmup_steps=2, cooling_steps=1),
        ScaleFactorClamp(log_every_n_steps=2),
        SpectralNormInjection(types=(nn.ConvTranspose1d,), log_every_n_steps=2),
        SignalMonitor(train_every_n_steps=2, log_media=False),
        snaps,
    ]
    trainer = make_trainer(tmp_path, callbacks, max_steps=6, logger=logger)
    trainer.fit(CodecModule(**TINY, output_rms_clamp=(0.7, 1.5)), train_dataloaders=loader(16))
    prefixes = ("guard/", "adaptive/", "scale/", "specnorm/", "signal/")
    seen = set()
    for rows, published in snaps.batches:
        for row in rows:
            for key, value in row.items():
                if key.startswith(prefixes):
                    seen.add(key.split("/")[0])
                    assert key in published, f"{key} reached the loggers but not callback_metrics"
                    assert published[key] == pytest.approx(value, nan_ok=True), key
    assert seen == {p.rstrip("/") for p in prefixes}


def _monitor_module():
    return FaultyModule()  # returns "preds"/"target": SignalMonitor measures them as latents [B, T]


def test_model_checkpoint_and_early_stopping_on_a_signal_key(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    from lightning_stability.callbacks import SignalMonitor
    from tests._helpers_signal import RecordingLogger

    logger = RecordingLogger()
    key = "signal/train/si_snr"
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=key, mode="max", save_top_k=1, every_n_train_steps=2)
    # stop once SI-SNR reaches -1000 dB: true at the first check, so the run ends after epoch 0 of 5
    stop = EarlyStopping(monitor=key, mode="max", stopping_threshold=-1000.0, check_on_train_epoch_end=True)
    trainer = make_trainer(tmp_path, [SignalMonitor(train_every_n_steps=2), ckpt, stop], max_steps=-1, max_epochs=5,
                           enable_checkpointing=True, logger=logger)
    trainer.fit(_monitor_module())
    logged = logger.values(key)
    assert len(logged) == 4  # 8 batches in one epoch, measured every 2 steps
    assert trainer.current_epoch == 1  # stopped after the first epoch
    assert stop.stopped_epoch == 0
    # ModelCheckpoint fires after steps 2, 4, 6, 8; the value published then is the one measured at steps 0, 2, 4, 6
    assert ckpt.best_model_score.item() == pytest.approx(max(logged.values()))
    assert ckpt.best_model_path


@pytest.mark.filterwarnings("ignore:GradientGuard skipped step:UserWarning")  # the injected NaN losses
def test_model_checkpoint_and_early_stopping_on_a_guard_key(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    guard = GradientGuard(log_every_n_steps=1)
    key = "guard/skipped"
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=key, mode="min", save_top_k=1, every_n_train_steps=1)
    # stop once the guard has skipped more than 1.5 steps: the NaN losses at steps 3 and 10 (epoch 1, batch 2)
    stop = EarlyStopping(monitor=key, mode="max", stopping_threshold=1.5, check_on_train_epoch_end=True)
    trainer = make_trainer(tmp_path, [guard, ckpt, stop], max_steps=-1, max_epochs=5, enable_checkpointing=True)
    trainer.fit(FaultyModule(nan_loss_steps=(3, 10)))
    assert guard.num_skipped == 2
    assert trainer.current_epoch == 2  # epoch 1 ended with 2 skips: stopped there
    assert stop.stopped_epoch == 1
    assert ckpt.best_model_score.item() == 0.0  # the first checkpoints, before any skip
