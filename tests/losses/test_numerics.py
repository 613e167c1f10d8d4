"""Numerics matrix of the audio losses: loss x signal pair x precision (see tests/_helpers_numerics.py).

Every case must give a finite float32 value and a finite gradient w.r.t. the prediction (in the prediction's dtype).
The losses compute in float32 with autocast off whatever the input dtype, so the value under autocast, or on half
inputs, is the float32 value of the same (rounded) inputs to float32 accuracy, and the gradient on half inputs is the
float32 gradient rounded to that dtype. On half inputs the value is also within the dtype's rounding of the value
on the original float32 signal.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from lightning_stability.losses import (
    LossBalancer,
    MultiResolutionMelLoss,
    MultiResolutionSTFTLoss,
    RMSMatchingLoss,
    mel_distance,
)
from lightning_stability.losses.spectral import correlation_gate_weights
from tests._helpers_numerics import PAIRS, PRECISIONS, context, input_dtype, input_tolerance, pair

SR = 24000
LossFn = Callable[[Tensor, Tensor], Tensor]


def _mel() -> MultiResolutionMelLoss:
    """Both of the mel loss's terms (log and linear) and a power: the paths ``mel_distance``'s defaults leave out."""
    return MultiResolutionMelLoss(SR, window_lengths=(512, 128), n_mels=(64, 16), mag_weight=1.0, pow=2.0)


def _balanced() -> LossFn:
    """A fresh ``LossBalancer`` over mel + L1 + RMS terms, used as documented: the terms are computed from a float32
    view of the (possibly half) output, and that view is what is balanced; its surrogate loss."""
    mel, rms = _mel(), RMSMatchingLoss()

    def fn(preds: Tensor, target: Tensor) -> Tensor:
        balancer = LossBalancer({"mel": 1.0, "l1": 1.0, "rms": 0.5})
        y = preds.float()
        return balancer({"mel": mel(y, target), "l1": F.l1_loss(y, target.float()), "rms": rms(y, target)}, y).loss

    return fn


LOSSES: dict[str, Callable[[], LossFn]] = {
    "mel": _mel,
    "mel_distance": lambda: lambda p, t: mel_distance(p, t, SR),
    "stft": lambda: MultiResolutionSTFTLoss(fft_sizes=(512, 256, 128)),
    # not powers of two: cuFFT takes only those in fp16, so the STFT must run in fp32 whatever the input dtype
    "stft_odd": lambda: MultiResolutionSTFTLoss(fft_sizes=(480, 240, 120)),
    "rms": lambda: RMSMatchingLoss(),
    "rms_frames_gated": lambda: RMSMatchingLoss(frame_length=512, correlation_gate=(0.0, 0.5)),
    "balancer": _balanced,
}


def _evaluate(name: str, preds: Tensor, target: Tensor, precision: str = "fp32") -> tuple[Tensor, Tensor]:
    """``(value, d value / d preds)`` of loss ``name`` under ``precision``'s context (inputs as given)."""
    fn = LOSSES[name]()
    preds = preds.detach().clone().requires_grad_()
    with context(precision):
        value = fn(preds, target)
    (grad,) = torch.autograd.grad(value, preds)
    return value.detach(), grad


@cache
def _fp32(name: str, kinds: tuple[str, str], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The float32 value and gradient on the pair rounded to ``dtype`` (no rounding for float32)."""
    p, t = pair(kinds)
    return _evaluate(name, p.to(dtype).float(), t.to(dtype).float())


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kinds", PAIRS, ids=lambda k: f"{k[0]}-{k[1]}")
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_is_finite_with_finite_gradient_and_matches_fp32(name, kinds, precision):
    dtype = input_dtype(precision)
    p, t = pair(kinds)
    value, grad = _evaluate(name, p.to(dtype), t.to(dtype), precision)

    assert value.dtype == torch.float32
    assert value.shape == ()
    assert torch.isfinite(value), f"{name} on {kinds} under {precision}: {value}"
    assert grad.dtype == dtype
    assert torch.isfinite(grad).all(), f"{name} on {kinds} under {precision}: non-finite gradient"

    ref_value, ref_grad = _fp32(name, kinds, dtype)
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad.to(dtype), rtol=1e-4, atol=1e-4 * float(ref_grad.abs().max()))
    if dtype != torch.float32 and name != "balancer":
        # (not the balancer: its value is loss / EMA(|grad|), and a log-spectral gradient is dominated by the quietest
        # bins, which rounding the input to bf16 moves by several percent; its value on rounded inputs is pinned above)
        orig = float(_fp32(name, kinds, torch.float32)[0])
        assert abs(float(value) - orig) <= input_tolerance(dtype, orig), (float(value), orig)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["mel", "stft_odd", "balancer"])
def test_losses_cast_to_half_keep_float32_constants(name, dtype):
    """``precision="bf16-true"`` casts the LightningModule, losses included, with ``.to(dtype)``: the windows, mel
    filterbanks and the balancer's running averages stay float32 and exact, and the loss of half inputs is the float32
    loss of the same inputs (before the fix the mel loss raised "expected scalar type Float but found BFloat16")."""
    if name == "balancer":
        module, fresh = LossBalancer({"a": 1.0}), LossBalancer({"a": 1.0})
        module.ema_norms.fill_(1 / 3)
        fresh.ema_norms.fill_(1 / 3)
    else:
        module, fresh = LOSSES[name](), LOSSES[name]()
    module.to(dtype)
    buffers, expected = dict(module.named_buffers()), dict(fresh.named_buffers())
    assert buffers
    assert buffers.keys() == expected.keys()
    for key, buf in buffers.items():
        assert buf.dtype == torch.float32, key
        assert torch.equal(buf, expected[key]), key
    if name == "balancer":
        return
    p, t = pair(("noise", "clip"))
    p, t = p.to(dtype), t.to(dtype)
    torch.testing.assert_close(module(p, t), fresh(p.float(), t.float()), rtol=1e-6, atol=0)


def test_balancer_running_average_keeps_moving_after_a_bf16_cast():
    """In bf16 ``0.999 * x`` rounds back to ``x``: an EMA kept there stops decaying. Kept in float32 it does not."""
    balancer = LossBalancer({"a": 1.0}, ema_decay=0.999).to(torch.bfloat16)
    y = torch.ones(4, 8, requires_grad=True)
    for _ in range(300):
        balancer({"a": (y * 2).sum() / 4}, y)
    weight = float(balancer.ema_weight[0])
    assert weight == pytest.approx((1 - 0.999**300) / (1 - 0.999), rel=1e-5)  # 259.3; bf16 would stall at 256


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (cuFFT's fp16 transforms)")
@pytest.mark.parametrize("precision", ["autocast-fp16", "input-fp16", "input-bf16"])
@pytest.mark.parametrize("name", ["mel", "stft_odd", "rms"])
def test_losses_on_cuda_in_half_precision_run_their_ffts_in_fp32(name, precision):
    """cuFFT in fp16 takes only power-of-two sizes; the losses' STFTs run in fp32, so any size works and the value is
    the CPU float32 value."""
    dtype = input_dtype(precision)
    p, t = pair(("noise", "clip"))
    fn = LOSSES[name]()
    if isinstance(fn, torch.nn.Module):
        fn = fn.cuda()
    preds = p.to("cuda", dtype).requires_grad_()
    with torch.autocast("cuda", dtype=torch.float16, enabled=precision.startswith("autocast")):
        value = fn(preds, t.to("cuda", dtype))
    (grad,) = torch.autograd.grad(value, preds)
    assert torch.isfinite(value)
    assert torch.isfinite(grad).all()
    ref_value, _ = _fp32(name, ("noise", "clip"), dtype)
    assert math.isclose(float(value), float(ref_value), rel_tol=1e-4)


def test_correlation_gate_of_constant_signals_is_zero_in_every_dtype():
    """Two DC signals have no correlation. In float32 the rounding residual left by subtracting the mean is constant
    and correlated perfectly (rho = 1, the gate fully open); in bf16 the mean is exact (rho = 0)."""
    dc_p, dc_t = pair(("dc", "dc"))
    clip, noise = pair(("clip", "noise"))
    preds, target = torch.cat([dc_p, clip + 0.5 * noise]), torch.cat([dc_t, clip])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        gate = correlation_gate_weights(preds.to(dtype), target.to(dtype), (0.0, 0.5))
        assert gate[0] == 0.0, dtype
        assert gate[1] == 1.0, dtype  # a varying pair still correlates: rho = 1 / sqrt(1 + 1/12) > 0.5
