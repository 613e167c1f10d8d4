import pytest
import torch

from lightning_stability.reference.codec.discriminator import (
    DiscriminatorSTFT,
    MultiScaleSTFTDiscriminator,
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
)


def test_shapes_and_feature_maps():
    disc = MultiScaleSTFTDiscriminator(filters=4, n_ffts=(128, 256))
    logits, fmaps = disc(torch.randn(2, 1, 2000))
    assert len(logits) == len(fmaps) == 2
    assert all(logit.shape[:2] == (2, 1) for logit in logits)
    assert all(len(f) == 5 for f in fmaps)  # first conv, 3 dilated convs, last conv


def test_losses_hand_computed():
    real, fake = [torch.tensor([2.0, 0.5])], [torch.tensor([-2.0, 0.5])]
    # hinge: relu(1 - real) = [0, .5], relu(1 + fake) = [0, 1.5]
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(0.25 + 0.75)
    assert generator_adversarial_loss(fake, "hinge").item() == pytest.approx((3.0 + 0.5) / 2)
    # least squares: (1 - real)^2 = [1, .25], fake^2 = [4, .25]
    assert discriminator_loss(real, fake, "ls").item() == pytest.approx(0.625 + 2.125)
    assert generator_adversarial_loss(fake, "ls").item() == pytest.approx((9 + 0.25) / 2)
    f = [[torch.ones(3) * 2]]
    assert feature_matching_loss(f, [[torch.ones(3)]]).item() == pytest.approx(0.5)
    assert feature_matching_loss(f, f).item() == 0.0
    with pytest.raises(ValueError, match="`kind`"):
        discriminator_loss(real, fake, "wasserstein")


def test_feature_matching_does_not_train_on_real_features():
    disc = MultiScaleSTFTDiscriminator(filters=2, n_ffts=(64,))
    x, y = torch.randn(1, 1, 500), torch.randn(1, 1, 500, requires_grad=True)
    _, fr = disc(x)
    _, ff = disc(y)
    feature_matching_loss(fr, ff).backward()
    assert y.grad is not None
    assert y.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"filters": 0}, ValueError, "`filters` must be >= 1, got 0"),
        ({"filters": 4.0}, TypeError, "`filters` must be an int, got 4.0"),
        ({"in_channels": True}, TypeError, "`in_channels` must be an int, got True"),
        ({"n_ffts": ()}, ValueError, "`n_ffts` must have at least 1 item, got ()"),
        ({"n_ffts": (128, 4)}, ValueError, r"`n_ffts\[1\]` must be >= 8, got 4"),
        ({"n_ffts": 128}, TypeError, "`n_ffts` must be a sequence of ints, got 128"),
        ({"max_filters": 0}, ValueError, "`max_filters` must be >= 1, got 0"),
        ({"kernel_size": (3, 9, 1)}, ValueError, r"`kernel_size` must have 2 items, got \(3, 9, 1\)"),
        ({"dilations": (1, 2.0)}, TypeError, r"`dilations\[1\]` must be an int, got 2.0"),
        ({"stride": 2}, TypeError, "`stride` must be a pair of numbers, got 2"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        MultiScaleSTFTDiscriminator(**{"filters": 4, "n_ffts": (128,), **kwargs})


def test_single_scale_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="`n_fft` must be >= 8, got 4"):
        DiscriminatorSTFT(n_fft=4)
    with pytest.raises(TypeError, match="`max_filters` must be an int, got 64.0"):
        DiscriminatorSTFT(max_filters=64.0)
    with pytest.raises(ValueError, match=r"`kind` must be one of \('hinge', 'ls'\), got 'wgan'"):
        discriminator_loss([torch.zeros(1)], [torch.zeros(1)], "wgan")
