import math

import pytest
import torch

from lightning_stability.nn import ClampedRMSScale, denormalize, normalize
from tests._helpers_spectral_scale import NoHostReads


def hand_rms(t: torch.Tensor) -> float:
    values = [float(v) for v in t.flatten()]
    return math.sqrt(sum(v * v for v in values) / len(values))


# -- ClampedRMSScale ---------------------------------------------------------------------------------------------------


def test_per_item_scale_matches_hand_computation():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 10, generator=g)
    amplitudes = [1.2, 5.7, 0.3]  # inside, above and below [0.7, 1.5]
    ref = torch.stack([a * torch.randn(4, 10, generator=g) for a in amplitudes])
    layer = ClampedRMSScale(0.7, 1.5, eps=1e-5)
    y = layer(x, ref)
    expected = []
    for b in range(3):
        raw = hand_rms(ref[b]) / (hand_rms(x[b]) + 1e-5)
        s = min(max(raw, 0.7), 1.5)
        expected.append(s)
        torch.testing.assert_close(y[b], x[b] * s, rtol=1e-5, atol=1e-6)
    assert layer.last_scale.shape == (3, 1, 1)
    torch.testing.assert_close(layer.last_scale.flatten(), torch.tensor(expected), rtol=1e-5, atol=0)
    unclamped = hand_rms(ref[0]) / (hand_rms(x[0]) + 1e-5)
    assert 0.7 < unclamped < 1.5
    assert layer.last_scale[0].item() == pytest.approx(unclamped, rel=1e-5)
    assert layer.last_scale[1].item() == 1.5
    assert layer.last_scale[2].item() == pytest.approx(0.7)
    assert layer.last_clamped_fraction.item() == pytest.approx(2 / 3)
    assert layer.last_raw_scale[1].item() > 1.5


def test_per_frame_scale_matches_hand_computation():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 6, generator=g)
    ref = 1.1 * torch.randn(2, 3, 6, generator=g)
    layer = ClampedRMSScale(0.5, 2.0, per_frame=True)
    y = layer(x, ref)
    assert layer.last_scale.shape == (2, 1, 6)
    for b in range(2):
        for t in range(6):
            s = min(max(hand_rms(ref[b, :, t]) / (hand_rms(x[b, :, t]) + 1e-5), 0.5), 2.0)
            assert layer.last_scale[b, 0, t].item() == pytest.approx(s, rel=1e-5)
            torch.testing.assert_close(y[b, :, t], x[b, :, t] * s, rtol=1e-5, atol=1e-6)


def test_reference_as_target_rms_tensor_or_float():
    x = torch.randn(2, 4, 8)
    layer = ClampedRMSScale(0.1, 10.0)
    target = torch.tensor([2.0, 0.5]).view(2, 1, 1)
    y = layer(x, target)
    for b in range(2):
        assert hand_rms(y[b]) == pytest.approx(target[b].item() * hand_rms(x[b]) / (hand_rms(x[b]) + 1e-5), rel=1e-5)
    y = layer(x, 3.0)
    assert hand_rms(y[0]) == pytest.approx(3.0, rel=1e-4)
    assert torch.equal(layer(x, torch.tensor(3.0)), y)


@pytest.mark.parametrize("log_amp", [-12, -6, -2, 0, 2, 6, 12])
@pytest.mark.parametrize("per_frame", [False, True])
def test_output_gain_never_exceeds_bounds(log_amp, per_frame):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 32, generator=g) * torch.logspace(-3, 3, 4).view(4, 1, 1)
    ref = torch.randn(4, 2, 32, generator=g) * 10.0**log_amp
    layer = ClampedRMSScale(0.7, 1.5, per_frame=per_frame)
    y = layer(x, ref)
    assert layer.last_scale.min() >= 0.7
    assert layer.last_scale.max() <= 1.5
    ratio = y / x
    assert ratio.min() >= 0.7 * (1 - 1e-6)
    assert ratio.max() <= 1.5 * (1 + 1e-6)


@pytest.mark.parametrize("detach_scale", [False, True])
@pytest.mark.parametrize("per_frame", [False, True])
def test_silent_output_and_silent_reference_stay_finite(detach_scale, per_frame):
    layer = ClampedRMSScale(per_frame=per_frame, detach_scale=detach_scale)
    for x_amp, ref_amp, expected in ((0.0, 1.0, 1.5), (1.0, 0.0, 0.7), (0.0, 0.0, 0.7)):
        x = (x_amp * torch.randn(2, 3, 5)).requires_grad_(True)
        ref = (ref_amp * torch.randn(2, 3, 5)).requires_grad_(True)
        y = layer(x, ref)
        (y * torch.randn_like(y)).sum().backward()
        assert torch.isfinite(y).all()
        assert torch.isfinite(x.grad).all()
        assert ref.grad is None or torch.isfinite(ref.grad).all()
        torch.testing.assert_close(layer.last_scale, torch.full_like(layer.last_scale, expected))


def test_detach_scale_controls_the_gradient():
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 3, 7, generator=g)
    ref = 1.2 * torch.randn(2, 3, 7, generator=g)
    upstream = torch.randn(2, 3, 7, generator=g)

    x = x0.clone().requires_grad_(True)
    detached = ClampedRMSScale(detach_scale=True)
    (detached(x, ref) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, upstream * detached.last_scale)

    # through the factor (unclamped): y = x * target / (rms(x) + eps) is (nearly) amplitude invariant, so the
    # gradient has no component along x itself
    x = x0.clone().requires_grad_(True)
    attached = ClampedRMSScale(detach_scale=False)
    y = attached(x, ref)
    assert attached.last_clamped_fraction.item() == 0.0
    y.pow(2).sum().backward()
    radial = (x.grad * x0).sum(dim=(1, 2)) / x0.pow(2).sum(dim=(1, 2))
    assert radial.abs().max() < 1e-4
    assert not torch.allclose(x.grad, 2 * y.detach() * attached.last_scale)


def test_last_scale_is_a_buffer_that_is_not_saved_and_follows_the_module():
    layer = ClampedRMSScale()
    assert layer.last_scale.numel() == 0
    layer(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    assert "last_scale" in dict(layer.named_buffers())
    assert layer.state_dict() == {}
    layer.double()
    assert layer.last_scale.dtype == torch.float64
    assert not layer.last_scale.requires_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_under_autocast(dtype):
    layer = ClampedRMSScale(0.7, 1.5)
    # an fp16/bf16 square of 300 overflows fp16 (65504) unless the RMS is taken in fp32
    x = (300.0 * torch.randn(2, 4, 64)).to(dtype)
    ref = (330.0 * torch.randn(2, 4, 64)).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, ref)
    assert y.dtype == dtype
    assert layer.last_scale.dtype == torch.float32
    assert torch.isfinite(y).all()
    expected = hand_rms(ref[0].float()) / hand_rms(x[0].float())
    assert layer.last_scale[0].item() == pytest.approx(expected, rel=1e-3)


def test_bounds_can_be_changed_at_run_time():
    layer = ClampedRMSScale(0.7, 1.5)
    x, ref = torch.randn(1, 2, 8), 10 * torch.randn(1, 2, 8)
    layer(x, ref)
    assert layer.last_scale.item() == 1.5
    layer.max_scale = 2.0
    layer(x, ref)
    assert layer.last_scale.item() == 2.0
    layer.set_bounds(3.0, 4.0)  # moves past the old max in one validated call
    layer(x, ref)
    assert (layer.min_scale, layer.max_scale, layer.last_scale.item()) == (3.0, 4.0, 4.0)
    assert "min_scale=3.0, max_scale=4.0" in repr(layer)
    with pytest.raises(ValueError, match=r"`min_scale` must be <= `max_scale`"):
        layer.min_scale = 5.0
    with pytest.raises(ValueError, match=r"`max_scale` must be a finite number > 0, got -1"):
        layer.max_scale = -1
    assert (layer.min_scale, layer.max_scale) == (3.0, 4.0)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"min_scale": 0.0}, ValueError, r"`min_scale` must be a finite number > 0, got 0.0"),
        ({"min_scale": -1.0}, ValueError, r"`min_scale` .* got -1.0"),
        ({"max_scale": float("inf")}, ValueError, r"`max_scale` .* got inf"),
        ({"max_scale": float("nan")}, ValueError, r"`max_scale` .* got nan"),
        ({"min_scale": 2.0, "max_scale": 1.0}, ValueError, r"min_scale=2.0 > max_scale=1.0"),
        ({"min_scale": "0.7"}, TypeError, r"`min_scale` must be a float, got '0.7'"),
        ({"max_scale": True}, TypeError, r"`max_scale` must be a float, got True"),
        ({"per_frame": 1}, TypeError, r"`per_frame` must be a bool, got 1"),
        ({"detach_scale": "yes"}, TypeError, r"`detach_scale` must be a bool, got 'yes'"),
        ({"eps": 0}, ValueError, r"`eps` must be a finite number > 0, got 0"),
        ({"eps": -1e-5}, ValueError, r"`eps` .* got -1e-05"),
        ({"eps": "1e-5"}, TypeError, r"`eps` must be a number, got '1e-5'"),
        ({"eps": None}, TypeError, r"`eps` must be a number, got None"),
    ],
)
def test_constructor_argument_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ClampedRMSScale(**kwargs)


def test_forward_input_errors():
    layer = ClampedRMSScale()
    with pytest.raises(ValueError, match=r"`x` must have a batch dim .* got shape \(5,\)"):
        layer(torch.randn(5), torch.randn(5))
    with pytest.raises(TypeError, match=r"`x` must be a floating-point tensor"):
        layer(torch.ones(2, 3, dtype=torch.long), 1.0)
    with pytest.raises(
        ValueError, match=r"`reference` must have the shape of `x` \(2, 3, 4\) .* \(2, 1, 1\), got shape"
    ):
        layer(torch.randn(2, 3, 4), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"got shape \(3, 1, 1\)"):
        layer(torch.randn(2, 3, 4), torch.ones(3, 1, 1))
    with pytest.raises(TypeError, match=r"`reference` must be a tensor or a float target RMS, got str"):
        layer(torch.randn(2, 3, 4), "loud")
    with pytest.raises(ValueError, match=r"`per_frame=True` needs `x` of shape \[B, C, T\], got shape \(2, 3\)"):
        ClampedRMSScale(per_frame=True)(torch.randn(2, 3), torch.randn(2, 3))


# -- normalize / denormalize -------------------------------------------------------------------------------------------


def test_normalize_matches_hand_computation_and_round_trips():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 50, generator=g) * torch.tensor([0.01, 1.0, 30.0]).view(3, 1, 1)
    y, scale = normalize(x)
    assert scale.shape == (3, 1, 1)
    assert scale.dtype == torch.float32
    for b in range(3):
        assert scale[b].item() == pytest.approx(hand_rms(x[b]) + 1e-8, rel=1e-6)
        assert hand_rms(y[b]) == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(denormalize(y, scale), x)


def test_normalize_mono_equals_audiocraft_preprocess():
    x = torch.randn(2, 1, 100)
    mono = x.mean(dim=1, keepdim=True)
    audiocraft_scale = 1e-8 + mono.pow(2).mean(dim=2, keepdim=True).sqrt()
    y, scale = normalize(x)
    torch.testing.assert_close(scale, audiocraft_scale)
    torch.testing.assert_close(y, x / audiocraft_scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_normalize_silent_input_is_finite(dtype):
    x = torch.zeros(2, 1, 64, dtype=dtype, requires_grad=True)
    y, scale = normalize(x)
    assert y.dtype == dtype
    assert torch.equal(scale, torch.full((2, 1, 1), 1e-8))
    assert torch.isfinite(y).all()
    assert (y == 0).all()
    denormalize(y, scale).float().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_normalize_and_denormalize_errors():
    with pytest.raises(ValueError, match=r"`x` must have a batch dim .* got shape \(10,\)"):
        normalize(torch.randn(10))
    with pytest.raises(TypeError, match=r"`x` must be a floating-point tensor"):
        normalize(torch.ones(2, 10, dtype=torch.int16))
    with pytest.raises(ValueError, match=r"`eps` must be a finite number > 0, got 0"):
        normalize(torch.randn(2, 10), eps=0)
    with pytest.raises(TypeError, match=r"`eps` must be a number, got '1e-8'"):
        normalize(torch.randn(2, 10), eps="1e-8")
    with pytest.raises(TypeError, match=r"`scale` must be a tensor"):
        denormalize(torch.randn(2, 1, 10), 2.0)
    with pytest.raises(TypeError, match=r"`y` must be a floating-point tensor"):
        denormalize([1.0], torch.ones(1))
    with pytest.raises(ValueError, match=r"`scale` of shape \(3, 1, 1\) does not broadcast to `y` of shape"):
        denormalize(torch.randn(2, 1, 10), torch.ones(3, 1, 1))


def test_forward_backward_and_normalisation_never_read_tensors_on_the_host():
    x = torch.randn(2, 3, 16, requires_grad=True)
    with NoHostReads():
        for layer in (ClampedRMSScale(), ClampedRMSScale(per_frame=True, detach_scale=True)):
            layer(x, torch.randn(2, 3, 16)).sum().backward()
        ClampedRMSScale()(x, 2.0)
        ClampedRMSScale()(x, torch.ones(2, 1, 1))
        y, scale = normalize(x)
        denormalize(y, scale)
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("per_frame", [False, True])
def test_traces_under_torch_compile_without_graph_breaks(per_frame):
    layer = ClampedRMSScale(per_frame=per_frame)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x, ref = torch.randn(2, 3, 8), 2.0 * torch.randn(2, 3, 8)
    try:
        y = compiled(x, ref)
        recorded = layer.last_scale.clone()
        torch.testing.assert_close(y, layer(x, ref))
        torch.testing.assert_close(recorded, layer.last_scale)
        pair = torch.compile(lambda t: denormalize(*normalize(t)), backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(pair(x), x)
    finally:
        torch._dynamo.reset()
