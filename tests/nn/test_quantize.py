import math

import pytest
import torch
from torch import nn

from lightning_stability.nn.quantize import ResidualVectorQuantizer

VARIANTS = {
    "ema": {"ema": True},
    "learned": {"ema": False},
    "factorised": {"ema": False, "codebook_dim": 4, "l2_normalize": True},
}


def _rvq(**kw):
    defaults = {"n_q": 4, "codebook_size": 16, "kmeans_iters": 3}
    defaults.update(kw)
    return ResidualVectorQuantizer(8, **defaults)


def _codebook_state(rvq):
    return {k: v.clone() for k, v in rvq.state_dict().items() if k != "num_updates"}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_codes_shape_and_decode_round_trip(variant):
    rvq = _rvq(**VARIANTS[variant])
    x = torch.randn(3, 8, 20)
    rvq.train()
    rvq(x)  # k-means init on the first training batch
    rvq.eval()
    res = rvq(x)
    assert res.codes.shape == (3, 4, 20)
    assert res.codes.dtype == torch.int64
    assert res.n_q == 4
    assert res.stage_commitment_losses.shape == (4,)
    torch.testing.assert_close(rvq.decode(rvq.encode(x)), res.quantized)
    assert rvq.bits_per_frame == 4 * math.log2(16)
    if variant != "factorised":  # (factorised: untrained random projections, no such guarantee)
        # more stages quantize better (the residual shrinks stage after stage)
        errors = [(rvq.decode(res.codes[:, :n]) - x).pow(2).mean().item() for n in range(1, 5)]
        assert errors == sorted(errors, reverse=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_commitment_gradient_reaches_the_input_at_every_stage(variant):
    rvq = _rvq(**VARIANTS[variant]).train()
    x = torch.randn(2, 8, 30, requires_grad=True)
    res = rvq(x)
    for i in range(res.n_q):
        (grad,) = torch.autograd.grad(res.stage_commitment_losses[i], x, retain_graph=True)
        assert torch.isfinite(grad).all()
        assert grad.abs().sum() > 0, f"stage {i} commitment gradient does not reach the input (encodec issue #25)"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_straight_through_passes_the_decoder_gradient_to_the_encoder_once(variant):
    torch.manual_seed(0)
    encoder = nn.Conv1d(1, 8, 3, padding=1)
    rvq = _rvq(**VARIANTS[variant]).train()
    audio = torch.randn(2, 1, 30)
    z = encoder(audio)
    z.retain_grad()
    res = rvq(z)
    upstream = torch.randn_like(res.quantized)
    (res.quantized * upstream).sum().backward()
    if rvq.layers[0].codebook_dim == 8:  # identity projections: d quantized / d z is exactly the identity
        torch.testing.assert_close(z.grad, upstream)
    else:
        assert z.grad.abs().sum() > 0
    assert encoder.weight.grad is not None
    assert encoder.weight.grad.abs().sum() > 0


def test_learned_codebook_gets_gradient_only_from_the_codebook_loss():
    rvq = _rvq(ema=False).train()
    x = torch.randn(2, 8, 30, requires_grad=True)
    res = rvq(x)
    res.quantized.sum().backward(retain_graph=True)
    assert all(layer.embed.grad is None or layer.embed.grad.abs().sum() == 0 for layer in rvq.layers)
    res.codebook_loss.backward()
    assert all(layer.embed.grad.abs().sum() > 0 for layer in rvq.layers)


@pytest.mark.parametrize("ema", [True, False])
def test_dead_codes_are_revived_from_the_batch(ema):
    rvq = ResidualVectorQuantizer(4, n_q=1, codebook_size=16, ema=ema, kmeans_init=False, threshold_ema_dead_code=2.0)
    layer = rvq.layers[0]
    with torch.no_grad():
        layer.embed.data.fill_(100.0)  # every code far from the data...
        layer.embed.data[0] = 0.0  # ...but one
        if ema:
            layer.embed_avg.copy_(layer.embed * layer.cluster_size[:, None])
    x = torch.randn(2, 4, 100)
    rvq.eval()
    assert rvq(x).codes.unique().tolist() == [0]  # only code 0 is ever chosen: 15 dead codes
    rvq.train()
    rvq(x)
    assert layer.embed.abs().max() < 10, "dead codes were not replaced by batch vectors"
    rvq.eval()
    res = rvq(x)
    assert res.codes.unique().numel() > 8
    assert res.metrics["perplexity"][0] > 8


def test_kmeans_init_fits_the_first_batch():
    rvq = _rvq(n_q=1, codebook_size=16, kmeans_iters=10, threshold_ema_dead_code=0.0)
    centres = torch.randn(4, 8) * 5
    x = (centres[torch.randint(0, 4, (400,))] + 0.01 * torch.randn(400, 8)).T.reshape(8, 2, 200).transpose(0, 1)
    assert not bool(rvq.layers[0].initialized)
    rvq.train()
    res = rvq(x)
    assert bool(rvq.layers[0].initialized)
    assert res.commitment_loss < 0.5  # data variance is ~25: k-means found (most of) the clusters


@pytest.mark.parametrize("variant", ["ema", "learned"])
def test_non_finite_batch_leaves_codebooks_untouched(variant):
    rvq = _rvq(**VARIANTS[variant]).train()
    x = torch.randn(2, 8, 30)
    rvq(x)
    before = _codebook_state(rvq)
    bad = x.clone()
    bad[0, :, 3] = float("nan")
    bad[1, 2, 5] = float("inf")
    rvq(bad)
    after = _codebook_state(rvq)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    out = rvq(x)  # training continues normally
    assert torch.isfinite(out.quantized).all()
    assert torch.isfinite(out.commitment_loss)


def test_nan_first_batch_postpones_kmeans_init():
    rvq = _rvq().train()
    rvq(torch.full((2, 8, 30), float("nan")))
    assert not bool(rvq.layers[0].initialized)
    assert torch.isfinite(rvq.layers[0].embed).all()
    rvq(torch.randn(2, 8, 30))
    assert bool(rvq.layers[0].initialized)
    assert torch.isfinite(rvq.layers[0].embed).all()


def test_quantizer_dropout_draws_stage_counts_deterministically():
    def draws(rvq):
        rvq.train()
        return [rvq(torch.randn(2, 8, 10)).n_q for _ in range(30)]

    a = draws(_rvq(quantizer_dropout=0.5, seed=3))
    b = draws(_rvq(quantizer_dropout=0.5, seed=3))
    assert a == b  # same seed: same draws (DDP ranks agree)
    assert set(a) <= {1, 2, 3, 4}
    assert min(a) < 4
    assert 4 in a
    rvq = _rvq(quantizer_dropout=1.0).train()
    res = rvq(torch.randn(2, 8, 10), n_q=2)
    assert res.codes.shape[1] == 2
    assert res.stage_commitment_losses.shape == (2,)
    rvq.eval()
    assert all(rvq(torch.randn(2, 8, 10)).n_q == 4 for _ in range(5))  # no dropout at evaluation


def test_dropped_stages_stay_in_the_graph():
    rvq = _rvq(ema=False, quantizer_dropout=1.0).train()
    res = rvq(torch.randn(2, 8, 10), n_q=1)
    (res.quantized.sum() + res.codebook_loss).backward()
    assert all(layer.embed.grad is not None for layer in rvq.layers)  # DDP sees every parameter used


def test_distances_are_fp32_under_autocast():
    rvq = _rvq().train()
    x = torch.randn(2, 8, 30)
    rvq(x)
    rvq.eval()
    ref = rvq(x).codes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = rvq(x).codes
    assert torch.equal(ref, low)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_q": 0}, "`n_q`"),
        ({"codebook_size": 1}, "`codebook_size`"),
        ({"decay": 1.0}, "`decay`"),
        ({"quantizer_dropout": 1.5}, "`quantizer_dropout`"),
        ({"threshold_ema_dead_code": float("nan")}, "`threshold_ema_dead_code`"),
        ({"codebook_dim": 0}, "`codebook_dim`"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResidualVectorQuantizer(8, **kwargs)


def test_bad_codes_and_inputs_are_named():
    rvq = _rvq()
    with pytest.raises(ValueError, match=r"\[B, 8, T\]"):
        rvq(torch.randn(2, 7, 5))
    with pytest.raises(ValueError, match="`codes`"):
        rvq.decode(torch.full((1, 2, 3), 16))
    with pytest.raises(ValueError, match="`n_q`"):
        rvq(torch.randn(1, 8, 5), n_q=5)
