import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_stability.metrics import CodebookUsage, DCOffset, PeakAmplitude, RMSRatio
from tests.helpers import make_trainer

EPS32 = float(np.finfo(np.float32).eps)


def _batches(seed: int, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        scale = 0.5 * (i + 1)
        preds = scale * torch.randn(2, 1, 40 + 10 * i, generator=g) - 0.1
        target = torch.randn(2, 1, 40 + 10 * i, generator=g)
        out.append((preds, target))
    return out


def _hand(batches, clip_level=1.0):
    p = np.concatenate([b[0].double().numpy().ravel() for b in batches])
    t = np.concatenate([b[1].double().numpy().ravel() for b in batches])
    return {
        "rms_ratio": math.sqrt((p**2).mean()) / math.sqrt((t**2).mean()),
        "dc_offset": p.mean(),
        "peak": np.abs(p).max(),
        "clip_fraction": (np.abs(p) >= clip_level).mean(),
    }


def test_metrics_accumulate_batches_of_different_lengths_like_one_pooled_computation():
    batches = _batches(0)
    expected = _hand(batches, clip_level=0.8)
    ratio, dc, peak = RMSRatio(), DCOffset(), PeakAmplitude(clip_level=0.8)
    for preds, target in batches:
        ratio.update(preds, target)
        dc.update(preds, target)
        peak.update(preds)
    assert ratio.compute().item() == pytest.approx(expected["rms_ratio"], rel=1e-5)
    assert dc.compute().item() == pytest.approx(expected["dc_offset"], abs=1e-6)
    result = peak.compute()
    assert result["peak"].item() == pytest.approx(expected["peak"], rel=1e-6)
    assert result["clip_fraction"].item() == pytest.approx(expected["clip_fraction"], rel=1e-6)
    # reset starts a fresh window
    ratio.reset()
    ratio.update(*batches[0])
    assert ratio.compute().item() == pytest.approx(_hand(batches[:1])["rms_ratio"], rel=1e-5)


def test_metrics_with_bf16_inputs_match_the_hand_computation_of_the_bf16_values():
    batches = [(p.bfloat16(), t.bfloat16()) for p, t in _batches(3)]
    expected = _hand([(p.float(), t.float()) for p, t in batches])
    ratio, dc, peak = RMSRatio(), DCOffset(), PeakAmplitude()
    for preds, target in batches:
        ratio.update(preds, target)
        dc.update(preds)
        peak.update(preds)
    assert ratio.compute().dtype == torch.float32
    assert ratio.compute().item() == pytest.approx(expected["rms_ratio"], rel=1e-5)
    assert dc.compute().item() == pytest.approx(expected["dc_offset"], abs=1e-6)
    assert peak.compute()["peak"].item() == pytest.approx(expected["peak"], rel=1e-6)
    assert peak.compute()["clip_fraction"].item() == pytest.approx(expected["clip_fraction"], rel=1e-6)


def test_silent_target_and_empty_metric_values_are_the_documented_ones():
    ratio = RMSRatio()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert ratio.compute().item() == 1.0  # nothing seen
    ratio.update(torch.zeros(1, 1, 8), torch.zeros(1, 1, 8))
    assert ratio.compute().item() == 1.0
    ratio.update(torch.full((1, 1, 8), 0.25), torch.zeros(1, 1, 8))
    # pooled: rms_p = sqrt(8 * 0.0625 / 16), target silent -> floored at eps
    assert ratio.compute().item() == pytest.approx(math.sqrt(0.0625 / 2) / EPS32, rel=1e-5)
    assert math.isfinite(ratio.compute().item())
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert DCOffset().compute().item() == 0.0
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert PeakAmplitude().compute()["clip_fraction"].item() == 0.0


def test_nan_output_makes_the_peak_nan_and_stays_visible():
    peak = PeakAmplitude()
    peak.update(torch.tensor([[float("nan"), 0.1]]))
    peak.update(torch.tensor([[0.3, 0.1]]))
    assert math.isnan(peak.compute()["peak"].item())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"clip_level": 0.0}, ValueError, r"`clip_level`.*0\.0"),
        ({"clip_level": float("inf")}, ValueError, "`clip_level`"),
        ({"clip_level": "1"}, TypeError, "`clip_level` must be a number, got '1'"),
        ({"clip_level": -1}, ValueError, "`clip_level` must be a finite number > 0, got -1.0"),
    ],
)
def test_peak_amplitude_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        PeakAmplitude(**kwargs)


def test_update_with_mismatched_shapes_names_both():
    with pytest.raises(ValueError, match=r"preds \(2, 1, 5\) and target \(2, 1, 6\)"):
        RMSRatio().update(torch.zeros(2, 1, 5), torch.zeros(2, 1, 6))


# ----------------------------------------------------------------------------------------------------------- DDP
def _rank_data(rank: int):
    """Different data on each rank: rank 1 is louder, longer, and clips."""
    g = torch.Generator().manual_seed(10 + rank)
    t = 64 + 32 * rank
    preds = (0.3 + rank) * torch.randn(2, 1, t, generator=g) + 0.05 * (rank + 1)
    target = torch.randn(2, 1, t, generator=g)
    codes = torch.randint(0, 4 + 2 * rank, (2, 2, 5 + rank), generator=g)  # rank 1 reaches codes 4, 5
    return preds, target, codes


class _MetricsModule(pl.LightningModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.layer = torch.nn.Linear(1, 1)
        self.ratio = RMSRatio()
        self.dc = DCOffset()
        self.peak = PeakAmplitude()
        self.codebook = CodebookUsage(num_codebooks=2, codebook_size=8)

    def validation_step(self, batch, batch_idx):
        preds, target, codes = _rank_data(self.global_rank)
        self.ratio.update(preds.to(self.device), target.to(self.device))
        self.dc.update(preds.to(self.device))
        self.peak.update(preds.to(self.device))
        self.codebook.update(codes.to(self.device))

    def on_validation_epoch_end(self):
        results = {
            "rms_ratio": self.ratio.compute(),
            "dc_offset": self.dc.compute(),
            **self.peak.compute(),
            **{f"codebook_{k}": v for k, v in self.codebook.compute().items()},
        }
        torch.save({k: v.cpu() for k, v in results.items()}, f"{self.out_dir}/rank{self.global_rank}.pt")

    def val_dataloader(self):
        return DataLoader(torch.zeros(2, 1), batch_size=1)


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_all_metrics_reduce_over_the_union_of_ranks_under_ddp_spawn(tmp_path):
    trainer = make_trainer(tmp_path, devices=2, strategy="ddp_spawn", limit_val_batches=1.0)
    trainer.validate(_MetricsModule(str(tmp_path)), verbose=False)

    data = [_rank_data(r) for r in range(2)]
    expected = _hand([(p, t) for p, t, _ in data])
    hist = np.zeros((2, 8))
    for _, _, codes in data:
        for stage in range(2):
            hist[stage] += np.bincount(codes[:, stage].numpy().ravel(), minlength=8)
    p = hist / hist.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        perplexity = np.exp(-np.nansum(p * np.log(p), axis=1))
    dead = (hist == 0).mean(1)

    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["rms_ratio"].item() == pytest.approx(expected["rms_ratio"], rel=1e-5)
        assert got["dc_offset"].item() == pytest.approx(expected["dc_offset"], abs=1e-6)
        assert got["peak"].item() == pytest.approx(expected["peak"], rel=1e-6)
        assert got["clip_fraction"].item() == pytest.approx(expected["clip_fraction"], rel=1e-6)
        np.testing.assert_allclose(got["codebook_perplexity"].numpy(), perplexity, rtol=1e-5)
        np.testing.assert_allclose(got["codebook_dead_fraction"].numpy(), dead, rtol=1e-6)
    # the union differs from either rank alone (the test would catch a missing reduction)
    alone = _hand([data[0][:2]])
    assert alone["peak"] < expected["peak"]
    assert alone["rms_ratio"] != pytest.approx(expected["rms_ratio"], rel=1e-2)
