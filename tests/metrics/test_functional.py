import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lightning_stability.metrics.functional import (
    clip_fraction,
    codebook_histogram,
    codebook_perplexity,
    codebook_usage,
    dc_offset,
    dead_code_fraction,
    peak_amplitude,
    rms,
    rms_ratio,
)

EPS32 = float(np.finfo(np.float32).eps)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.double().numpy()


def test_rms_ratio_is_the_global_ratio_of_root_mean_squares():
    g = torch.Generator().manual_seed(1)
    preds = torch.randn(3, 2, 50, generator=g) * torch.tensor([0.1, 1.0, 3.0]).view(3, 1, 1)
    target = torch.randn(3, 2, 50, generator=g)
    p, t = _np(preds), _np(target)
    expected = math.sqrt((p**2).mean()) / math.sqrt((t**2).mean())
    assert rms_ratio(preds, target).item() == pytest.approx(expected, rel=1e-6)
    per_item = rms_ratio(preds, target, dim=-1)
    assert per_item.shape == (3, 2)
    expected_items = np.sqrt((p**2).mean(-1)) / np.sqrt((t**2).mean(-1))
    np.testing.assert_allclose(per_item.numpy(), expected_items, rtol=1e-6)
    # the global ratio is not the mean of per-item ratios: loud items weigh more
    assert rms_ratio(preds, target).item() != pytest.approx(float(expected_items.mean()), rel=1e-3)


def test_rms_ratio_of_a_signal_with_itself_and_scaled_copies():
    x = torch.randn(4, 1, 100)
    assert rms_ratio(x, x).item() == pytest.approx(1.0, abs=1e-7)
    assert rms_ratio(0.166 * x, x).item() == pytest.approx(0.166, rel=1e-6)


def test_rms_ratio_silent_target_values_are_documented_and_finite():
    silent = torch.zeros(2, 1, 64)
    loud = torch.full((2, 1, 64), 0.5)
    assert rms_ratio(silent, silent).item() == 1.0
    assert rms_ratio(loud, silent).item() == pytest.approx(0.5 / EPS32, rel=1e-6)
    assert rms_ratio(silent, loud).item() == 0.0
    per_item = rms_ratio(torch.stack([loud[0], silent[0]]), torch.stack([silent[0], silent[0]]), dim=-1)
    assert torch.isfinite(per_item).all()
    assert per_item[1].item() == 1.0


def test_rms_matches_hand_computation_and_handles_bf16():
    x = torch.tensor([[3.0, -4.0, 0.0, 0.0]])
    assert rms(x).item() == pytest.approx(2.5)
    assert rms(x.bfloat16()).dtype == torch.float32
    assert rms(x.double()).dtype == torch.float64


def test_dc_offset_peak_and_clip_fraction_by_hand():
    x = torch.tensor([[[0.5, -2.62, 0.18, 1.0, -1.0, 0.0]]])
    assert dc_offset(x).item() == pytest.approx((0.5 - 2.62 + 0.18 + 1.0 - 1.0) / 6, rel=1e-6)
    assert peak_amplitude(x).item() == pytest.approx(2.62)
    # |x| >= 1: -2.62, 1.0, -1.0 -> 3 of 6
    assert clip_fraction(x).item() == pytest.approx(0.5)
    assert clip_fraction(x, clip_level=2.0).item() == pytest.approx(1 / 6)
    np.testing.assert_allclose(dc_offset(x, dim=-1).numpy(), [[x.mean().item()]], rtol=1e-6)


def test_bf16_inputs_are_measured_in_fp32():
    g = torch.Generator().manual_seed(2)
    preds = torch.randn(2, 1, 300, generator=g).bfloat16()
    target = torch.randn(2, 1, 300, generator=g).bfloat16()
    # the hand computation on the bf16 values themselves, in float64
    p, t = _np(preds.float()), _np(target.float())
    assert rms_ratio(preds, target).dtype == torch.float32
    assert rms_ratio(preds, target).item() == pytest.approx(math.sqrt((p**2).sum() / (t**2).sum()), rel=1e-6)
    assert dc_offset(preds).item() == pytest.approx(p.mean(), abs=1e-6)
    assert peak_amplitude(preds).item() == pytest.approx(np.abs(p).max())


def test_codebook_histogram_perplexity_and_dead_codes_by_hand():
    # stage 0 uses codes {0, 1} equally; stage 1 uses only code 3
    codes = torch.tensor([[[0, 1, 0, 1], [3, 3, 3, 3]]])
    hist = codebook_histogram(codes, codebook_size=4)
    assert hist.tolist() == [[2, 2, 0, 0], [0, 0, 0, 4]]
    assert codebook_perplexity(hist).tolist() == pytest.approx([2.0, 1.0])
    assert dead_code_fraction(hist).tolist() == pytest.approx([0.5, 0.75])
    perplexity, dead = codebook_usage(codes, 4)
    assert perplexity.tolist() == pytest.approx([2.0, 1.0])
    assert dead.tolist() == pytest.approx([0.5, 0.75])
    # a non-uniform histogram: p = (0.5, 0.25, 0.25) -> exp(H) = exp(1.5 ln 2) = 2**1.5
    hist = torch.tensor([[2, 1, 1, 0]])
    assert codebook_perplexity(hist).item() == pytest.approx(2**1.5, rel=1e-6)
    assert codebook_perplexity(torch.zeros(1, 4, dtype=torch.long)).item() == 0.0


@pytest.mark.parametrize(
    ("codes", "match"),
    [
        (torch.zeros(2, 3, 4), "integer"),
        (torch.zeros(2, 4, dtype=torch.long), r"\[B, n_q, T\]"),
        (torch.full((1, 2, 3), 8), r"\[0, 7\].*got values in \[8, 8\]"),
        (torch.full((1, 2, 3), -1), r"got values in \[-1, -1\]"),
    ],
)
def test_bad_codes_are_clear_errors(codes, match):
    with pytest.raises((ValueError, TypeError), match=match):
        codebook_histogram(codes, codebook_size=8)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: clip_fraction(torch.zeros(3), clip_level="1"), TypeError, "`clip_level` must be a number, got '1'"),
        (
            lambda: clip_fraction(torch.zeros(3), clip_level=-1.0),
            ValueError,
            "`clip_level` must be a finite number > 0",
        ),
        (lambda: clip_fraction(torch.zeros(3), clip_level=math.nan), ValueError, "`clip_level` .* got nan"),
        (lambda: rms(torch.zeros(2, 3), dim=1.0), TypeError, "`dim` must be an int or None, got 1.0"),
        (
            lambda: rms(torch.zeros(2, 3), dim=2),
            ValueError,
            r"`dim` must be None or a dim of the input \(shape \(2, 3\)\)",
        ),
        (lambda: rms_ratio(torch.ones(2, 3), torch.ones(2, 3), dim=-3), ValueError, "`dim` .* got -3"),
        (lambda: peak_amplitude(torch.ones(3), dim="time"), TypeError, "`dim` must be an int or None, got 'time'"),
        (
            lambda: codebook_histogram(torch.zeros(1, 2, 3, dtype=torch.long), 0),
            ValueError,
            "`codebook_size` must be >= 1",
        ),
        (
            lambda: codebook_histogram(torch.zeros(1, 2, 3, dtype=torch.long), 4.0),
            TypeError,
            "`codebook_size` must be an int",
        ),
        (
            lambda: codebook_histogram(torch.zeros(1, 2, 3, dtype=torch.long), 4, 2.0),
            TypeError,
            "`num_codebooks` must be",
        ),
        (
            lambda: codebook_histogram(torch.zeros(1, 2, 3, dtype=torch.long), 4, 0),
            ValueError,
            "`num_codebooks` must be >=",
        ),
        (
            lambda: codebook_histogram(torch.zeros(1, 2, 3, dtype=torch.long), 4, validate=1),
            TypeError,
            "`validate` must be",
        ),
    ],
)
def test_functions_name_the_bad_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_dim_minus_one_and_none_are_unchanged():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert rms(x, dim=-1).tolist() == pytest.approx([math.sqrt(12.5), 0.0])
    assert rms(x, dim=None).item() == pytest.approx(math.sqrt(25 / 4))
    assert rms(x, dim=0).tolist() == pytest.approx([math.sqrt(4.5), math.sqrt(8.0)])


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"preds \(2, 1, 10\) and target \(2, 1, 12\)"):
        rms_ratio(torch.zeros(2, 1, 10), torch.zeros(2, 1, 12))
    with pytest.raises(ValueError, match="clip_level"):
        clip_fraction(torch.zeros(3), clip_level=0.0)


_amplitude = st.sampled_from([0.0, 1e-30, 1e-12, 1e-6, 1.0, 1e3, 1e6, 1e12])


@settings(max_examples=60, deadline=None)
@given(
    pred_amp=_amplitude,
    target_amp=_amplitude,
    seed=st.integers(0, 2**16),
    length=st.integers(1, 64),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_property_silent_huge_and_random_inputs_never_give_nan_or_inf(pred_amp, target_amp, seed, length, dtype):
    g = torch.Generator().manual_seed(seed)
    preds = (torch.randn(2, 1, length, generator=g) * pred_amp).to(dtype)
    target = (torch.randn(2, 1, length, generator=g) * target_amp).to(dtype)
    assume(torch.isfinite(preds).all() and torch.isfinite(target).all())  # fp16 overflows above 65504 on its own
    for value in (
        rms_ratio(preds, target),
        rms_ratio(preds, target, dim=-1),
        dc_offset(preds),
        peak_amplitude(preds),
        clip_fraction(preds),
    ):
        assert torch.isfinite(value).all(), value
    ratio = rms_ratio(preds, target).item()
    assert ratio >= 0.0
    if not (preds.float().abs() > 0).any() and not (target.float().abs() > 0).any():
        assert ratio == 1.0
