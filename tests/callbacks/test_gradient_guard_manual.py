"""Issue 24, item 1: ``GradientGuard`` in manual optimization, with Lightning's GAN pattern.

The generator's forward runs once; the discriminator steps; then the generator's loss is back-propagated through the
same graph. BatchNorm in both networks. A skip of one optimizer must leave the other network's step alone, restore
only the skipped network's buffers, and never write into a tensor the pending generator backward still needs.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_stability.callbacks import GradientGuard
from lightning_stability.callbacks.guard._manual import buffer_owners, plain_name
from tests.helpers import FAULT_WARNINGS, make_trainer, regression_loader, scale_grad

pytestmark = FAULT_WARNINGS


class GAN(pl.LightningModule):
    """Lightning's GAN example reduced to vectors: ``fake = G(z)`` once, the discriminator step on ``fake.detach()``,
    then the generator step back-propagating ``D(fake)`` through the same ``fake`` graph."""

    def __init__(self, inf_d_batches=(), inf_g_batches=(), fused: bool = False) -> None:
        super().__init__()
        self.fused = fused
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8))
        self.discriminator = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
        self.inf_d_batches = set(inf_d_batches)
        self.inf_g_batches = set(inf_g_batches)

    def training_step(self, batch, batch_idx):
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], 4, generator=torch.Generator().manual_seed(batch_idx))
        fake = self.generator(z)  # the generator's forward, once: its BatchNorm saved its running statistics
        bce = nn.functional.binary_cross_entropy_with_logits

        d_fake = self.discriminator(fake.detach())
        if batch_idx in self.inf_d_batches:
            d_fake = scale_grad(d_fake, float("inf"))
        d_real = self.discriminator(real)
        d_loss = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()

        g_in = scale_grad(fake, float("inf")) if batch_idx in self.inf_g_batches else fake
        g_out = self.discriminator(g_in)
        g_loss = bce(g_out, torch.ones_like(g_out))
        opt_g.zero_grad()
        self.manual_backward(g_loss)  # through the generator graph built before the discriminator's step
        opt_g.step()

    def configure_optimizers(self):
        return (
            torch.optim.Adam(self.generator.parameters(), lr=1e-2, fused=self.fused),
            torch.optim.Adam(self.discriminator.parameters(), lr=1e-2, fused=self.fused),
        )

    def train_dataloader(self):
        return regression_loader()


class BatchRecorder(pl.Callback):
    """The state of each network (parameters, buffers, its optimizer's state) at the start of every batch."""

    def __init__(self) -> None:
        self.snaps: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.snaps[batch_idx] = {
            net: {
                "module": {k: v.detach().clone() for k, v in getattr(pl_module, net).state_dict().items()},
                "optim": {
                    i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                    for i, s in trainer.optimizers[j].state_dict()["state"].items()
                },
            }
            for j, net in enumerate(("generator", "discriminator"))
        }


def _identical(a: dict, b: dict) -> bool:
    if a["module"].keys() != b["module"].keys() or a["optim"].keys() != b["optim"].keys():
        return False
    same = all(torch.equal(a["module"][k], b["module"][k]) for k in a["module"])
    for i in a["optim"]:
        for k, v in a["optim"][i].items():
            w = b["optim"][i][k]
            same &= torch.equal(v, w) if torch.is_tensor(v) else v == w
    return same


def _stepped(a: dict, b: dict) -> bool:
    """Every parameter and every buffer of the network moved (a step was taken and BatchNorm saw a batch)."""
    return all(not torch.equal(a["module"][k], b["module"][k]) for k in a["module"])


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("faulty", ["discriminator", "generator"])
def test_gan_skip_touches_only_the_skipped_network(tmp_path, faulty, sync_free):
    faults = {"inf_d_batches": {2}} if faulty == "discriminator" else {"inf_g_batches": {2}}
    module = GAN(**faults, fused=sync_free)  # sync-free mode decides on the device with a fused optimizer
    guard = GradientGuard(sync_free=sync_free, log_every_n_steps=1)
    rec = BatchRecorder()
    make_trainer(tmp_path, [guard, rec], max_steps=10).fit(module)  # 5 batches, 2 optimizer steps each
    assert guard.num_skipped == 1
    other = "generator" if faulty == "discriminator" else "discriminator"
    assert _identical(rec.snaps[2][faulty], rec.snaps[3][faulty])  # parameters, buffers and optimizer state
    assert _stepped(rec.snaps[2][other], rec.snaps[3][other])
    assert _stepped(rec.snaps[3][faulty], rec.snaps[4][faulty])  # and the next batch trains it again
    skip = guard.event_log.events[0]
    assert all(name.startswith(f"{faulty}.") for name in skip.data["nonfinite_params"])
    # `global_step` counts both optimizers' `step()` calls, the skipped one included
    assert skip.step == (4 if faulty == "discriminator" else 5)


def test_without_the_deferred_restore_the_gan_pattern_crashes(tmp_path):
    # the control: restoring the generator's BatchNorm statistics in place between its forward and its backward
    # is what broke the run before (the restore now waits for the end of the batch)
    gen = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    out = gen(torch.randn(8, 4))
    with torch.no_grad():
        gen[1].running_mean.copy_(torch.zeros(8))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_gan_rollback_waits_for_the_end_of_the_batch(tmp_path):
    # the discriminator's gradients are inf for 2 batches in a row: the second is persistent trouble, rolled back to
    # the snapshot of step 0 at the end of batch 3, after the generator's backward through the same graph ran
    module = GAN(inf_d_batches={2, 3})
    guard = GradientGuard(max_consecutive_skips=2, on_persistent="rollback", snapshot_every=1000)
    rec = BatchRecorder()
    make_trainer(tmp_path, [guard, rec], max_steps=10).fit(module)
    assert guard.num_rollbacks == 1
    for net in ("generator", "discriminator"):
        assert _identical(rec.snaps[0][net], rec.snaps[4][net])  # both networks back at the snapshot


def test_buffer_owners_follow_the_optimized_parameters():
    module = GAN()
    module.generator.add_module("norm", nn.BatchNorm1d(8, affine=False))  # no parameters of its own
    opts = module.configure_optimizers()
    names = [n for n, _ in module.named_buffers()]
    owners = dict(zip(names, buffer_owners(module, names, opts)))
    assert owners["generator.1.running_mean"] == {0}
    assert owners["generator.norm.running_var"] == {0}  # the network around it
    assert owners["discriminator.1.num_batches_tracked"] == {1}
    assert plain_name("generator._orig_mod.0.weight") == "generator.0.weight"
