import math

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_stability.callbacks._report_plot import (
    Panel,
    Series,
    log_mel_db,
    mel_filterbank,
    render_mel_pair,
    render_report,
)


@pytest.mark.parametrize(("sample_rate", "n_fft"), [(8000, 512), (16000, 1024), (24000, 1024), (44100, 2048)])
def test_mel_filterbank_has_no_empty_filter_and_covers_the_band(sample_rate, n_fft):
    bank = mel_filterbank(sample_rate, n_fft, 80)
    assert bank.shape == (80, n_fft // 2 + 1)
    assert (bank.sum(dim=1) > 0).all()
    peaks = bank.argmax(dim=1)
    assert (peaks[1:] >= peaks[:-1]).all()  # filters ordered by frequency


def test_log_mel_of_a_tone_peaks_at_its_frequency_and_silence_sits_at_the_floor():
    sr = 16000
    t = torch.arange(sr) / sr
    tone = torch.sin(2 * math.pi * 1000 * t)
    mel = log_mel_db(tone, sr, n_mels=64)
    centers = mel_filterbank(sr, 1024, 64).argmax(dim=1).float() * (sr / 2) / 512
    peak_hz = centers[mel.mean(dim=1).argmax()].item()
    assert abs(peak_hz - 1000) < 100
    silence = log_mel_db(torch.zeros(sr), sr)
    assert silence.max().item() == pytest.approx(-100.0)


def test_log_mel_survives_non_finite_and_very_short_input():
    x = torch.randn(300)
    x[10] = float("nan")
    x[20] = float("inf")
    assert torch.isfinite(log_mel_db(x, 24000)).all()
    assert torch.isfinite(log_mel_db(torch.randn(5), 24000)).all()


def test_mel_pair_image_is_rgb_uint8():
    x = torch.randn(4000)
    image = render_mel_pair(x, 0.5 * x, 8000, title="t")
    assert image.dtype == np.uint8
    assert image.ndim == 3
    assert image.shape[2] == 3
    assert image.std() > 10  # not a blank canvas


def test_report_figure_with_non_finite_points_and_without_panels(tmp_path):
    panel = Panel(
        "grad",
        "norm",
        [Series("g", [0, 1, 2, 3], [1.0, float("inf"), float("nan"), 2.0])],
        log_y=True,
        marks={"skip (2)": [1, 2]},
        hlines={"bound": 1.5},
    )
    path = render_report([panel, Panel("neg", "x", [Series("s", [0, 1], [-1.0, 1.0])], log_y=True)], tmp_path / "a.png")
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[1] > 400
    empty = render_report([], tmp_path / "sub" / "b.png")
    with Image.open(empty) as img:
        assert img.size[0] >= 800
