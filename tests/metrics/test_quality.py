import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_stability.metrics import STOI, LoudnessError, WidebandPESQ
from lightning_stability.metrics.perceptual import loudness_error, stoi, wideband_pesq
from lightning_stability.metrics.quality import (
    QUALITY_METRICS,
    build_quality_metrics,
    resolve_quality_metrics,
    summarize,
)
from tests.helpers import make_trainer
from tests.metrics.test_perceptual import noisy, voiced

RATE = 16000


def _batch(seed: int, n: int = 2, seconds: float = 1.0):
    target = torch.stack([voiced(seconds, RATE, seed=seed * 10 + i) for i in range(n)])[:, None]
    preds = torch.stack([noisy(target[i, 0], 0.01 * (i + 1), seed=seed * 10 + i) for i in range(n)])[:, None]
    return preds, target


@pytest.mark.parametrize(
    ("cls", "fn"),
    [(WidebandPESQ, wideband_pesq), (STOI, stoi), (LoudnessError, loudness_error)],
)
def test_metric_is_the_mean_of_the_functional_over_every_series_seen(cls, fn):
    batches = [_batch(0), _batch(1, n=3)]
    metric = cls(RATE)
    for preds, target in batches:
        metric.update(preds, target)
    expected = torch.cat([fn(p, t, RATE).flatten() for p, t in batches]).double().mean()
    assert metric.compute().item() == pytest.approx(expected.item(), rel=1e-5)
    assert int(metric.count) == 5
    assert int(metric.skipped) == 0
    metric.reset()
    assert math.isnan(metric.compute().item())


def test_unscorable_clips_are_counted_and_skipped_not_raised():
    preds, target = _batch(0)
    silent_target = torch.cat([target, torch.zeros(1, 1, target.shape[-1])])
    preds3 = torch.cat([preds, preds[:1]])
    metric = WidebandPESQ(RATE)
    metric.update(preds3, silent_target)  # the third clip's reference is silent
    assert (int(metric.count), int(metric.skipped)) == (2, 1)
    assert metric.compute().item() == pytest.approx(wideband_pesq(preds, target, RATE).mean().item(), rel=1e-5)
    assert metric.last_skip_reason == "clip 2 of its batch: the target is silent (PESQ needs speech in the reference)"
    nan_preds = torch.full_like(preds, math.nan)
    for m in (STOI(RATE), LoudnessError(RATE)):
        m.update(nan_preds, target)
        assert (int(m.count), int(m.skipped)) == (0, 2)
        assert "non-finite" in m.last_skip_reason
        assert math.isnan(m.compute().item())
    metric.reset()
    assert metric.last_skip_reason is None
    assert int(metric.skipped) == 0


def test_states_are_sufficient_statistics():
    """Two halves merged (what DDP's sum reduction does) equal one metric that saw everything."""
    (p1, t1), (p2, t2) = _batch(0), _batch(1)
    whole, a, b = LoudnessError(RATE, signed=True), LoudnessError(RATE, signed=True), LoudnessError(RATE, signed=True)
    whole.update(torch.cat([p1, p2]), torch.cat([t1, t2]))
    a.update(p1, t1)
    b.update(p2, t2)
    a.merge_state(b)
    assert a.compute().item() == pytest.approx(whole.compute().item(), rel=1e-6)
    assert summarize(a)[1:] == (4, 0)


def test_resolve_quality_metrics():
    assert resolve_quality_metrics("auto") == ("pesq", "stoi", "loudness")  # the test extra installs all three
    assert resolve_quality_metrics(None) == ()
    assert resolve_quality_metrics(["stoi", "stoi"]) == ("stoi",)
    with pytest.raises(ValueError, match=r"unknown metrics \['mos'\]; known: \['pesq', 'stoi', 'loudness'\]"):
        resolve_quality_metrics(["pesq", "mos"])
    with pytest.raises(ValueError, match="`quality_metrics` must be 'auto', None or a sequence"):
        resolve_quality_metrics("pesq")
    assert set(build_quality_metrics(["pesq", "loudness"], RATE)) == {"pesq", "loudness_error_lu"}
    assert set(QUALITY_METRICS) == {"pesq", "stoi", "loudness"}


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: STOI(16000.0), TypeError, "`sample_rate` must be an int, got 16000.0"),
        (lambda: STOI(0), ValueError, "`sample_rate` must be >= 1, got 0"),
        (lambda: STOI(16000, extended="yes"), TypeError, "`extended` must be a bool, got 'yes'"),
        (lambda: WidebandPESQ(-16000), ValueError, "`sample_rate` must be >= 1, got -16000"),
        (lambda: WidebandPESQ(None), TypeError, "`sample_rate` must be an int, got None"),
        (lambda: LoudnessError(16000, signed=1), TypeError, "`signed` must be a bool, got 1"),
        (lambda: LoudnessError(True), TypeError, "`sample_rate` must be an int, got True"),
    ],
)
def test_constructor_rejects_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


# ------------------------------------------------------------------------------------------------------- DDP
def _rank_data(rank: int):
    preds, target = _batch(5 + rank, n=1 + rank)  # rank 0: 1 clip, rank 1: 2 clips
    if rank == 1:
        target = torch.cat([target, torch.zeros_like(target[:1])])  # plus one silent reference: skipped
        preds = torch.cat([preds, preds[:1]])
    return preds, target


class _QualityModule(pl.LightningModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.layer = torch.nn.Linear(1, 1)
        self.quality = torch.nn.ModuleDict(build_quality_metrics(["pesq", "stoi", "loudness"], RATE))

    def validation_step(self, batch, batch_idx):
        preds, target = _rank_data(self.global_rank)
        for metric in self.quality.values():
            metric.update(preds.to(self.device), target.to(self.device))

    def on_validation_epoch_end(self):
        results = {}
        for name, metric in self.quality.items():
            mean, count, skipped = summarize(metric)
            results[name] = (mean.item(), count, skipped, metric.compute().item())
        torch.save(results, f"{self.out_dir}/rank{self.global_rank}.pt")

    def val_dataloader(self):
        return DataLoader(torch.zeros(2, 1), batch_size=1)


@pytest.mark.ddp
@pytest.mark.timeout(240)
def test_quality_metrics_are_exact_over_the_union_of_ranks_under_ddp_spawn(tmp_path):
    trainer = make_trainer(tmp_path, devices=2, strategy="ddp_spawn", limit_val_batches=1)
    trainer.validate(_QualityModule(str(tmp_path)), verbose=False)
    preds = torch.cat([_rank_data(r)[0][:2] for r in range(2)])  # the three scorable clips
    target = torch.cat([_rank_data(r)[1][:2] for r in range(2)])
    expected = {
        "pesq": wideband_pesq(preds, target, RATE).double().mean().item(),
        "stoi": stoi(preds, target, RATE).double().mean().item(),
        "loudness_error_lu": loudness_error(preds, target, RATE).double().mean().item(),
    }
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for name, value in expected.items():
            mean, count, skipped, computed = got[name]
            assert (count, skipped) == (3, 1), name
            assert mean == pytest.approx(value, rel=1e-5), name
            assert computed == pytest.approx(value, rel=1e-5), name
    alone = wideband_pesq(*_rank_data(0), RATE).mean().item()
    assert not np.isclose(alone, expected["pesq"], rtol=1e-3)  # the reduction matters
