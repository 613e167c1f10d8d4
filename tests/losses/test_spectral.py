import math

import pytest
import torch

from lightning_stability.losses.spectral import (
    DAC_MEL_N_MELS,
    DAC_MEL_WINDOWS,
    MultiResolutionMelLoss,
    MultiResolutionSTFTLoss,
    RMSMatchingLoss,
    mel_distance,
)

SR = 16000
LOSSES = {
    "mel": lambda: MultiResolutionMelLoss(SR),
    "stft": lambda: MultiResolutionSTFTLoss(fft_sizes=(512, 256, 128)),
    "rms": lambda: RMSMatchingLoss(),
    "rms_frames": lambda: RMSMatchingLoss(frame_length=160),
    "rms_gated": lambda: RMSMatchingLoss(correlation_gate=(0.2, 0.6)),
}


def _chirp(n=4000, batch=2):
    t = torch.arange(n) / SR
    f = 200 + 1500 * t / t[-1]
    x = torch.sin(2 * math.pi * torch.cumsum(f, 0) / SR) * (0.3 + 0.2 * torch.sin(2 * math.pi * 3 * t))
    return torch.stack([x * (i + 1) / batch for i in range(batch)])[:, None]


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_of_identical_signals_is_exactly_zero(name):
    loss = LOSSES[name]()
    x = _chirp()
    assert loss(x, x).item() == 0.0
    assert loss(x, x + 0.01 * torch.randn_like(x)).item() > 0.0


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("case", ["silent_pred", "silent_both", "silent_target"])
def test_finite_gradients_on_silence(name, case):
    loss = LOSSES[name]()
    silence, x = torch.zeros(2, 1, 4000), _chirp()
    pred, target = {"silent_pred": (silence, x), "silent_both": (silence, silence), "silent_target": (x, silence)}[case]
    pred = pred.clone().requires_grad_()
    value = loss(pred, target)
    (grad,) = torch.autograd.grad(value, pred)
    assert torch.isfinite(value)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("name", ["mel", "stft"])
def test_finite_gradients_on_near_silence_point_away_from_it(name):
    loss = LOSSES[name]()
    target = _chirp()
    pred = (1e-3 * target).requires_grad_()
    value = loss(pred, target)
    value.backward()
    assert torch.isfinite(pred.grad).all()
    assert pred.grad.abs().sum() > 0


def test_rms_matching_hand_computed():
    x = _chirp(batch=1)
    loss = RMSMatchingLoss(eps=1e-12)
    assert loss(2 * x, x).item() == pytest.approx(math.log(2), rel=1e-5)
    assert loss(0.5 * x, x).item() == pytest.approx(math.log(2), rel=1e-5)
    # shape does not matter, only the level: a sign flip or a time reversal costs nothing
    assert loss(-x.flip(-1), x).item() == pytest.approx(0.0, abs=1e-6)


def _noise():
    return 0.3 * torch.randn(2, 1, 4000)  # broadband: every mel bin is above the clamp floor


def test_correlation_gated_rms_matching_weights_each_item_by_its_correlation():
    torch.manual_seed(0)
    target = _chirp(batch=3)
    noise = torch.randn_like(target)
    # item 0: the target itself at half level (rho 1), item 1: uncorrelated noise (rho ~ 0), item 2: rho = 0.4
    mix = 0.4 * target[2] / target[2].norm() + math.sqrt(1 - 0.4**2) * noise[2] / noise[2].norm()
    pred = torch.stack([0.5 * target[0], noise[1] * target[1].norm() / noise[1].norm() * 2.0, mix * 3.0])
    loss = RMSMatchingLoss(correlation_gate=(0.2, 0.6))
    gate = loss.gate(pred, target)
    assert gate[0] == pytest.approx(1.0)
    assert gate[1] == 0.0  # the level of noise is not matched: |rho| < 0.2
    pc, tc = pred[2] - pred[2].mean(), target[2] - target[2].mean()
    rho = float((pc * tc).sum() / (pc.norm() * tc.norm()))
    assert gate[2] == pytest.approx((rho - 0.2) / 0.4, abs=1e-5)
    err = (RMSMatchingLoss()._log_rms(pred) - RMSMatchingLoss()._log_rms(target)).abs()
    torch.testing.assert_close(loss(pred, target), (gate * err).mean())
    pred = pred.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(pred, target), pred)
    assert grad[1].abs().max() == 0  # no pull on the uncorrelated item's level
    assert grad[0].abs().max() > 0


def test_mel_loss_is_scale_sensitive_and_sums_resolutions():
    x = _noise()
    one = MultiResolutionMelLoss(SR, window_lengths=(256,), n_mels=(40,))
    two = MultiResolutionMelLoss(SR, window_lengths=(256, 256), n_mels=(40, 40))
    assert two(0.5 * x, x).item() == pytest.approx(2 * one(0.5 * x, x).item(), rel=1e-6)
    # log10 mel of a signal scaled by 1/2 differs by log10(2) in every bin above the floor
    assert one(0.5 * x, x).item() == pytest.approx(math.log10(2), rel=0.05)


def test_mel_distance_uses_dac_resolutions():
    x = _noise()
    ref = MultiResolutionMelLoss(SR, window_lengths=DAC_MEL_WINDOWS, n_mels=DAC_MEL_N_MELS)
    assert mel_distance(0.5 * x, x, SR).item() == pytest.approx(ref(0.5 * x, x).item())
    assert mel_distance(0.5 * x, x, SR).item() == pytest.approx(7 * math.log10(2), rel=0.05)
    assert mel_distance(x, x, SR).item() == 0.0


def test_losses_run_in_fp32_under_autocast():
    x = _chirp()
    y = x + 0.05 * torch.randn_like(x)
    loss = MultiResolutionMelLoss(SR)
    ref = loss(y, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same = loss(y, x)
        low = loss(y.bfloat16(), x.bfloat16())
    assert same.item() == ref.item()  # autocast does not reach inside: fp32 inputs give the fp32 result
    assert low.dtype == torch.float32
    assert torch.isfinite(low)


def test_shape_errors_name_the_arguments():
    loss = MultiResolutionMelLoss(SR)
    with pytest.raises(ValueError, match="same shape"):
        loss(torch.zeros(1, 1, 100), torch.zeros(1, 1, 101))
    with pytest.raises(ValueError, match="`preds`"):
        loss(torch.zeros(1, 1, 1, 100), torch.zeros(1, 1, 1, 100))
    with pytest.raises(TypeError, match="`target`"):
        loss(torch.zeros(1, 1, 100), torch.zeros(1, 1, 100, dtype=torch.long))


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: MultiResolutionMelLoss(SR, window_lengths=(256, 512), n_mels=(40,)), "`n_mels`"),
        (lambda: MultiResolutionMelLoss(SR, window_lengths=()), "`window_lengths`"),
        (lambda: MultiResolutionMelLoss(0), "`sample_rate`"),
        (lambda: MultiResolutionMelLoss(SR, clamp_eps=0.0), "`clamp_eps`"),
        (lambda: MultiResolutionSTFTLoss(fft_sizes=(512,), hop_sizes=(0,)), "`hop_sizes`"),
        (lambda: RMSMatchingLoss(eps=-1.0), "`eps`"),
        (lambda: RMSMatchingLoss(frame_length=0), "`frame_length`"),
        (lambda: RMSMatchingLoss(correlation_gate=(0.6, 0.2)), "`correlation_gate`"),
        (lambda: RMSMatchingLoss(correlation_gate=(0.2,)), "`correlation_gate`"),
    ],
)
def test_bad_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()
