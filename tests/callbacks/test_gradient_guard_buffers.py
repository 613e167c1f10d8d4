"""Issue 10: a step ``GradientGuard`` skips leaves every buffer as it was (BatchNorm statistics, EMA codebooks,
spectral norm's ``_u``/``_v``), including under gradient accumulation, sync-free mode and DDP."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_stability.callbacks import GradientGuard
from tests._helpers_guard import FusedFaultyModule, RankDump, StepRecorder, TwoOptimizerModule
from tests.helpers import FAULT_WARNINGS, FaultyModule, assert_same, make_trainer, regression_loader

pytestmark = FAULT_WARNINGS  # these tests inject faults: the guard's notices are expected


class EMAQuantizer(nn.Module):
    """Minimal EMA-codebook vector quantizer (VQ-VAE-2 / EnCodec style): the codebook moves in ``forward``.

    ``cluster_size <- d * cluster_size + (1 - d) * counts``, ``embed_avg <- d * embed_avg + (1 - d) * onehot^T x``,
    ``embed = embed_avg / cluster_size``. A NaN input writes NaN into all three buffers.
    """

    def __init__(self, dim: int = 4, codes: int = 8, decay: float = 0.9) -> None:
        super().__init__()
        self.decay = decay
        embed = torch.randn(codes, dim)
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.ones(codes))
        self.register_buffer("embed_avg", embed.clone())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.cdist(x, self.embed).argmin(-1)  # B
        q = self.embed[idx]  # B, D
        if self.training:
            with torch.no_grad():
                onehot = nn.functional.one_hot(idx, self.embed.shape[0]).type_as(x)  # B, K
                self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
                self.embed_avg.mul_(self.decay).add_(onehot.t() @ x, alpha=1 - self.decay)
                self.embed.copy_(self.embed_avg / (self.cluster_size.unsqueeze(1) + 1e-5))
        commit = nn.functional.mse_loss(x, q.detach())
        return x + (q - x).detach(), commit


class VQModule(pl.LightningModule):
    def __init__(self, nan_input_steps=()) -> None:
        super().__init__()
        self.encoder = nn.Linear(8, 4)
        self.quantizer = EMAQuantizer()
        self.decoder = nn.Linear(4, 4)
        self.nan_input_steps = set(nan_input_steps)
        self.step_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.global_step in self.nan_input_steps:
            x = torch.full_like(x, float("nan"))
        z, commit = self.quantizer(self.encoder(x))
        loss = nn.functional.mse_loss(self.decoder(z), y) + 0.25 * commit
        self.step_losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        return regression_loader()


class RVQCodecModule(pl.LightningModule):
    """A user's tiny codec around the project's own ``ResidualVectorQuantizer`` (EMA codebooks, k-means init)."""

    def __init__(self, nan_input_steps=()) -> None:
        super().__init__()
        from lightning_stability.nn.quantize import ResidualVectorQuantizer

        self.encoder = nn.Conv1d(1, 8, 4, stride=4)
        self.quantizer = ResidualVectorQuantizer(8, n_q=2, codebook_size=16, kmeans_iters=2)
        self.decoder = nn.ConvTranspose1d(8, 1, 4, stride=4)
        self.nan_input_steps = set(nan_input_steps)
        self.step_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, _ = batch
        audio = x.reshape(x.shape[0], 1, -1)  # B, 1, 8
        if self.global_step in self.nan_input_steps:
            audio = torch.full_like(audio, float("nan"))
        q = self.quantizer(self.encoder(audio))
        loss = nn.functional.mse_loss(self.decoder(q.quantized), audio) + q.penalty()
        self.step_losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        return regression_loader()


class SpectralBatchNormModule(FaultyModule):
    """BatchNorm (running statistics) plus a spectral-norm output layer (power-iteration buffers ``_u``/``_v``)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(batchnorm=True, **kwargs)
        torch.nn.utils.parametrizations.spectral_norm(self.net[3])


class MicroBatchFaultModule(FaultyModule):
    """NaN input at chosen *batch indices* (not steps), to fault one micro-batch of an accumulated step."""

    def __init__(self, nan_batches=(), **kwargs) -> None:
        super().__init__(batchnorm=True, **kwargs)
        self.nan_batches = set(nan_batches)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if batch_idx in self.nan_batches:
            x = torch.full_like(x, float("nan"))
        return super().training_step((x, y), batch_idx)


def _buffers(snap: dict, module: nn.Module) -> dict:
    names = {n for n, _ in module.named_buffers()}
    return {k: v for k, v in snap["module"].items() if k in names}


def _all_finite(snap: dict) -> bool:
    return all(torch.isfinite(v.float()).all() for v in snap["module"].values())


def test_batchnorm_and_spectral_norm_buffers_are_restored_on_a_skipped_step(tmp_path):
    module = SpectralBatchNormModule(nan_input_steps={3})
    guard = GradientGuard()
    rec = StepRecorder()
    make_trainer(tmp_path, [guard, rec], max_steps=7).fit(module)
    assert guard.num_skipped == 1
    buffers = _buffers(rec.snaps[3], module)
    assert {"net.1.running_mean", "net.1.running_var", "net.1.num_batches_tracked"} <= set(buffers)
    assert any(k.endswith("_u") for k in buffers)
    assert_same(rec.snaps[3], rec.snaps[4])  # every parameter, buffer and optimizer state
    assert not torch.equal(rec.snaps[4]["module"]["net.1.running_mean"], rec.snaps[5]["module"]["net.1.running_mean"])
    assert _all_finite(rec.final)
    assert math.isfinite(module.step_losses[-1])


def test_without_protection_the_nan_batch_poisons_the_statistics(tmp_path):
    # the control: the same run with protect_buffers=False loses its BatchNorm statistics although the step is skipped
    module = SpectralBatchNormModule(nan_input_steps={3})
    guard = GradientGuard(protect_buffers=False)
    rec = StepRecorder()
    make_trainer(tmp_path, [guard, rec], max_steps=5).fit(module)
    assert guard.num_skipped >= 1
    assert torch.isnan(rec.snaps[4]["module"]["net.1.running_mean"]).all()


def test_ema_codebook_is_restored_on_a_skipped_step(tmp_path):
    module = VQModule(nan_input_steps={3})
    guard = GradientGuard()
    rec = StepRecorder()
    make_trainer(tmp_path, [guard, rec], max_steps=7).fit(module)
    assert guard.num_skipped == 1
    assert_same(rec.snaps[3], rec.snaps[4])
    assert not torch.equal(rec.snaps[4]["module"]["quantizer.embed"], rec.snaps[5]["module"]["quantizer.embed"])
    assert _all_finite(rec.final)
    assert math.isfinite(module.step_losses[-1])


def test_the_projects_residual_vq_is_restored_on_a_skipped_step(tmp_path):
    module = RVQCodecModule(nan_input_steps={3})
    guard = GradientGuard()
    rec = StepRecorder()
    make_trainer(tmp_path, [guard, rec], max_steps=6).fit(module)
    assert guard.num_skipped == 1
    assert_same(rec.snaps[3], rec.snaps[4])  # EMA codebooks, counts and the forward counter `num_updates`
    assert (
        int(rec.snaps[5]["module"]["quantizer.num_updates"]) == int(rec.snaps[4]["module"]["quantizer.num_updates"]) + 1
    )
    assert _all_finite(rec.final)
    assert math.isfinite(module.step_losses[-1])


def test_gradient_accumulation_discards_the_buffer_updates_of_every_micro_batch(tmp_path):
    # step 2 = batches 4 and 5; only batch 5 is NaN, and batch 4's clean update of the statistics is discarded too
    module = MicroBatchFaultModule(nan_batches={5})
    guard = GradientGuard()
    rec = StepRecorder()  # keyed by global_step: taken before the first micro-batch of each step
    make_trainer(tmp_path, [guard, rec], max_steps=4, accumulate_grad_batches=2).fit(module)
    assert guard.num_skipped == 1
    assert [e.step for e in guard.event_log.events] == [2]
    assert_same(rec.snaps[2], rec.snaps[3])
    assert rec.snaps[3]["module"]["net.1.num_batches_tracked"].item() == 4  # 2 steps x 2 micro-batches, not 5 or 6
    assert _all_finite(rec.final)


def test_manual_optimization_skip_of_the_second_optimizer_restores_only_its_buffers(tmp_path):
    # batch 2 steps opt_a (clean, global step 4) then opt_b (NaN input to net_b, global step 5): net_b's buffers
    # return to their state at the start of the batch; net_a's BatchNorm update of that batch stays (issue 24)
    module = TwoOptimizerModule(nan_b_batches={2})
    guard = GradientGuard()
    rec = StepRecorder(with_optimizer=False)
    make_trainer(tmp_path, [guard, rec], max_steps=8).fit(module)
    assert guard.num_skipped == 1
    before, after = rec.snaps[4]["module"], rec.snaps[6]["module"]
    for name, _ in module.net_b.named_buffers(prefix="net_b"):
        assert torch.equal(before[name], after[name]), name
    for name in ("net_a.1.running_mean", "net_a.1.num_batches_tracked"):
        assert not torch.equal(before[name], after[name]), name
    assert not torch.equal(before["net_a.0.weight"], after["net_a.0.weight"])  # opt_a stepped
    assert torch.equal(before["net_b.0.weight"], after["net_b.0.weight"])
    assert _all_finite(rec.final)


def test_sync_free_restore_on_the_device(tmp_path):
    module = FusedFaultyModule(batchnorm=True, nan_input_steps={3})
    guard = GradientGuard(sync_free=True, log_every_n_steps=50)
    rec = StepRecorder()
    make_trainer(tmp_path, [guard, rec], max_steps=6).fit(module)
    assert guard.num_skipped == 1
    assert_same(rec.snaps[3], rec.snaps[4])
    assert _all_finite(rec.final)


@pytest.mark.parametrize(
    "selector",
    ["net.1.running_*", ("net.1.running_mean", "net.1.running_var"), lambda name, buf: buf.is_floating_point()],
)
def test_buffer_selection(tmp_path, selector):
    module = FaultyModule(batchnorm=True, nan_input_steps={2})
    guard = GradientGuard(protect_buffers=selector)
    rec = StepRecorder()
    make_trainer(tmp_path, [guard, rec], max_steps=4).fit(module)
    before, after = rec.snaps[2]["module"], rec.snaps[3]["module"]
    assert torch.equal(before["net.1.running_mean"], after["net.1.running_mean"])
    assert torch.equal(before["net.1.running_var"], after["net.1.running_var"])
    assert after["net.1.num_batches_tracked"] == before["net.1.num_batches_tracked"] + 1  # not selected


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_ddp_buffers_identical_across_ranks_after_a_skip(tmp_path):
    # Both ranks read the same batches (no distributed sampler), so their BatchNorm statistics agree step by step.
    # The NaN batch is on rank 0, whose buffers DDP broadcasts to every rank at the next forward: unrestored, they
    # would poison rank 1 too. (SyncBatchNorm needs a GPU, so it is not used here.)
    module = FaultyModule(batchnorm=True, nan_input_steps={2}, fault_ranks={0})
    guard = GradientGuard()
    dump = RankDump(tmp_path, guard)
    trainer = make_trainer(
        tmp_path,
        [guard, dump],
        max_steps=4,
        devices=2,
        strategy="ddp_spawn",
        use_distributed_sampler=False,
    )
    trainer.fit(module)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for r in ranks:
        assert r["skip_steps"] == [2]
        for k in r["state"]:
            assert torch.equal(r["before"][2][k], r["before"][3][k]), k  # params and every buffer
            assert torch.isfinite(r["state"][k].float()).all(), k
    for k in ranks[0]["state"]:
        assert torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]), k
