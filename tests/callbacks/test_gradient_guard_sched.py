"""Issue 24, item 5: a step ``GradientGuard`` does not take (a guard skip or an fp16 overflow) does not advance
``interval="step"`` learning-rate schedulers, and the scheduler's state in checkpoints continues the schedule."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch.optim.lr_scheduler import LambdaLR

from lightning_stability.callbacks import GradientGuard
from tests._helpers_guard import FusedFaultyModule, StepRecorder
from tests.helpers import FAULT_WARNINGS, FaultyModule, assert_same, make_trainer

pytestmark = FAULT_WARNINGS

BASE_LR = 1e-2


def warmup(step: int) -> float:
    return min(1.0, (step + 1) / 20)  # linear warm-up over 20 steps


def _with_warmup(cls):
    class Warmup(cls):
        def configure_optimizers(self):
            opt = super().configure_optimizers()
            return {"optimizer": opt, "lr_scheduler": {"scheduler": LambdaLR(opt, warmup), "interval": "step"}}

    return Warmup


WarmupModule = _with_warmup(FaultyModule)
FusedWarmupModule = _with_warmup(FusedFaultyModule)


def _lr(trainer) -> tuple[float, int]:
    return trainer.optimizers[0].param_groups[0]["lr"], trainer.lr_scheduler_configs[0].scheduler.last_epoch


@pytest.mark.parametrize("sync_free", [False, True])
def test_three_skipped_steps_leave_the_warmup_where_the_taken_steps_put_it(tmp_path, sync_free):
    module = (FusedWarmupModule if sync_free else WarmupModule)(inf_grad_steps={2, 3, 4})
    guard = GradientGuard(sync_free=sync_free)
    trainer = make_trainer(tmp_path, [guard], max_steps=10)
    trainer.fit(module)
    assert guard.num_skipped == 3
    lr, last = _lr(trainer)
    assert last == 7  # 10 optimizer steps, 7 taken
    assert lr == pytest.approx(BASE_LR * warmup(7), rel=1e-12)


def test_opting_out_keeps_lightnings_behaviour(tmp_path):
    trainer = make_trainer(tmp_path, [GradientGuard(pause_schedulers_on_skip=False)], max_steps=10)
    trainer.fit(WarmupModule(inf_grad_steps={2, 3, 4}))
    lr, last = _lr(trainer)
    assert last == 10
    assert lr == pytest.approx(BASE_LR * warmup(10), rel=1e-12)


def test_fp16_overflows_do_not_advance_the_schedule_either(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)  # the untrained model overflows fp16 at this scale
    plugin = MixedPrecision("16-mixed", device="cpu", scaler=scaler)
    guard = GradientGuard()
    trainer = make_trainer(tmp_path, [guard], plugins=[plugin], max_steps=12)
    trainer.fit(WarmupModule(nan_loss_steps={8}))
    assert guard.num_amp_overflows >= 1
    assert guard.num_skipped == 1
    lr, last = _lr(trainer)
    assert last == 12 - guard.num_amp_overflows - 1
    assert lr == pytest.approx(BASE_LR * warmup(last), rel=1e-12)


def test_resumed_run_continues_the_schedule_like_an_uninterrupted_one(tmp_path):
    # step 7 is skipped in the very batch whose `on_train_batch_end` writes the checkpoint of step 8 (the end of the
    # first epoch: a plain DataLoader restarts its epoch on resume)
    def module():
        return WarmupModule(inf_grad_steps={2, 3, 7, 12})

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=8, save_top_k=-1)
    full_rec = StepRecorder()
    full = make_trainer(tmp_path / "full", [GradientGuard(), full_rec, ckpt], max_steps=16, enable_checkpointing=True)
    full.fit(module())
    path = next((tmp_path / "ckpt").glob("*step=8.ckpt"))
    saved = torch.load(path, weights_only=False)["lr_schedulers"][0]
    assert saved["last_epoch"] == 5  # 8 steps, 5 taken

    resumed_rec = StepRecorder()
    resumed = make_trainer(tmp_path / "resumed", [GradientGuard(), resumed_rec], max_steps=16)
    resumed.fit(module(), ckpt_path=path)
    assert _lr(resumed) == _lr(full)
    assert _lr(full)[1] == 12
    assert_same(resumed_rec.final, full_rec.final)  # the same learning rates gave the same weights
