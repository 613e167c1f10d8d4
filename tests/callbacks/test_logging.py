"""``log_scalars``: callback scalars reach every logger at Lightning's logging step and ``trainer.callback_metrics``."""

from __future__ import annotations

import csv

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
