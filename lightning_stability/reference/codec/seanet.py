"""SEANet encoder and decoder, the convolutional backbone of EnCodec (Défossez et al. 2022, arXiv:2210.13438).

Follows ``audiocraft/modules/seanet.py``: a first convolution, then per stride ``ratio`` a stack of residual units with
dilations ``dilation_base ** j`` followed by an ELU and a strided convolution of kernel ``2 * ratio``, an optional
LSTM bottleneck and a last convolution to ``dimension`` channels. The decoder mirrors it with transposed convolutions.

Differences from audiocraft kept on purpose:

- weight norm is ``torch.nn.utils.parametrizations.weight_norm`` (the parametrizations API; state-dict keys
  ``parametrizations.weight.original0/1``);
- the decoder is **unbounded**: no final ``tanh`` and no learnable output scale (``docs/design.md``, post-mortem 2: a
  tanh plus a
  learnable scale fought the convolutions over the output amplitude). Amplitude is handled by the codec's RMS
  scale normalisation and an RMS-matching loss instead.

Shapes (``hop = prod(ratios)``)::

    encoder: [B, channels, L] -> [B, dimension, ceil(L / hop)]
    decoder: [B, dimension, F] -> [B, channels, F * hop]

so the decoder's output has exactly the input length when ``L`` is a multiple of ``hop``; otherwise it has
``ceil(L / hop) * hop`` samples and the caller trims it to ``L`` (``CodecModule`` does: it zero-pads its input on the
right to a multiple of ``hop`` and trims the reconstruction back to ``L``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm

from lightning_stability._checks import check_bool, check_choice, check_int, check_sequence

__all__ = ["PicklableParametrized", "SEANetDecoder", "SEANetEncoder", "SEANetResnetBlock"]

_PAD_MODES = ("reflect", "constant", "replicate")


def _pad1d(x: torch.Tensor, left: int, right: int, mode: str) -> torch.Tensor:
    """``F.pad`` that also reflect-pads inputs shorter than the padding (zero-extends first, as audiocraft does)."""
    if mode != "reflect":
        return F.pad(x, (left, right), mode=mode)
    length = x.shape[-1]
    max_pad = max(left, right)
    extra = 0
    if length <= max_pad:
        extra = max_pad - length + 1
        x = F.pad(x, (0, extra))
    padded = F.pad(x, (left, right), mode="reflect")
    return padded[..., : padded.shape[-1] - extra]


def _rebuild(cls: type, kwargs: dict, state: dict, training: bool) -> nn.Module:
    module = cls(**kwargs)
    module.load_state_dict(state)
    return module.train(training)


class PicklableParametrized(nn.Module):
    """Base for modules holding ``torch.nn.utils.parametrize`` parametrizations (weight norm), which torch refuses
    to pickle ("only supported through state_dict()"). Such a module pickles (and deep-copies) as its constructor
    arguments plus its ``state_dict``, so a model built from it can be sent to ``ddp_spawn`` workers.

    Subclasses set ``self._init_kwargs`` (a dict of their constructor's keyword arguments) in ``__init__``.
    """

    _init_kwargs: dict

    def __reduce_ex__(self, protocol: int):
        # No copies: the state-dict tensors share the live parameters' storage, which must outlive the pickling
        # (torch.multiprocessing passes storages by file descriptor). deepcopy copies them itself.
        return _rebuild, (type(self), dict(self._init_kwargs), self.state_dict(), self.training)


class _Conv1d(PicklableParametrized):
    """Weight-normalised ``Conv1d`` that pads itself ("same" length for stride 1, ``ceil(L / stride)`` frames).

    Padding total is ``(kernel_size - 1) * dilation + 1 - stride``, split evenly (non-causal) or all on the left
    (causal), plus the extra right padding that makes the last window complete.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        causal: bool = False,
        pad_mode: str = "reflect",
        norm: bool = True,
    ) -> None:
        super().__init__()
        self._init_kwargs = {
            "in_channels": in_channels, "out_channels": out_channels, "kernel_size": kernel_size, "stride": stride,
            "dilation": dilation, "causal": causal, "pad_mode": pad_mode, "norm": norm,
        }  # fmt: skip
        conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation)
        self.conv = weight_norm(conv) if norm else conv
        self.causal = causal
        self.pad_mode = pad_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        stride = conv.stride[0]
        kernel = (conv.kernel_size[0] - 1) * conv.dilation[0] + 1
        padding_total = kernel - stride
        length = x.shape[-1]
        n_frames = (length - kernel + padding_total) / stride + 1
        ideal_length = (math.ceil(n_frames) - 1) * stride + (kernel - padding_total)
        extra = ideal_length - length
        if self.causal:
            left, right = padding_total, extra
        else:
            right = padding_total // 2
            left, right = padding_total - right, right + extra
        return conv(_pad1d(x, left, right, self.pad_mode))


class _ConvTranspose1d(PicklableParametrized):
    """Weight-normalised ``ConvTranspose1d`` trimmed so ``F`` frames become exactly ``F * stride`` samples."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int, causal: bool = False, norm=True
    ) -> None:
        super().__init__()
        self._init_kwargs = {
            "in_channels": in_channels, "out_channels": out_channels, "kernel_size": kernel_size, "stride": stride,
            "causal": causal, "norm": norm,
        }  # fmt: skip
        conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride)
        self.convtr = weight_norm(conv) if norm else conv
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.convtr(x)
        padding_total = self.convtr.kernel_size[0] - self.convtr.stride[0]
        if self.causal:  # trim everything on the right: the output never depends on the future
            left, right = 0, padding_total
        else:
            right = padding_total // 2
            left = padding_total - right
        return y[..., left : y.shape[-1] - right]


class _LSTM(nn.Module):
    """LSTM over time with a skip connection: ``[B, C, T] -> [B, C, T]``."""

    def __init__(self, dim: int, num_layers: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, num_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.permute(2, 0, 1)  # T, B, C
        y, _ = self.lstm(seq)
        return (y + seq).permute(1, 2, 0)


class SEANetResnetBlock(nn.Module):
    """Residual unit ``x + conv1(elu(conv_k(elu(x))))`` with a hidden width ``dim // compress``."""

    def __init__(
        self,
        dim: int,
        *,
        kernel_size: int = 3,
        dilation: int = 1,
        compress: int = 2,
        causal: bool = False,
        pad_mode: str = "reflect",
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("kernel_size", kernel_size), ("dilation", dilation), ("compress", compress)):
            check_int(name, value, 1)
        check_bool("causal", causal)
        check_choice("pad_mode", pad_mode, _PAD_MODES)
        hidden = max(1, dim // compress)
        self.block = nn.Sequential(
            nn.ELU(),
            _Conv1d(dim, hidden, kernel_size, dilation=dilation, causal=causal, pad_mode=pad_mode),
            nn.ELU(),
            _Conv1d(hidden, dim, 1, causal=causal, pad_mode=pad_mode),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _check_common(
    *,
    channels: Any,
    dimension: Any,
    n_filters: Any,
    ratios: Any,
    n_residual_layers: Any,
    lstm: Any,
    causal: Any,
    kernel_size: Any,
    last_kernel_size: Any,
    residual_kernel_size: Any,
    dilation_base: Any,
    compress: Any,
    pad_mode: Any,
) -> tuple[int, ...]:
    """The arguments the encoder and decoder share, checked with one contract; returns ``ratios`` as a tuple."""
    for name, value in (
        ("channels", channels),
        ("dimension", dimension),
        ("n_filters", n_filters),
        ("kernel_size", kernel_size),
        ("last_kernel_size", last_kernel_size),
        ("residual_kernel_size", residual_kernel_size),
        ("dilation_base", dilation_base),
        ("compress", compress),
    ):
        check_int(name, value, 1)
    ratios = check_sequence("ratios", ratios, partial(check_int, minimum=1), noun="a sequence of ints")
    check_int("n_residual_layers", n_residual_layers, 0)
    check_int("lstm", lstm, 0)
    check_bool("causal", causal)
    check_choice("pad_mode", pad_mode, _PAD_MODES)
    return ratios


class SEANetEncoder(nn.Module):
    """SEANet encoder: ``[B, channels, L] -> [B, dimension, ceil(L / hop)]`` with ``hop = prod(ratios)``.

    Args:
        channels: audio channels.
        dimension: latent dimension (EnCodec: 128).
        n_filters: width of the first convolution; doubled after every downsampling.
        ratios: downsampling ratios in **decoder order** (audiocraft's convention): the encoder applies them reversed,
            so the default ``(8, 5, 4, 2)`` downsamples by 2, 4, 5, 8 (hop 320: 75 frames/s at 24 kHz).
        n_residual_layers: residual units per stage (dilations ``dilation_base ** j``).
        lstm: number of LSTM layers in the bottleneck (0: none; EnCodec: 2).
        causal: pad on the left only, so frame ``t`` never sees samples after its window.
        kernel_size, last_kernel_size, residual_kernel_size, dilation_base, compress: as in audiocraft.
        pad_mode: padding of the convolutions (``"reflect"`` as audiocraft; ``"constant"`` for zeros). With
            ``causal=True`` only ``"constant"`` is strictly causal: reflect padding mirrors the next few samples
            into the left edge, so the first frames depend slightly on later input.
    """

    def __init__(
        self,
        *,
        channels: int = 1,
        dimension: int = 128,
        n_filters: int = 32,
        ratios: Sequence[int] = (8, 5, 4, 2),
        n_residual_layers: int = 1,
        lstm: int = 2,
        causal: bool = False,
        kernel_size: int = 7,
        last_kernel_size: int = 7,
        residual_kernel_size: int = 3,
        dilation_base: int = 2,
        compress: int = 2,
        pad_mode: str = "reflect",
    ) -> None:
        super().__init__()
        ratios = _check_common(
            channels=channels,
            dimension=dimension,
            n_filters=n_filters,
            ratios=ratios,
            n_residual_layers=n_residual_layers,
            lstm=lstm,
            causal=causal,
            kernel_size=kernel_size,
            last_kernel_size=last_kernel_size,
            residual_kernel_size=residual_kernel_size,
            dilation_base=dilation_base,
            compress=compress,
            pad_mode=pad_mode,
        )
        self.channels, self.dimension, self.ratios = channels, dimension, ratios
        self.hop_length = math.prod(ratios)
        kw = {"causal": causal, "pad_mode": pad_mode}
        mult = 1
        layers: list[nn.Module] = [_Conv1d(channels, n_filters, kernel_size, **kw)]
        for ratio in reversed(ratios):
            width = mult * n_filters
            for j in range(n_residual_layers):
                layers.append(
                    SEANetResnetBlock(
                        width, kernel_size=residual_kernel_size, dilation=dilation_base**j, compress=compress, **kw
                    )
                )
            layers += [nn.ELU(), _Conv1d(width, width * 2, ratio * 2, stride=ratio, **kw)]
            mult *= 2
        if lstm:
            layers.append(_LSTM(mult * n_filters, lstm))
        layers += [nn.ELU(), _Conv1d(mult * n_filters, dimension, last_kernel_size, **kw)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != self.channels:
            raise ValueError(f"SEANetEncoder expects audio of shape [B, {self.channels}, T], got {tuple(x.shape)}")
        return self.model(x)


class SEANetDecoder(nn.Module):
    """SEANet decoder: ``[B, dimension, F] -> [B, channels, F * hop]``; unbounded output (no tanh, no output scale).

    Arguments as :class:`SEANetEncoder`; ``ratios`` are the upsampling ratios in the order they are applied.
    """

    def __init__(
        self,
        *,
        channels: int = 1,
        dimension: int = 128,
        n_filters: int = 32,
        ratios: Sequence[int] = (8, 5, 4, 2),
        n_residual_layers: int = 1,
        lstm: int = 2,
        causal: bool = False,
        kernel_size: int = 7,
        last_kernel_size: int = 7,
        residual_kernel_size: int = 3,
        dilation_base: int = 2,
        compress: int = 2,
        pad_mode: str = "reflect",
    ) -> None:
        super().__init__()
        ratios = _check_common(
            channels=channels,
            dimension=dimension,
            n_filters=n_filters,
            ratios=ratios,
            n_residual_layers=n_residual_layers,
            lstm=lstm,
            causal=causal,
            kernel_size=kernel_size,
            last_kernel_size=last_kernel_size,
            residual_kernel_size=residual_kernel_size,
            dilation_base=dilation_base,
            compress=compress,
            pad_mode=pad_mode,
        )
        self.channels, self.dimension, self.ratios = channels, dimension, ratios
        self.hop_length = math.prod(ratios)
        kw = {"causal": causal, "pad_mode": pad_mode}
        mult = 2 ** len(ratios)
        layers: list[nn.Module] = [_Conv1d(dimension, mult * n_filters, kernel_size, **kw)]
        if lstm:
            layers.append(_LSTM(mult * n_filters, lstm))
        for ratio in ratios:
            width = mult * n_filters
            layers += [nn.ELU(), _ConvTranspose1d(width, width // 2, ratio * 2, stride=ratio, causal=causal)]
            for j in range(n_residual_layers):
                layers.append(
                    SEANetResnetBlock(
                        width // 2, kernel_size=residual_kernel_size, dilation=dilation_base**j, compress=compress, **kw
                    )
                )
            mult //= 2
        layers += [nn.ELU(), _Conv1d(n_filters, channels, last_kernel_size, **kw)]
        self.model = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 3 or z.shape[1] != self.dimension:
            raise ValueError(f"SEANetDecoder expects latents of shape [B, {self.dimension}, F], got {tuple(z.shape)}")
        return self.model(z)
