import math

import numpy as np
import pesq as pesq_backend
import pyloudnorm
import pystoi
import pytest
import torch

from lightning_stability.metrics.perceptual import (
    SpeechQualityError,
    integrated_loudness,
    loudness_error,
    stoi,
    wideband_pesq,
)


def voiced(seconds: float, rate: int, seed: int = 0) -> torch.Tensor:
    """A speech-like test signal: a 110-140 Hz harmonic voice with formant-ish weights and 4 Hz syllables."""
    g = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(k * phase + g.uniform(0, 2 * np.pi)) / k * (1.5 if 4 <= k <= 7 else 1.0) for k in range(1, 30))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 0.5
    x = 0.1 * x * envelope / np.sqrt(np.mean((x * envelope) ** 2))
    return torch.from_numpy(x.astype(np.float32))


def noisy(x: torch.Tensor, level: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return x + level * torch.randn(x.shape, generator=g)


# ------------------------------------------------------------------------------------------------------ PESQ
def test_pesq_of_an_identical_pair_is_the_top_of_the_p862_2_scale():
    x = voiced(2.0, 16000)
    assert wideband_pesq(x, x, 16000).item() == pytest.approx(4.6439, abs=1e-3)


def test_pesq_at_16k_equals_the_pesq_package_called_directly():
    target = torch.stack([voiced(2.0, 16000, seed=s) for s in range(3)])
    preds = torch.stack([noisy(target[i], level, seed=i) for i, level in enumerate((0.005, 0.02, 0.05))])
    got = wideband_pesq(preds, target, 16000)
    assert got.shape == (3,)
    direct = [pesq_backend.pesq(16000, target[i].numpy(), preds[i].numpy(), "wb") for i in range(3)]
    np.testing.assert_allclose(got.numpy(), direct, rtol=1e-5)
    assert got[0] > got[1] > got[2]  # more noise, lower quality


def test_pesq_resamples_other_rates_to_16k_first():
    import torchaudio

    target = voiced(2.0, 24000)
    preds = noisy(target, 0.01)
    got = wideband_pesq(preds[None, None], target[None, None], 24000)
    assert got.shape == (1, 1)
    t16 = torchaudio.functional.resample(target.double(), 24000, 16000)
    p16 = torchaudio.functional.resample(preds.double(), 24000, 16000)
    direct = pesq_backend.pesq(16000, t16.numpy(), p16.numpy(), "wb")
    assert got.item() == pytest.approx(direct, rel=1e-4)


@pytest.mark.parametrize(
    ("preds", "target", "reason"),
    [
        (voiced(1.0, 16000), torch.zeros(16000), "the target is silent"),
        (torch.zeros(16000), voiced(1.0, 16000), "the prediction is silent"),
        (voiced(0.2, 16000), voiced(0.2, 16000), "shorter than PESQ's minimum of 0.25 s"),
        (torch.full((16000,), math.nan), voiced(1.0, 16000), "the prediction has non-finite samples"),
    ],
)
def test_pesq_names_what_it_cannot_score(preds, target, reason):
    with pytest.raises(SpeechQualityError, match=f"PESQ cannot score series 0: {reason}"):
        wideband_pesq(preds, target, 16000)
    assert math.isnan(wideband_pesq(preds, target, 16000, on_error="nan").item())


def test_pesq_marks_only_the_unscorable_series_nan():
    good = voiced(1.0, 16000)
    preds = torch.stack([noisy(good, 0.01), good])
    target = torch.stack([good, torch.zeros(16000)])
    got = wideband_pesq(preds, target, 16000, on_error="nan")
    assert math.isfinite(got[0].item())
    assert math.isnan(got[1].item())


def test_pesq_rejects_bad_arguments():
    x = voiced(1.0, 16000)
    with pytest.raises(ValueError, match=r"preds \(16000,\) and target \(8000,\)"):
        wideband_pesq(x, x[:8000], 16000)
    with pytest.raises(ValueError, match="`sample_rate` must be >= 1, got 0"):
        wideband_pesq(x, x, 0)
    with pytest.raises(TypeError, match="`sample_rate` must be an int, got 16000.0"):
        wideband_pesq(x, x, 16000.0)
    with pytest.raises(ValueError, match=r"`on_error` must be one of \('raise', 'nan'\), got 'skip'"):
        wideband_pesq(x, x, 16000, on_error="skip")


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda x: stoi(x, x, 16000, extended=1), TypeError, "`extended` must be a bool, got 1"),
        (lambda x: stoi(x, x, "16000"), TypeError, "`sample_rate` must be an int, got '16000'"),
        (lambda x: stoi(x, x, -1), ValueError, "`sample_rate` must be >= 1, got -1"),
        (lambda x: loudness_error(x, x, 16000, signed="yes"), TypeError, "`signed` must be a bool, got 'yes'"),
        (lambda x: loudness_error(x, x, 16000, on_error=None), ValueError, "`on_error` must be one of"),
        (lambda x: integrated_loudness(x, 0), ValueError, "`sample_rate` must be >= 1, got 0"),
        (lambda x: integrated_loudness(x.numpy(), 16000), TypeError, "`x` must be a torch.Tensor, got ndarray"),
        (lambda x: integrated_loudness(x[0], 16000), ValueError, "`x` must have a time dimension"),
    ],
)
def test_functions_name_the_bad_argument(call, error, match):
    with pytest.raises(error, match=match):
        call(voiced(1.0, 16000))


# ------------------------------------------------------------------------------------------------------ STOI
def test_stoi_of_an_identical_pair_is_one():
    x = voiced(2.0, 24000)
    assert stoi(x, x, 24000).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("rate", [16000, 24000])
@pytest.mark.parametrize("extended", [False, True])
def test_stoi_equals_pystoi_called_directly_at_the_signals_own_rate(rate, extended):
    target = voiced(2.0, rate)
    preds = noisy(target, 0.05)
    got = stoi(preds, target, rate, extended=extended).item()
    direct = pystoi.stoi(target.double().numpy(), preds.double().numpy(), rate, extended=extended)
    assert got == pytest.approx(direct, rel=1e-5)
    assert 0.0 < got < 1.0


def test_stoi_refuses_pystois_placeholder_for_too_little_speech():
    x = voiced(0.3, 16000)  # under 30 frames of 384 ms at 10 kHz: pystoi warns and returns 1e-5
    with pytest.raises(SpeechQualityError, match="too little non-silent speech for STOI"):
        stoi(x, x, 16000)
    with pytest.raises(SpeechQualityError, match="STOI cannot score series 0: the target is silent"):
        stoi(x, torch.zeros_like(x), 16000)


# -------------------------------------------------------------------------------------------------- loudness
def test_loudness_error_of_a_signal_against_itself_at_minus_6_db_is_6_lu():
    x = voiced(2.0, 24000)
    quieter = x * 10 ** (-6 / 20)
    assert loudness_error(quieter, x, 24000).item() == pytest.approx(6.0, abs=1e-4)
    assert loudness_error(quieter, x, 24000, signed=True).item() == pytest.approx(-6.0, abs=1e-4)
    assert loudness_error(x, quieter, 24000, signed=True).item() == pytest.approx(6.0, abs=1e-4)
    assert loudness_error(x, x, 24000).item() == 0.0


def test_integrated_loudness_is_pyloudnorms():
    x = voiced(2.0, 24000)
    direct = pyloudnorm.Meter(24000).integrated_loudness(x.double().numpy())
    assert integrated_loudness(x, 24000).item() == pytest.approx(direct, abs=1e-5)
    assert integrated_loudness(torch.zeros(2, 24000), 24000).tolist() == [-math.inf, -math.inf]
    with pytest.raises(ValueError, match=r"longer than one BS.1770 block \(0.4 s = 9600 samples at 24000 Hz\)"):
        integrated_loudness(x[:9000], 24000)


def test_loudness_error_floors_a_silent_reconstruction_at_the_absolute_gate():
    x = voiced(2.0, 16000)
    lx = pyloudnorm.Meter(16000).integrated_loudness(x.double().numpy())
    got = loudness_error(torch.zeros_like(x), x, 16000, signed=True).item()
    assert got == pytest.approx(-70.0 - lx, abs=1e-4)
    with pytest.raises(SpeechQualityError, match="the target is below BS.1770's absolute gate"):
        loudness_error(x, torch.zeros_like(x), 16000)
    with pytest.raises(SpeechQualityError, match="shorter than one BS.1770 block"):
        loudness_error(x[:1000], x[:1000], 16000)


def test_integer_samples_are_refused_by_name():
    x = voiced(1.0, 16000)
    with pytest.raises(TypeError, match="`target` must hold float audio samples"):
        stoi(x, (x * 32767).to(torch.int16), 16000)
