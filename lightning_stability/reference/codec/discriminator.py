"""EnCodec's multi-scale STFT discriminator (MS-STFT-D) and the adversarial losses used with it.

Défossez et al. 2022 (EnCodec, arXiv:2210.13438, section 3.4; ``audiocraft/adversarial/discriminators/msstftd.py``
and ``audiocraft/adversarial/losses.py``). Each scale takes the complex STFT of the waveform (real and imaginary
parts as 2 input channels per audio channel, normalised STFT), applies weight-normalised 2-D convolutions (kernel
``(3, 9)``, stride ``(1, 2)`` along frequency, dilations ``1, 2, 4`` along time, LeakyReLU 0.2) and a 1-channel
output convolution. It returns the logits and every intermediate feature map (for feature matching).

Losses (``real``/``fake``: lists of logits, one per scale; averaged over scales):

- hinge:        ``L_D = mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))``, ``L_G = mean(relu(1 - D(x_hat)))``
- least squares: ``L_D = mean((1 - D(x))^2) + mean(D(x_hat)^2)``,          ``L_G = mean((1 - D(x_hat))^2)``
- feature matching (EnCodec's relative L1): ``L_feat = mean_{k,l} ||f_kl(x) - f_kl(x_hat)||_1 / mean |f_kl(x)|``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm

from lightning_stability._checks import check_choice, check_int, check_pair, check_sequence
from lightning_stability.reference.codec.seanet import PicklableParametrized

__all__ = [
    "DiscriminatorSTFT",
    "MultiScaleSTFTDiscriminator",
    "discriminator_loss",
    "feature_matching_loss",
    "generator_adversarial_loss",
]


def _padding(kernel: tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    return ((kernel[0] - 1) * dilation[0]) // 2, ((kernel[1] - 1) * dilation[1]) // 2


class DiscriminatorSTFT(PicklableParametrized):
    """One STFT scale: ``[B, C, T] -> (logits [B, 1, frames, freq'], feature maps)``."""

    def __init__(
        self,
        *,
        filters: int = 32,
        in_channels: int = 1,
        n_fft: int = 1024,
        hop_length: int = 256,
        max_filters: int = 1024,
        filters_scale: int = 1,
        kernel_size: tuple[int, int] = (3, 9),
        dilations: Sequence[int] = (1, 2, 4),
        stride: tuple[int, int] = (1, 2),
    ) -> None:
        super().__init__()
        for name, value in (
            ("filters", filters),
            ("in_channels", in_channels),
            ("hop_length", hop_length),
            ("max_filters", max_filters),
            ("filters_scale", filters_scale),
        ):
            check_int(name, value, 1)
        check_int("n_fft", n_fft, 8)
        positive_int = partial(check_int, minimum=1)
        check_pair("kernel_size", kernel_size, positive_int)
        check_sequence("dilations", dilations, positive_int, noun="a sequence of ints")
        check_pair("stride", stride, positive_int)
        self._init_kwargs = {
            "filters": filters, "in_channels": in_channels, "n_fft": n_fft, "hop_length": hop_length,
            "max_filters": max_filters, "filters_scale": filters_scale, "kernel_size": kernel_size,
            "dilations": tuple(dilations), "stride": stride,
        }  # fmt: skip
        self.n_fft, self.hop_length = n_fft, hop_length
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        convs = [weight_norm(nn.Conv2d(2 * in_channels, filters, kernel_size, padding=_padding(kernel_size)))]
        in_chs = min(filters_scale * filters, max_filters)
        for i, d in enumerate(dilations):
            out_chs = min(filters_scale ** (i + 1) * filters, max_filters)
            convs.append(
                weight_norm(
                    nn.Conv2d(
                        in_chs,
                        out_chs,
                        kernel_size,
                        stride=stride,
                        dilation=(d, 1),
                        padding=_padding(kernel_size, (d, 1)),
                    )
                )
            )
            in_chs = out_chs
        out_chs = min(filters_scale ** (len(dilations) + 1) * filters, max_filters)
        square = (kernel_size[0], kernel_size[0])
        convs.append(weight_norm(nn.Conv2d(in_chs, out_chs, square, padding=_padding(square))))
        self.convs = nn.ModuleList(convs)
        self.conv_post = weight_norm(nn.Conv2d(out_chs, 1, square, padding=_padding(square)))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        B, C, T = x.shape
        with torch.autocast(x.device.type, enabled=False):
            spec = torch.stft(
                x.float().reshape(B * C, T),
                self.n_fft,
                hop_length=self.hop_length,
                window=self.window,
                normalized=True,
                center=True,
                return_complex=True,
            )  # B*C, F, frames
        spec = spec.reshape(B, C, *spec.shape[-2:])
        z = torch.cat([spec.real, spec.imag], dim=1).transpose(2, 3)  # B, 2C, frames, F
        fmap = []
        for conv in self.convs:
            z = F.leaky_relu(conv(z), 0.2)
            fmap.append(z)
        return self.conv_post(z), fmap


class MultiScaleSTFTDiscriminator(nn.Module):
    """Several :class:`DiscriminatorSTFT` at different resolutions (EnCodec: FFT 1024, 2048, 512; hop FFT / 4).

    ``forward(x [B, C, T]) -> (logits: list[Tensor], feature_maps: list[list[Tensor]])``, one entry per scale.
    """

    def __init__(
        self, *, filters: int = 32, in_channels: int = 1, n_ffts: Sequence[int] = (1024, 2048, 512), **kwargs
    ) -> None:
        super().__init__()
        check_int("filters", filters, 1)
        check_int("in_channels", in_channels, 1)
        n_ffts = check_sequence("n_ffts", n_ffts, partial(check_int, minimum=8), noun="a sequence of ints")
        self.discriminators = nn.ModuleList(
            DiscriminatorSTFT(filters=filters, in_channels=in_channels, n_fft=n, hop_length=n // 4, **kwargs)
            for n in n_ffts
        )

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[list[Tensor]]]:
        logits, fmaps = [], []
        for disc in self.discriminators:
            logit, fmap = disc(x)
            logits.append(logit)
            fmaps.append(fmap)
        return logits, fmaps


def _check_kind(kind: str) -> None:
    check_choice("kind", kind, ("hinge", "ls"))


def discriminator_loss(real: Sequence[Tensor], fake: Sequence[Tensor], kind: str = "hinge") -> Tensor:
    """Discriminator loss averaged over scales (see the module docstring)."""
    _check_kind(kind)
    total = real[0].new_zeros((), dtype=torch.float32)
    for r, f in zip(real, fake):
        r, f = r.float(), f.float()
        if kind == "hinge":
            total = total + F.relu(1 - r).mean() + F.relu(1 + f).mean()
        else:
            total = total + (1 - r).pow(2).mean() + f.pow(2).mean()
    return total / len(real)


def generator_adversarial_loss(fake: Sequence[Tensor], kind: str = "hinge") -> Tensor:
    """Generator's adversarial loss averaged over scales."""
    _check_kind(kind)
    total = fake[0].new_zeros((), dtype=torch.float32)
    for f in fake:
        f = f.float()
        total = total + (F.relu(1 - f).mean() if kind == "hinge" else (1 - f).pow(2).mean())
    return total / len(fake)


def feature_matching_loss(real_fmaps: Sequence[Sequence[Tensor]], fake_fmaps: Sequence[Sequence[Tensor]]) -> Tensor:
    """EnCodec's relative feature matching: mean over scales and layers of ``L1(f_real, f_fake) / mean|f_real|``.

    The real features are detached (the discriminator is not trained by this loss).
    """
    total, n = None, 0
    for fr_scale, ff_scale in zip(real_fmaps, fake_fmaps):
        for fr, ff in zip(fr_scale, ff_scale):
            fr = fr.detach().float()
            term = F.l1_loss(ff.float(), fr) / fr.abs().mean().clamp(min=1e-8)
            total = term if total is None else total + term
            n += 1
    if total is None:
        raise ValueError("`real_fmaps` and `fake_fmaps` must contain at least one feature map")
    return total / n
