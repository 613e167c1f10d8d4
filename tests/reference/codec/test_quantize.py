import math

import pytest
import torch
from torch import nn

from lightning_stability.reference.codec.quantize import ResidualVectorQuantizer, VectorQuantizer
from tests._helpers_spectral_scale import NoHostReads

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


RULES = {
    "absolute": {"threshold_ema_dead_code": 2.0, "dead_code_usage_ratio": None, "dead_code_check_every": 1},
    "relative": {"dead_code_usage_ratio": 0.1, "dead_code_check_every": 5},
}


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("ema", [True, False])
def test_dead_codes_are_revived_from_the_batch(ema, rule):
    rvq = ResidualVectorQuantizer(4, n_q=1, codebook_size=16, ema=ema, kmeans_init=False, **RULES[rule])
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
    expired = []
    for _ in range(100):  # the relative rule waits until code 0's use makes the others fall below 0.1 x uniform
        expired.append(float(rvq(x).metrics["expired"][0]))
        if layer.embed.abs().max() < 10:
            break
    assert layer.embed.abs().max() < 10, "dead codes were not replaced by batch vectors"
    assert max(expired) >= 15 / 16  # the replacement is logged as the fraction of codes expired
    rvq.eval()
    res = rvq(x)
    assert res.codes.unique().numel() > 8
    assert res.metrics["perplexity"][0] > 8


def test_relative_rule_checks_only_every_n_steps_without_host_reads():
    rvq = ResidualVectorQuantizer(4, n_q=1, codebook_size=16, kmeans_init=False, dead_code_check_every=5).train()
    layer = rvq.layers[0]
    with torch.no_grad():
        layer.embed.data.fill_(100.0)
        layer.embed.data[0] = 0.0
        layer.cluster_size[1:] = 1e-3  # 15 codes far below 0.1 x uniform use
        layer.embed_avg.copy_(layer.embed * layer.cluster_size[:, None])
    x = torch.randn(2, 4, 50)
    for _ in range(4):  # steps 0..3: no check yet
        assert float(rvq(x).metrics["expired"][0]) == 0.0
        assert layer.embed[1:].min() > 50.0  # not replaced (Laplace smoothing moves them a little)
    flat = x.transpose(1, 2).reshape(-1, 4)
    with NoHostReads():  # the check itself is decided on the device (no sync per step on a GPU)
        expired = layer._replace_dead_codes(flat, seed=3, step=4)
    assert float(expired) == pytest.approx(15 / 16)  # step 4: the first check
    assert layer.embed.abs().max() < 10


@pytest.mark.parametrize("ema", [True, False])
def test_a_replaced_code_survives_the_next_updates(ema):
    """encodec #61 / WavTokenizer #89: there, the vector written into the codebook is overwritten by the EMA's
    ``embed_avg / cluster_size`` in the same forward. Here the sum is written with the count, so it stays."""
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(4, n_q=1, codebook_size=8, ema=ema, kmeans_init=False, dead_code_check_every=1)
    layer = rvq.layers[0].train()
    with torch.no_grad():
        layer.embed.copy_(torch.randn(8, 4))
        layer.embed[7] = 50.0  # far from everything: never chosen
        if ema:
            layer.embed_avg.copy_(layer.embed * layer.cluster_size[:, None])
        layer.cluster_size[7] = 1e-4
    x = torch.randn(1, 4, 40)
    rvq(x)  # the check replaces code 7 by a vector of this batch
    replaced = layer.embed[7].clone()
    assert replaced.abs().max() < 10
    # it starts with the uniform share of the counts (not at the threshold, where it would expire again at once)
    assert float(layer.cluster_size[7]) > 0.8 * float(layer.cluster_size.mean())
    far = torch.full((1, 4, 40), -30.0)  # data that never picks code 7 again...
    far[..., ::2] = 30.0
    with torch.no_grad():
        layer.embed[0] = 30.0
        layer.embed[1] = -30.0
        if ema:
            layer.embed_avg[:2] = layer.embed[:2] * layer.cluster_size[:2, None]
    for _ in range(5):
        codes = rvq(far).codes
        assert not (codes == 7).any()
        # ...so its vector must stay what the replacement wrote (only Laplace smoothing may move it a hair)
        torch.testing.assert_close(layer.embed[7], replaced, rtol=1e-3, atol=1e-4)


def test_relative_threshold_does_not_depend_on_batch_size():
    """With EnCodec's absolute threshold (2 EMA hits), small batches recycle every code at every check even though
    every code is in use; Moshi's rule (a fraction of uniform use) leaves a healthy codebook alone at any batch size."""
    torch.manual_seed(0)
    centres = torch.randn(32, 4) * 3

    def churn(batch: int, **rule) -> float:  # mean fraction of codes replaced per check over the last 100 steps
        rvq = ResidualVectorQuantizer(4, n_q=1, codebook_size=32, kmeans_init=False, seed=1, **rule).train()
        with torch.no_grad():
            rvq.layers[0].embed.copy_(centres)
            rvq.layers[0].embed_avg.copy_(centres)
        expired = []
        for step in range(200):
            g = torch.Generator().manual_seed(step)
            idx = torch.randint(0, 32, (batch,), generator=g)
            x = (centres[idx] + 0.01 * torch.randn(batch, 4, generator=g)).T[None]
            res = rvq(x)
            if step >= 100 and (step + 1) % 5 == 0:
                expired.append(float(res.metrics["expired"][0]))
        return sum(expired) / len(expired)

    assert churn(16) < 0.02
    assert churn(1024) < 0.02
    absolute = {"threshold_ema_dead_code": 2.0, "dead_code_usage_ratio": None}
    assert churn(16, **absolute) > 0.9  # 16 frames a step: every code averages 0.5 hits < 2
    assert churn(1024, **absolute) < 0.02


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dim": 0}, ValueError, "`dim` must be >= 1, got 0"),
        ({"dim": 8.0}, TypeError, "`dim` must be an int, got 8.0"),
        ({"codebook_size": 1}, ValueError, "`codebook_size` must be >= 2, got 1"),
        ({"codebook_size": "16"}, TypeError, "`codebook_size` must be an int, got '16'"),
        ({"codebook_dim": 0}, ValueError, "`codebook_dim` must be >= 1, got 0"),
        ({"codebook_dim": 4.0}, TypeError, "`codebook_dim` must be an int or None, got 4.0"),
        ({"decay": 1.0}, ValueError, r"`decay` must be a number in \(0, 1\), got 1.0"),
        ({"decay": "0.99"}, TypeError, "`decay` must be a number, got '0.99'"),
        ({"epsilon": 0.0}, ValueError, "`epsilon` must be a finite number > 0, got 0.0"),
        ({"ema": "no"}, TypeError, "`ema` must be a bool, got 'no'"),
        ({"l2_normalize": 1}, TypeError, "`l2_normalize` must be a bool, got 1"),
        ({"kmeans_init": None}, TypeError, "`kmeans_init` must be a bool, got None"),
        ({"kmeans_iters": 0}, ValueError, "`kmeans_iters` must be >= 1, got 0"),
        ({"kmeans_iters": 2.5}, TypeError, "`kmeans_iters` must be an int, got 2.5"),
        ({"threshold_ema_dead_code": float("inf")}, ValueError, "`threshold_ema_dead_code` must be a finite number"),
        ({"dead_code_usage_ratio": 1.0}, ValueError, r"`dead_code_usage_ratio` must be a number in \[0, 1\) or None"),
        ({"dead_code_usage_ratio": True}, TypeError, "`dead_code_usage_ratio` must be a number or None, got True"),
        ({"dead_code_check_every": 0}, ValueError, "`dead_code_check_every` must be >= 1, got 0"),
    ],
)
@pytest.mark.parametrize("cls", [VectorQuantizer, ResidualVectorQuantizer])
def test_bad_arguments_name_the_argument(cls, kwargs, error, match):
    kwargs = {"dim": 8, "codebook_size": 16, **kwargs}
    with pytest.raises(error, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_q": 0}, ValueError, "`n_q` must be >= 1, got 0"),
        ({"n_q": 2.0}, TypeError, "`n_q` must be an int, got 2.0"),
        ({"quantizer_dropout": 1.5}, ValueError, r"`quantizer_dropout` must be a number in \[0, 1\], got 1.5"),
        ({"quantizer_dropout": "0.5"}, TypeError, "`quantizer_dropout` must be a number, got '0.5'"),
        ({"seed": 0.5}, TypeError, "`seed` must be an int, got 0.5"),
    ],
)
def test_residual_quantizer_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        ResidualVectorQuantizer(8, **{"codebook_size": 16, **kwargs})
