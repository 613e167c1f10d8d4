"""Speech-quality metrics (torchmetrics ``Metric`` classes): wide-band PESQ, STOI and the loudness error.

Each class scores every series of a batch with the functional form in :mod:`lightning_stability.metrics.perceptual`
and accumulates sufficient statistics that DDP reduces with ``sum``: the sum of the scores, the number of scored
series and the number of skipped ones. ``compute()`` on any rank is then the mean over every scored series of every
rank, exactly as one process would get; ``skipped`` after a ``compute()`` (or ``sync``) is the global count.

A series the measure cannot score (PESQ: silent or non-finite signals, under 0.25 s, no utterance found; STOI:
silent target, under ~0.4 s of speech; loudness: under one 400 ms block, target below the -70 LUFS gate) is
*skipped and counted*, never raised: one silent validation clip must not crash an epoch. ``last_skip_reason``
holds this process's first reason since the last reset (for a log message); ``compute()`` is NaN when nothing was
scored. The scores are computed on the CPU (the inputs are copied there); the states live on the metric's device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_stability._checks import check_bool, check_int
from lightning_stability.metrics.perceptual import (
    _check_inputs,
    _loudness_error_one,
    _pesq_one,
    _quality_update,
    _require,
    _stoi_one,
)

__all__ = [
    "QUALITY_METRICS",
    "STOI",
    "LoudnessError",
    "WidebandPESQ",
    "build_quality_metrics",
    "resolve_quality_metrics",
    "summarize",
]


class _MeanScore(Metric):
    """Mean of a per-series score with a skip count (``sum``, ``count``, ``skipped``: all ``sum``-reduced)."""

    full_state_update: bool = False
    is_differentiable: bool = False
    _metric_name = ""

    total: Tensor
    count: Tensor
    skipped: Tensor

    def __init__(self, sample_rate: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sample_rate = check_int("sample_rate", sample_rate, 1)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("skipped", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.last_skip_reason: str | None = None

    def _score(self, pred: Tensor, target: Tensor) -> float | str:
        raise NotImplementedError

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Score every series of ``preds``/``target`` ``(..., time)``; unscorable series are counted as skipped."""
        _check_inputs(preds, target, self.sample_rate, "raise")
        total, count, skipped, reason = _quality_update(self._metric_name, preds, target, self._score)
        # new tensors, not in-place: under CPU ``ddp_spawn`` the pickled states share storage across the ranks
        self.total = self.total + total
        self.count = self.count + count
        self.skipped = self.skipped + skipped
        if reason is not None and self.last_skip_reason is None:
            self.last_skip_reason = reason

    def compute(self) -> Tensor:
        """Mean score over the scored series (float32; NaN when none was scored)."""
        if int(self.count) == 0:
            return torch.tensor(math.nan, dtype=torch.float32, device=self.total.device)
        return (self.total / self.count).to(torch.float32)

    def reset(self) -> None:
        super().reset()
        self.last_skip_reason = None


class WidebandPESQ(_MeanScore):
    """Mean wide-band PESQ (ITU-T P.862.2, MOS-LQO, about 1.0 to 4.64) over the series seen, by the ``pesq`` package.

    Both signals are resampled from ``sample_rate`` to 16 kHz first, as P.862.2 requires (see
    :func:`~lightning_stability.metrics.perceptual.wideband_pesq`). Cost: about 18 ms of CPU per second of audio.

    - ``update(preds, target)``: ``(..., time)`` tensors of the same shape at ``sample_rate``.
    - ``compute()``: scalar float32, NaN before any scored series. ``skipped``: series PESQ could not score.

    Raises:
        ModuleNotFoundError: at construction, when ``pesq`` is not installed.
    """

    higher_is_better = True
    plot_lower_bound = 1.0
    plot_upper_bound = 4.64
    _metric_name = "PESQ"

    def __init__(self, sample_rate: int, **kwargs: Any) -> None:
        _require("pesq", "WidebandPESQ")
        super().__init__(sample_rate, **kwargs)

    def _score(self, pred: Tensor, target: Tensor) -> float | str:
        return _pesq_one(pred, target, self.sample_rate)


class STOI(_MeanScore):
    """Mean STOI (Taal et al. 2011; ESTOI with ``extended=True``) over the series seen, by ``pystoi``.

    The signals go in at ``sample_rate``; pystoi resamples to its native 10 kHz and removes silent frames (see
    :func:`~lightning_stability.metrics.perceptual.stoi`). Cost: about 6 ms of CPU per second of audio.

    Raises:
        ModuleNotFoundError: at construction, when ``pystoi`` is not installed.
    """

    higher_is_better = True
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0
    _metric_name = "STOI"

    def __init__(self, sample_rate: int, *, extended: bool = False, **kwargs: Any) -> None:
        _require("pystoi", "STOI")
        super().__init__(sample_rate, **kwargs)
        self.extended = check_bool("extended", extended)

    def _score(self, pred: Tensor, target: Tensor) -> float | str:
        return _stoi_one(pred, target, self.sample_rate, self.extended)


class LoudnessError(_MeanScore):
    """Mean loudness error in LU: ``|L(preds) - L(target)|`` (default) or the signed ``L(preds) - L(target)``.

    ``L`` is the ITU-R BS.1770-4 integrated loudness from ``pyloudnorm`` (see
    :func:`~lightning_stability.metrics.perceptual.loudness_error`); a prediction below the -70 LUFS gate counts as
    -70 LUFS. 0 is best; a signal against itself at -6 dB scores 6.0 (signed: -6.0).

    Raises:
        ModuleNotFoundError: at construction, when ``pyloudnorm`` is not installed.
    """

    higher_is_better = False
    plot_lower_bound = 0.0
    _metric_name = "loudness error"

    def __init__(self, sample_rate: int, *, signed: bool = False, **kwargs: Any) -> None:
        _require("pyloudnorm", "LoudnessError")
        super().__init__(sample_rate, **kwargs)
        # signed: best at 0, negative = quieter (``higher_is_better`` stays False)
        self.signed = check_bool("signed", signed)

    def _score(self, pred: Tensor, target: Tensor) -> float | str:
        return _loudness_error_one(pred, target, self.sample_rate, self.signed)


# ------------------------------------------------------------------------------------------- module integration
#: The speech-quality metrics a module can ask for by name, with the package each needs and its log name.
QUALITY_METRICS: dict[str, tuple[str, str]] = {
    "pesq": ("pesq", "pesq"),
    "stoi": ("pystoi", "stoi"),
    "loudness": ("pyloudnorm", "loudness_error_lu"),
}


def _importable(package: str) -> bool:
    try:
        __import__(package)
    except ImportError:
        return False
    return True


def resolve_quality_metrics(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """The metric names a ``quality_metrics`` argument asks for.

    ``"auto"``: every one of ``("pesq", "stoi", "loudness")`` whose package imports (so the default never fails on a
    machine without the ``metrics`` extra); ``None`` or ``()``: none; a sequence of names: exactly those (a missing
    package then raises ``ModuleNotFoundError`` when the metric is built).

    Raises:
        ValueError / TypeError: an unknown name or a value of the wrong type (the message lists the known names).
    """
    if spec is None:
        return ()
    known = list(QUALITY_METRICS)
    if isinstance(spec, str):
        if spec == "auto":
            return tuple(name for name, (package, _) in QUALITY_METRICS.items() if _importable(package))
        raise ValueError(f"`quality_metrics` must be 'auto', None or a sequence of {known}, got {spec!r}")
    if not isinstance(spec, Sequence) or not all(isinstance(n, str) for n in spec):
        raise TypeError(f"`quality_metrics` must be 'auto', None or a sequence of {known}, got {spec!r}")
    unknown = [n for n in spec if n not in QUALITY_METRICS]
    if unknown:
        raise ValueError(f"`quality_metrics` names unknown metrics {unknown}; known: {known}")
    return tuple(dict.fromkeys(spec))


def build_quality_metrics(names: Sequence[str], sample_rate: int) -> dict[str, _MeanScore]:
    """``{log name: metric}`` for ``names`` (see :func:`resolve_quality_metrics`), e.g. ``{"pesq": WidebandPESQ}``."""
    makers = {"pesq": WidebandPESQ, "stoi": STOI, "loudness": LoudnessError}
    return {QUALITY_METRICS[name][1]: makers[name](sample_rate) for name in names}


def summarize(metric: _MeanScore) -> tuple[Tensor, int, int]:
    """``(mean, scored, skipped)`` over every rank (a collective call under DDP: every rank must make it)."""
    with metric.sync_context():
        count, skipped = int(metric.count), int(metric.skipped)
        mean = (metric.total / max(count, 1)).to(torch.float32) if count else torch.tensor(math.nan)
    return mean, count, skipped
