"""CodebookMonitor and AdversarialBalanceMonitor under ``ddp_spawn`` (2 CPU processes): counts and sums are reduced
across ranks, so both ranks log the same values and take the same decisions."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from lightning_stability.callbacks import AdversarialBalanceMonitor, CodebookMonitor
from tests._helpers_user_codec import UserGAN, UserVQCodec, loader

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.slow,  # about 35 s each on 2 CPU cores
    pytest.mark.filterwarnings("ignore:CodebookMonitor:UserWarning"),
    pytest.mark.filterwarnings("ignore:AdversarialBalanceMonitor:UserWarning"),
]


class _Dump(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        monitor = next(cb for cb in trainer.callbacks if hasattr(cb, "last_values"))
        state = {
            "values": monitor.last_values,
            "events": [(e.step, e.kind, e.reason) for e in monitor.event_log.events],
        }
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")


def _run(tmp_path, module, monitor, steps):
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=2,
        strategy=DDPStrategy(start_method="spawn", find_unused_parameters=True), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[monitor, _Dump(tmp_path)],
    )  # fmt: skip
    trainer.fit(module, loader(n=64, batch_size=8, shuffle=False))
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.timeout(240)
def test_codebook_monitor_agrees_across_ranks(tmp_path):
    ranks = _run(tmp_path, UserVQCodec("vqp", collapse=True), CodebookMonitor(every_n_steps=5, window=3), 20)
    assert ranks[0] == ranks[1]
    assert any(kind == "codebook_collapse" for _, kind, _ in ranks[0]["events"])
    assert ranks[0]["values"]["codebook/quantizer/level_0/perplexity"] == pytest.approx(1.0)


@pytest.mark.timeout(240)
def test_adversarial_monitor_agrees_across_ranks(tmp_path):
    monitor = AdversarialBalanceMonitor(every_n_steps=5, window=3, warmup_steps=0)
    ranks = _run(tmp_path, UserGAN(disc_lr=1e-2, gen_lr=1e-6), monitor, 80)
    assert ranks[0] == ranks[1]
    assert any(kind == "disc_winning" for _, kind, _ in ranks[0]["events"])
