"""Numerics matrix of the metrics: metric x signal pair x precision (see tests/_helpers_numerics.py).

Signal health (``metrics.functional`` and the ``Metric`` classes): a finite float32 value on every finite input, a
finite gradient w.r.t. the prediction where the metric is differentiable (``rms``/``rms_ratio`` on silence:
``d sqrt(x)/dx`` is infinite at 0), the float32 value of the same (rounded) inputs under autocast or on half inputs,
and on half inputs within the dtype's rounding of the value on the original float32 signal.

Speech quality (PESQ, STOI, loudness error) is computed by numpy packages in float64: the matrix pins that autocast
and half inputs give the float32 value of the same inputs, that no case is infinite, and that a case is NaN (the
class: skipped and counted) exactly where the docs say the measure does not exist: a silent target, a silent
prediction for PESQ, a target below the loudness gate. Non-finite *inputs* are out of scope here: they must stay
non-finite (tests/reliability/test_properties.py). Codebook metrics take integer codes, not signals.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from lightning_stability.metrics import STOI, DCOffset, LoudnessError, PeakAmplitude, RMSRatio, WidebandPESQ
from lightning_stability.metrics import functional as MF
from lightning_stability.metrics import perceptual as P
from tests._helpers_numerics import PAIRS, PRECISIONS, context, input_dtype, input_tolerance, pair


def _metric(cls: type, key: str | None = None, **kwargs) -> Callable[[Tensor, Tensor], Tensor]:
    """The batch value of a ``Metric`` (its ``forward``, differentiable where the class is), checked against
    ``compute()`` after that one batch."""

    def fn(preds: Tensor, target: Tensor) -> Tensor:
        metric = cls(**kwargs)
        value = metric(preds, target)
        computed = metric.compute()
        value, computed = (value[key], computed[key]) if key else (value, computed)
        torch.testing.assert_close(value.detach(), computed, rtol=1e-6, atol=0)
        return value

    return fn


SIGNAL_METRICS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "rms": lambda p, t: MF.rms(p, dim=None),
    "rms_ratio": lambda p, t: MF.rms_ratio(p, t),
    "dc_offset": lambda p, t: MF.dc_offset(p),
    "peak_amplitude": lambda p, t: MF.peak_amplitude(p),
    "clip_fraction": lambda p, t: MF.clip_fraction(p),
    "RMSRatio": _metric(RMSRatio),
    "DCOffset": _metric(DCOffset),
    "PeakAmplitude.peak": _metric(PeakAmplitude, "peak"),
    "PeakAmplitude.clip_fraction": _metric(PeakAmplitude, "clip_fraction"),
}


def _evaluate(name: str, preds: Tensor, target: Tensor, precision: str = "fp32") -> tuple[Tensor, Tensor | None]:
    preds = preds.detach().clone().requires_grad_()
    with context(precision):
        value = SIGNAL_METRICS[name](preds, target)
    grad = torch.autograd.grad(value.sum(), preds)[0] if value.requires_grad else None
    return value.detach(), grad


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kinds", PAIRS, ids=lambda k: f"{k[0]}-{k[1]}")
@pytest.mark.parametrize("name", list(SIGNAL_METRICS))
def test_signal_metric_is_finite_with_finite_gradient_and_matches_fp32(name, kinds, precision):
    dtype = input_dtype(precision)
    p, t = pair(kinds)
    value, grad = _evaluate(name, p.to(dtype), t.to(dtype), precision)

    assert value.dtype == torch.float32
    assert torch.isfinite(value).all(), f"{name} on {kinds} under {precision}: {value}"
    if name.startswith(("rms", "dc", "RMS", "DC")):  # the differentiable ones (``is_differentiable`` classes)
        assert grad is not None
    if grad is not None:
        assert grad.dtype == dtype
        assert torch.isfinite(grad).all(), f"{name} on {kinds} under {precision}: non-finite gradient"

    ref_value, ref_grad = _evaluate(name, p.to(dtype).float(), t.to(dtype).float())
    torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=0)
    if grad is not None:
        torch.testing.assert_close(grad, ref_grad.to(dtype), rtol=1e-5, atol=0)
    if dtype != torch.float32:
        orig = _evaluate(name, p, t)[0]
        for v, o in zip(value.flatten().tolist(), orig.flatten().tolist()):
            assert abs(v - o) <= input_tolerance(dtype, o), (v, o)


def test_rms_of_silence_has_zero_gradient_and_nan_stays_nan():
    """The safe square root: value exactly ``torch.sqrt``'s, gradient 0 (not NaN) at silence, NaN propagated."""
    x = torch.zeros(2, 1, 64, requires_grad=True)
    value = MF.rms(x)
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert torch.equal(value.detach(), torch.zeros(2, 1))
    assert torch.equal(grad, torch.zeros_like(x))
    y = torch.tensor([[3.0, 4.0], [math.nan, 1.0], [math.inf, 0.0]])
    expected = y.square().mean(dim=-1).sqrt()
    torch.testing.assert_close(MF.rms(y), expected, equal_nan=True)
    assert math.isnan(float(MF.rms_ratio(torch.tensor([math.nan, 0.0]), torch.ones(2))))


# ------------------------------------------------------------------------------------------------- speech quality
SR = 8000  # 4096 samples = 0.512 s: over PESQ's 0.25 s, one 0.4 s loudness block and STOI's 30 frames
QUALITY: dict[str, tuple[Callable[..., Tensor], type]] = {
    "pesq": (P.wideband_pesq, WidebandPESQ),
    "stoi": (P.stoi, STOI),
    "loudness_error": (P.loudness_error, LoudnessError),
}


def _undefined(name: str, preds: Tensor, target: Tensor) -> bool:
    """Where the docs say the measure does not exist (evaluated on the float32 view of the inputs as given)."""
    if float(target.abs().max()) == 0.0:
        return True
    if name == "pesq":
        return float(preds.abs().max()) == 0.0
    if name == "loudness_error":
        return math.isinf(float(P.integrated_loudness(target.double(), SR)))
    return False


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kinds", PAIRS, ids=lambda k: f"{k[0]}-{k[1]}")
@pytest.mark.parametrize("name", list(QUALITY))
def test_speech_quality_is_finite_where_defined_and_precision_does_not_move_it(name, kinds, precision):
    fn, cls = QUALITY[name]
    dtype = input_dtype(precision)
    p, t = (x.to(dtype) for x in pair(kinds))
    with context(precision):
        value = float(fn(p, t, SR, on_error="nan"))
        metric = cls(SR)
        metric.update(p, t)
    reference = float(fn(p.float(), t.float(), SR, on_error="nan"))

    assert not math.isinf(value)
    undefined = _undefined(name, p.float(), t.float())
    assert math.isnan(value) == undefined, (value, kinds, precision)
    if undefined:
        assert math.isnan(reference)
        assert (int(metric.count), int(metric.skipped)) == (0, 1)
        assert math.isnan(float(metric.compute()))
    else:
        assert value == pytest.approx(reference, rel=1e-6, abs=1e-6)
        assert (int(metric.count), int(metric.skipped)) == (1, 0)
        assert float(metric.compute()) == pytest.approx(value, rel=1e-6, abs=1e-6)
