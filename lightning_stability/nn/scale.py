"""Amplitude control for audio and latent outputs: a clamped RMS-matching layer and EnCodec's normalisation pair.

Two tools, both plain torch:

- :class:`ClampedRMSScale` rescales a model output so its RMS matches a reference, with the factor clamped to
  ``[min_scale, max_scale]`` (``docs/design.md``, post-mortem 3: the cascade transformer's last stage, clamp [0.7,
  1.5]). The clamp is
  what keeps the layer from hiding a collapsing residual path: an output whose RMS has fallen far below the target
  gets at most ``max_scale``, so the loss still sees (and the gradient still fixes) the collapse, and
  ``ScaleFactorClamp`` warns when the factor sits near the ceiling.
- :func:`normalize` / :func:`denormalize`: EnCodec's per-segment RMS normalisation (audiocraft
  ``EncodecModel.preprocess`` / ``postprocess``). The encoder sees ``x / scale``, ``scale`` travels with the codes
  and the decoder's output is multiplied back by it (``docs/design.md``, post-mortem 2: the unbounded decoder).

Every RMS is computed in fp32 with autocast disabled, whatever the input dtype, and is guarded against silent input
(RMS 0 never produces ``inf`` or ``NaN``, in the forward or the backward pass).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_stability._checks import check_bool, check_positive

__all__ = ["ClampedRMSScale", "denormalize", "normalize"]


def _rms(x: Tensor, dims: Sequence[int]) -> Tensor:
    """fp32 root mean square of ``x`` over ``dims`` (kept as size-1 dims).

    Written as ``||x||_2 / sqrt(n)`` because ``torch.linalg.vector_norm`` has a zero subgradient at 0, whereas
    ``x.pow(2).mean().sqrt()`` back-propagates ``0 * inf = NaN`` through an all-zero input.
    """
    dims = tuple(dims)
    n = 1
    for d in dims:  # a plain loop, which torch.compile traces without a graph break
        n *= x.shape[d]
    with torch.autocast(device_type=x.device.type, enabled=False):
        return torch.linalg.vector_norm(x.float(), ord=2, dim=dims, keepdim=True) / math.sqrt(max(n, 1))


def _check_bounds(min_scale: float, max_scale: float) -> tuple[float, float]:
    min_scale = check_positive("min_scale", min_scale, noun="a float")
    max_scale = check_positive("max_scale", max_scale, noun="a float")
    if min_scale > max_scale:
        raise ValueError(f"`min_scale` must be <= `max_scale`, got min_scale={min_scale!r} > max_scale={max_scale!r}")
    return min_scale, max_scale


class ClampedRMSScale(nn.Module):
    r"""Scale an output so its RMS matches a reference, with the factor clamped.

    For an output ``x`` of shape ``[B, ...]`` and a reference,

    .. math::

        s = \operatorname{clamp}\!\left(\frac{\mathrm{rms}(\text{reference})}{\mathrm{rms}(x) + \epsilon},
            s_{\min}, s_{\max}\right), \qquad y = s \cdot x

    where ``rms`` is taken per item over every non-batch dim (``s`` has shape ``[B, 1, ..., 1]``), or, with
    ``per_frame=True`` and ``[B, C, T]`` inputs, per item and per time step over the channel dim (``s`` has shape
    ``[B, 1, T]``). The RMS values and ``s`` are computed in fp32 with autocast disabled; ``y`` has ``x``'s dtype.

    Silent output (``rms(x) = 0``) gives ``s = s_max`` (the ratio is ``target / eps``, then clamped), silent
    reference gives ``s = s_min``; neither produces ``inf`` or ``NaN``, forward or backward.

    Args:
        min_scale: lower clamp bound (> 0). The cascade uses 0.7.
        max_scale: upper clamp bound (>= ``min_scale``). The cascade uses 1.5. Both bounds can be changed at run
            time (``layer.min_scale = ...`` or :meth:`set_bounds`); ``ScaleFactorClamp`` does so.
        per_frame: one factor per time step (RMS over channels) instead of one per item. Needs ``[B, C, T]`` inputs.
        detach_scale: whether ``s`` is treated as a constant in the backward pass.

            - ``False`` (default): the gradient flows through ``s`` into ``x`` and into the reference. Inside the
              clamp range ``y`` is invariant to the overall amplitude of ``x`` (``y = x * target / rms(x)``), so the
              gradient has no component along ``x``: the upstream network receives no signal about amplitude at
              all, only about shape. When ``s`` is clamped its gradient is 0 and ``y = s_{min|max} * x``.
            - ``True``: ``dy/dx = s`` (a constant per item). The upstream network is still told when its output is
              too loud or too quiet, so it learns to produce the right amplitude itself and the factor drifts back
              towards 1; nothing flows into the reference. Use this when the factor should be a temporary
              correction rather than a permanent part of the model.
        eps: added to ``rms(x)`` in the denominator (> 0).

    Attributes:
        last_scale: the factors ``s`` of the last forward (fp32, detached; a buffer that is not saved in the
            ``state_dict``; empty before the first call).
        last_clamped_fraction: 0-dim fp32 tensor, fraction of the factors of the last forward that were clamped.
        last_raw_scale: the factors before clamping (fp32, detached), to see how far outside the range they were.

    Reading these attributes does not synchronise the device; calling ``float()`` / ``.item()`` on them does.

    Example::

        >>> layer = ClampedRMSScale(0.7, 1.5)
        >>> x, target = torch.randn(2, 128, 50), 5.7 * torch.randn(2, 128, 50)
        >>> y = layer(x, target)  # rms(y) ~ 1.5 * rms(x): the ratio (~5.7) was clamped
        >>> layer.last_clamped_fraction.item()
        1.0
    """

    last_scale: Tensor
    last_raw_scale: Tensor
    last_clamped_fraction: Tensor

    def __init__(
        self,
        min_scale: float = 0.7,
        max_scale: float = 1.5,
        *,
        per_frame: bool = False,
        detach_scale: bool = False,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self._min_scale, self._max_scale = _check_bounds(min_scale, max_scale)
        self.per_frame = check_bool("per_frame", per_frame)
        self.detach_scale = check_bool("detach_scale", detach_scale)
        self.eps = check_positive("eps", eps)
        self.register_buffer("last_scale", torch.empty(0), persistent=False)
        self.register_buffer("last_raw_scale", torch.empty(0), persistent=False)
        self.register_buffer("last_clamped_fraction", torch.zeros(()), persistent=False)

    # -- bounds ------------------------------------------------------------------------------------------------------
    @property
    def min_scale(self) -> float:
        return self._min_scale

    @min_scale.setter
    def min_scale(self, value: float) -> None:
        self._min_scale, _ = _check_bounds(value, self._max_scale)

    @property
    def max_scale(self) -> float:
        return self._max_scale

    @max_scale.setter
    def max_scale(self, value: float) -> None:
        _, self._max_scale = _check_bounds(self._min_scale, value)

    def set_bounds(self, min_scale: float, max_scale: float) -> None:
        """Set both clamp bounds at once (validated together, so a range can be moved past the old one)."""
        self._min_scale, self._max_scale = _check_bounds(min_scale, max_scale)

    def extra_repr(self) -> str:
        return (
            f"min_scale={self._min_scale}, max_scale={self._max_scale}, per_frame={self.per_frame}, "
            f"detach_scale={self.detach_scale}, eps={self.eps}"
        )

    # -- forward -----------------------------------------------------------------------------------------------------
    def _rms_dims(self, x: Tensor) -> tuple[int, ...]:
        if self.per_frame:
            if x.ndim != 3:
                raise ValueError(
                    f"`per_frame=True` needs `x` of shape [B, C, T], got shape {tuple(x.shape)} ({x.ndim} dims)"
                )
            return (1,)
        if x.ndim < 2:
            raise ValueError(f"`x` must have a batch dim and at least one more, got shape {tuple(x.shape)}")
        return tuple(range(1, x.ndim))

    def _target_rms(self, x: Tensor, reference: Tensor | float, dims: tuple[int, ...]) -> Tensor:
        if not torch.is_tensor(reference):
            if isinstance(reference, bool) or not isinstance(reference, (int, float)):
                raise TypeError(
                    f"`reference` must be a tensor or a float target RMS, got {type(reference).__name__}: {reference!r}"
                )
            return torch.full((), float(reference), device=x.device, dtype=torch.float32)
        if reference.shape == x.shape:  # a signal: take its RMS over the same dims
            return _rms(reference, dims)
        rms_shape = tuple(1 if d in dims else s for d, s in enumerate(x.shape))
        try:
            broadcast = torch.broadcast_shapes(reference.shape, rms_shape)
        except RuntimeError:
            broadcast = None
        if broadcast != rms_shape:
            raise ValueError(
                f"`reference` must have the shape of `x` {tuple(x.shape)} (a signal) or be a target RMS broadcastable "
                f"to {rms_shape}, got shape {tuple(reference.shape)}"
            )
        return reference.float()

    def forward(self, x: Tensor, reference: Tensor | float) -> Tensor:
        """Return ``x`` rescaled towards the RMS of ``reference``.

        Args:
            x: the output to rescale, ``[B, ...]`` (``[B, C, T]`` with ``per_frame``), floating point.
            reference: either a signal of the same shape as ``x`` (its RMS is taken over the same dims), or a
                precomputed target RMS broadcastable to the per-item RMS shape ``[B, 1, ..., 1]`` (``[B, 1, T]``
                with ``per_frame``), or a Python float.

        Returns:
            ``s * x`` in ``x``'s dtype.
        """
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"`x` must be a floating-point tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
        dims = self._rms_dims(x)
        target = self._target_rms(x, reference, dims)
        with torch.autocast(device_type=x.device.type, enabled=False):
            raw = target / (_rms(x, dims) + self.eps)
            scale = raw.clamp(self._min_scale, self._max_scale)
            if self.detach_scale:
                scale = scale.detach()
            raw = raw.detach()
            self.last_raw_scale = raw
            self.last_scale = scale.detach()
            self.last_clamped_fraction = ((raw < self._min_scale) | (raw > self._max_scale)).float().mean()
            return x * scale.to(x.dtype)


def normalize(x: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    r"""EnCodec's per-segment RMS normalisation: ``(x / scale, scale)``.

    ``scale = rms(x) + eps`` per item, over every non-batch dim (``[B, C, T]`` -> ``scale`` of shape ``[B, 1, 1]``),
    computed in fp32 with autocast disabled; ``x / scale`` keeps ``x``'s dtype and ``scale`` is fp32. Silent input
    gives ``scale = eps`` and ``x / scale = 0``: never ``inf`` or ``NaN``, forward or backward.

    audiocraft (``EncodecModel.preprocess``) takes the RMS of the mono downmix, ``x.mean(dim=1)``; here it is taken
    over all channels, which is the same for mono audio and, for multi-channel audio, keeps out-of-phase channels
    (whose downmix is silent) from being divided by ``eps``.

    Args:
        x: ``[B, ...]`` floating-point signal (typically audio ``[B, C, T]``).
        eps: floor added to the RMS (> 0).

    Returns:
        ``(x / scale, scale)``; :func:`denormalize` inverts it.
    """
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"`x` must be a floating-point tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
    if x.ndim < 2:
        raise ValueError(f"`x` must have a batch dim and at least one more, got shape {tuple(x.shape)}")
    scale = _rms(x, range(1, x.ndim)) + check_positive("eps", eps)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return (x.float() / scale).to(x.dtype), scale


def denormalize(y: Tensor, scale: Tensor) -> Tensor:
    """Undo :func:`normalize`: ``y * scale`` (in ``y``'s dtype).

    Args:
        y: ``[B, ...]`` signal, e.g. the decoder's output.
        scale: the ``scale`` returned by :func:`normalize` (``[B, 1, ..., 1]``), or anything broadcastable to ``y``.
    """
    if not torch.is_tensor(y) or not y.is_floating_point():
        raise TypeError(f"`y` must be a floating-point tensor, got {type(y).__name__} {getattr(y, 'dtype', '')}")
    if not torch.is_tensor(scale):
        raise TypeError(f"`scale` must be a tensor (the one `normalize` returned), got {type(scale).__name__}")
    try:
        broadcast = torch.broadcast_shapes(scale.shape, y.shape)
    except RuntimeError:
        broadcast = None
    if broadcast != y.shape:
        raise ValueError(f"`scale` of shape {tuple(scale.shape)} does not broadcast to `y` of shape {tuple(y.shape)}")
    with torch.autocast(device_type=y.device.type, enabled=False):
        return (y.float() * scale.float()).to(y.dtype)
