"""Signal-health metrics: amplitude ratio, DC offset, peak and clipping (torchmetrics ``Metric`` classes).

Each class accumulates the sufficient statistics of :mod:`lightning_stability.metrics.functional` in float32
states that DDP reduces with ``sum`` (``max`` for the peak), so ``compute()`` on any rank returns the value over the
union of every rank's data, exactly as if one process had seen it all. Inputs may be any float dtype (bf16 and fp16
are measured in float32). Shapes: ``(..., time)``; audio ``[B, C, T]`` or latents ``[B, D, T]`` both work, the
statistics pool every element.

For SNR and SI-SNR use torchmetrics' own ``SignalNoiseRatio`` / ``ScaleInvariantSignalNoiseRatio``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_stability._checks import check_positive
from lightning_stability.metrics.functional import (
    _dc_offset_compute,
    _dc_offset_update,
    _peak_update,
    _rms_ratio_compute,
    _rms_ratio_update,
)

__all__ = ["DCOffset", "PeakAmplitude", "RMSRatio"]


class RMSRatio(Metric):
    r"""Global amplitude ratio :math:`\mathrm{RMS}(\hat y) / \mathrm{RMS}(y) = \sqrt{\sum \hat y^2 / \sum y^2}`.

    The ratio of the RMS of everything seen since the last ``reset()`` (a *global* ratio, not a mean of per-item
    ratios: a quiet item cannot dominate it, and it is the number the codec post-mortem quoted, "RMS ratio 0.166").
    1.0 means matched loudness; the collapsed codec sat at 0.17-0.28. For per-item ratios use
    :func:`~lightning_stability.metrics.functional.rms_ratio` with ``dim=-1``.

    Silent target (``RMS(y) < eps``, ``eps = finfo(float32).eps`` about ``1.2e-7``): the target RMS is floored at
    ``eps`` (so a non-silent prediction gives a large finite ratio) and a silent prediction of a silent target gives
    exactly ``1.0``. Never inf/NaN for finite inputs whose sum of squares fits in float32.

    - ``update(preds, target)``: ``(..., time)`` tensors of the same shape.
    - ``compute()``: scalar float32 tensor.

    States: ``sum_sq_preds``, ``sum_sq_target`` (float32, ``sum``), ``total`` (int64, ``sum``).
    """

    full_state_update: bool = False
    is_differentiable: bool = True
    higher_is_better: bool | None = None  # best at 1.0
    plot_lower_bound: float = 0.0

    sum_sq_preds: Tensor
    sum_sq_target: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("sum_sq_preds", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("sum_sq_target", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add the sums of squares of a batch."""
        sum_sq_p, sum_sq_t, count = _rms_ratio_update(preds, target)
        self.sum_sq_preds += sum_sq_p.to(self.sum_sq_preds.dtype)
        self.sum_sq_target += sum_sq_t.to(self.sum_sq_target.dtype)
        self.total += count

    def compute(self) -> Tensor:
        """The global RMS ratio (``1.0`` before any update: nothing seen, nothing mismatched)."""
        return _rms_ratio_compute(self.sum_sq_preds, self.sum_sq_target, self.total)


class DCOffset(Metric):
    r"""DC offset, the mean sample value :math:`\frac{1}{N}\sum_i \hat y_i` of everything seen.

    A healthy audio output has ~0; the collapsed codec had -1.38. Only ``preds`` is measured (``target`` is
    accepted and ignored, so the metric shares the ``update(preds, target)`` signature of the others).

    - ``update(preds, target=None)``: ``(..., time)``.
    - ``compute()``: scalar float32 (``0.0`` before any update).

    States: ``sum_preds`` (float32, ``sum``), ``total`` (int64, ``sum``).
    """

    full_state_update: bool = False
    is_differentiable: bool = True
    higher_is_better: bool | None = None  # best at 0.0

    sum_preds: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("sum_preds", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor | None = None) -> None:
        """Add the sum and count of a batch."""
        total, count = _dc_offset_update(preds)
        self.sum_preds += total.to(self.sum_preds.dtype)
        self.total += count

    def compute(self) -> Tensor:
        return _dc_offset_compute(self.sum_preds, self.total)


class PeakAmplitude(Metric):
    r"""Peak magnitude :math:`\max_i |\hat y_i|` and clip fraction :math:`\#\{i : |\hat y_i| \ge c\} / N`.

    The post-mortem's "output range [-2.62, 0.18]" is a peak of 2.62 against a full scale of 1.0. ``>=`` counts an
    output hard-limited to exactly ``±c`` as clipped. A NaN anywhere in ``preds`` makes the peak NaN (on purpose: it
    is the sign that the model diverged).

    Args:
        clip_level: ``c`` (> 0), default 1.0 (digital full scale).

    - ``update(preds, target=None)``: ``(..., time)`` (``target`` ignored).
    - ``compute()``: ``{"peak": scalar, "clip_fraction": scalar}`` float32 (``0.0`` and ``0.0`` before any update).

    States: ``peak`` (float32, ``max``), ``clipped`` and ``total`` (int64, ``sum``).
    """

    full_state_update: bool = False
    is_differentiable: bool = False
    higher_is_better: bool | None = None

    peak: Tensor
    clipped: Tensor
    total: Tensor

    def __init__(self, clip_level: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clip_level = check_positive("clip_level", clip_level)
        self.add_state("peak", default=torch.tensor(0.0), dist_reduce_fx="max")
        self.add_state("clipped", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor | None = None) -> None:
        peak, clipped, count = _peak_update(preds, self.clip_level)
        # torch.maximum propagates NaN, so a NaN batch is never hidden by a later finite one
        self.peak = torch.maximum(self.peak, peak.to(self.peak.dtype))
        self.clipped += clipped
        self.total += count

    def compute(self) -> dict[str, Tensor]:
        fraction = self.clipped.to(self.peak.dtype) / self.total.clamp_min(1).to(self.peak.dtype)
        return {"peak": self.peak.clone(), "clip_fraction": fraction}
