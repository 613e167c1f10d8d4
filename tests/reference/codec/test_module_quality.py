"""``CodecModule``'s validation speech-quality metrics (``quality_metrics``): PESQ, STOI, loudness error."""

import math

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_stability.metrics.perceptual import loudness_error, stoi, wideband_pesq
from lightning_stability.reference.codec.module import CodecModule
from tests._helpers_codec import TINY, chirps
from tests.helpers import make_trainer

RATE = 16000
QUALITY_KEYS = ("val/pesq", "val/stoi", "val/loudness_error_lu")


def _codec(**kwargs) -> CodecModule:
    return CodecModule(**{**TINY, "sample_rate": RATE, **kwargs})


def _clips(silent_last: bool) -> torch.Tensor:
    clips = chirps(4, length=RATE, sr=RATE, seed=3)  # 1 s each: long enough for PESQ, STOI and BS.1770
    if silent_last:
        clips[-1] = 0.0
    return clips


def _validate(tmp_path, codec, clips):
    trainer = make_trainer(tmp_path, limit_val_batches=1.0)
    trainer.validate(codec, dataloaders=DataLoader(clips, batch_size=2), verbose=False)
    return trainer.callback_metrics


def test_validation_logs_pesq_stoi_and_loudness_error_of_the_reconstructions(tmp_path):
    torch.manual_seed(0)
    codec = _codec()
    clips = _clips(silent_last=False)
    logged = _validate(tmp_path, codec, clips)
    with torch.no_grad():
        recon = codec.eval()(clips).audio  # quantizer initialised by the validation run; deterministic in eval
    expected = {
        "val/pesq": wideband_pesq(recon, clips, RATE).mean(),
        "val/stoi": stoi(recon, clips, RATE).mean(),
        "val/loudness_error_lu": loudness_error(recon, clips, RATE).mean(),
    }
    for key, value in expected.items():
        assert logged[key].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-4), key
        assert logged[key + "_skipped"].item() == 0.0
    assert 1.0 <= logged["val/pesq"].item() <= 4.65


def test_a_silent_clip_is_skipped_counted_and_named_not_fatal(tmp_path):
    codec = _codec()
    expected = r"val/pesq skipped 1 of 4 validation clips \(clip 1 of its batch: the target is silent"
    with pytest.warns(UserWarning, match=expected):
        logged = _validate(tmp_path, codec, _clips(silent_last=True))
    assert logged["val/pesq_skipped"].item() == 1.0
    assert logged["val/stoi_skipped"].item() == 1.0
    assert logged["val/loudness_error_lu_skipped"].item() == 1.0
    for key in QUALITY_KEYS:
        assert math.isfinite(logged[key].item()), key


def test_quality_metrics_can_be_turned_off_or_chosen(tmp_path):
    logged = _validate(tmp_path, _codec(quality_metrics=None), _clips(silent_last=False))
    assert not any(k in logged for k in QUALITY_KEYS)
    assert "val/si_snr" in logged
    codec = _codec(quality_metrics=["loudness"])
    assert list(codec.val_metrics[0].quality) == ["loudness_error_lu"]
    with pytest.raises(ValueError, match=r"`quality_metrics` names unknown metrics \['visqol'\]"):
        _codec(quality_metrics=["visqol"])
