import pytest
import torch

from lightning_stability.reference.codec.discriminator import (
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
