"""Issue 24, item 2: every ``guard/*`` metric the guide says can be monitored is in ``trainer.callback_metrics`` from
the first validation, whatever ``log_every_n_steps`` is (Lightning's default 50 here, in a 12-step run)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from lightning_stability.callbacks import GradientGuard
from tests._helpers_guard import FusedFaultyModule
from tests.helpers import FAULT_WARNINGS, FaultyModule, make_trainer

pytestmark = FAULT_WARNINGS

KEYS = ("grad_norm", "skipped", "consecutive_skips", "rollbacks", "amp_overflows", "threshold", "rebases")


class FirstValidation(EarlyStopping):
    """Records ``callback_metrics`` at the end of every validation (after the guard published)."""

    def __init__(self, guard: GradientGuard) -> None:
        super().__init__(monitor="guard/grad_norm", mode="min", patience=1000)
        self.guard = guard
        self.seen: list[dict] = []
        self.norms: dict[int, float] = {}  # the guard's norm of each step, read after the run's own checks

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.norms[trainer.global_step] = float(self.guard.last_grad_norm)

    def on_validation_end(self, trainer, pl_module):
        self.seen.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("guard/")})
        super().on_validation_end(trainer, pl_module)


@pytest.mark.parametrize("sync_free", [False, True])
def test_monitors_find_the_guard_metrics_at_the_first_validation(tmp_path, sync_free):
    module = (FusedFaultyModule if sync_free else FaultyModule)(inf_grad_steps={2})
    guard = GradientGuard(zscore=2.5, zscore_warmup=2, zscore_min_ratio=3.0, sync_free=sync_free)  # logs every 50 steps
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="guard/skipped", mode="max")
    stop = FirstValidation(guard)
    trainer = make_trainer(
        tmp_path,
        [guard, stop, ckpt],
        max_steps=12,
        val_check_interval=4,
        limit_val_batches=1,
        enable_checkpointing=True,
        log_every_n_steps=50,
    )
    trainer.fit(module)
    assert len(stop.seen) == 3  # validations after steps 4, 8 and 12
    first = stop.seen[0]
    assert set(first) == {f"guard/{k}" for k in KEYS}
    assert first["guard/skipped"] == 1.0
    assert first["guard/rollbacks"] == 0.0
    assert first["guard/grad_norm"] == stop.norms[4]  # the norm of step 3
    assert stop.seen[-1]["guard/grad_norm"] == stop.norms[12]
    assert float(ckpt.best_model_score) == 1.0
    assert not trainer.should_stop or trainer.global_step == 12


def test_early_stopping_at_the_end_of_a_training_epoch_without_validation(tmp_path):
    # no validation loop: EarlyStopping checks at the end of the training epoch; listed before the guard, it still
    # finds the key (published at the epoch's last batch)
    stop = EarlyStopping(monitor="guard/grad_norm", mode="min", patience=1000, check_on_train_epoch_end=True)
    trainer = make_trainer(tmp_path, [stop, GradientGuard()], max_epochs=2, max_steps=-1)
    trainer.fit(FaultyModule())
    assert torch.isfinite(stop.best_score)
    assert trainer.global_step == 16
