import math

import pytest
import torch

from lightning_stability.reference.codec.seanet import SEANetDecoder, SEANetEncoder, SEANetResnetBlock


def _pair(ratios, causal=False, lstm=0):
    kw = {"n_filters": 4, "dimension": 8, "ratios": ratios, "lstm": lstm, "causal": causal}
    return SEANetEncoder(**kw), SEANetDecoder(**kw)


@pytest.mark.parametrize("ratios", [(8, 5, 4, 2), (4, 4), (2, 3, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_hop_and_shapes(ratios, causal):
    enc, dec = _pair(ratios, causal=causal, lstm=1)
    hop = math.prod(ratios)
    assert enc.hop_length == dec.hop_length == hop
    for frames in (1, 3):
        z = enc(torch.randn(2, 1, frames * hop))
        assert z.shape == (2, 8, frames)
        assert dec(z).shape == (2, 1, frames * hop)  # multiples of hop: output length == input length
    # other lengths: ceil(L / hop) frames, ceil(L / hop) * hop samples (the codec trims back to L)
    z = enc(torch.randn(2, 1, 3 * hop + 1))
    assert z.shape[-1] == 4
    assert dec(z).shape[-1] == 4 * hop


def test_default_is_encodec_24khz_layout():
    enc = SEANetEncoder()
    assert enc.hop_length == 320
    assert enc.dimension == 128
    assert 24000 / enc.hop_length == 75
    keys = [k for k in enc.state_dict() if "parametrizations.weight.original0" in k]
    assert keys, "weight norm must use torch.nn.utils.parametrizations"
    assert any("lstm" in k for k in enc.state_dict())


def test_causal_encoder_ignores_the_future():
    # zero padding: reflect padding mirrors later samples into the left edge (documented on `pad_mode`)
    enc = SEANetEncoder(n_filters=4, dimension=8, ratios=(4, 4), lstm=1, causal=True, pad_mode="constant")
    x = torch.randn(1, 1, 16 * 6)
    y = x.clone()
    y[..., 16 * 4 :] = torch.randn(1, 1, 32) * 10  # change the last two frames' samples only
    assert torch.equal(enc(x)[..., :4], enc(y)[..., :4])
    assert not torch.equal(enc(x)[..., 4:], enc(y)[..., 4:])


def test_decoder_is_unbounded():
    _, dec = _pair((4, 4))
    names = [type(m).__name__ for m in dec.modules()]
    assert "Tanh" not in names
    assert not any("scale" in n for n, _ in dec.named_parameters())
    with torch.no_grad():
        out = dec(torch.randn(1, 8, 10) * 100)
    # a tanh would bound the output to [-1, 1]; the unbounded decoder scales with its input
    assert out.abs().max() > 1.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratios": ()}, "`ratios`"),
        ({"ratios": (4, 0)}, r"`ratios\[1\]` must be >= 1, got 0"),
        ({"dimension": 0}, "`dimension`"),
        ({"lstm": -1}, "`lstm`"),
        ({"pad_mode": "circular"}, "`pad_mode`"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SEANetEncoder(**kwargs)
    with pytest.raises(ValueError, match=match):
        SEANetDecoder(**kwargs)


def test_wrong_input_shape_is_named():
    enc, dec = _pair((4, 4))
    with pytest.raises(ValueError, match=r"\[B, 1, T\]"):
        enc(torch.randn(2, 16))
    with pytest.raises(ValueError, match=r"\[B, 8, F\]"):
        dec(torch.randn(2, 3, 4))


def test_weight_normed_layers_pickle_and_deepcopy():
    # torch refuses to pickle parametrized modules; ddp_spawn needs it (they pickle as kwargs + state_dict)
    import copy
    import pickle

    enc = SEANetEncoder(n_filters=4, dimension=8, ratios=(4, 4), lstm=1)
    x = torch.randn(1, 1, 64)
    for clone in (pickle.loads(pickle.dumps(enc)), copy.deepcopy(enc)):
        assert torch.equal(clone(x), enc(x))
        assert clone.state_dict().keys() == enc.state_dict().keys()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"channels": 1.0}, TypeError, "`channels` must be an int, got 1.0"),
        ({"n_filters": 0}, ValueError, "`n_filters` must be >= 1, got 0"),
        ({"ratios": 4}, TypeError, "`ratios` must be a sequence of ints, got 4"),
        ({"ratios": (4, 2.0)}, TypeError, r"`ratios\[1\]` must be an int, got 2.0"),
        ({"n_residual_layers": -1}, ValueError, "`n_residual_layers` must be >= 0, got -1"),
        ({"lstm": 1.5}, TypeError, "`lstm` must be an int, got 1.5"),
        ({"causal": "yes"}, TypeError, "`causal` must be a bool, got 'yes'"),
        ({"kernel_size": 0}, ValueError, "`kernel_size` must be >= 1, got 0"),
        ({"dilation_base": 2.0}, TypeError, "`dilation_base` must be an int, got 2.0"),
        ({"compress": 0}, ValueError, "`compress` must be >= 1, got 0"),
    ],
)
@pytest.mark.parametrize("cls", [SEANetEncoder, SEANetDecoder])
def test_wrong_types_and_values_name_the_argument(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dim": 0}, ValueError, "`dim` must be >= 1, got 0"),
        ({"dilation": 1.0}, TypeError, "`dilation` must be an int, got 1.0"),
        ({"causal": 0}, TypeError, "`causal` must be a bool, got 0"),
        ({"pad_mode": "circular"}, ValueError, "`pad_mode` must be one of"),
    ],
)
def test_resnet_block_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        SEANetResnetBlock(**{"dim": 8, **kwargs})
