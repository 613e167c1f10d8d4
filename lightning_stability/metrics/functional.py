"""Functional forms of the signal-health metrics (the per-call computation; the ``Metric`` classes accumulate it).

Every function computes in float32 (float64 when given float64), whatever the input dtype, so bf16/fp16 model
outputs are measured without their rounding. Shapes: signals are ``(..., time)``; with ``dim=None`` a function
reduces over every element (one scalar, the value the ``Metric`` class reports for a single batch), with ``dim=-1``
it returns one value per series, shape ``(...)``.

Each metric is written as a pair, torchmetrics style:

- ``_<name>_update(...)`` returns the *sufficient statistics* of a batch (sums, counts, maxima) that a ``Metric``
  adds to its states, so that accumulating batches, or reducing states across DDP ranks, gives exactly the value
  over the union of the data;
- ``_<name>_compute(...)`` turns statistics into the value.

Silence: the RMS of a series is "silent" when it is below ``eps = torch.finfo(compute_dtype).eps`` (about
``1.2e-7`` = -138 dBFS for float32). :func:`rms_ratio` never divides by a silent RMS (see there).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_stability._checks import check_bool, check_int, check_positive

__all__ = [
    "clip_fraction",
    "codebook_histogram",
    "codebook_perplexity",
    "codebook_usage",
    "dc_offset",
    "dead_code_fraction",
    "peak_amplitude",
    "rms",
    "rms_ratio",
]


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, fp32, integers) is measured in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as_float(x: Tensor) -> Tensor:
    return x.to(_compute_dtype(x))


def _check_signal(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 0:
        raise ValueError(f"`{name}` must have a time dimension (shape `(..., time)`), got a 0-dim tensor")
    if x.is_complex():
        raise TypeError(f"`{name}` must be real, got dtype {x.dtype}")


def _check_pair(preds: Tensor, target: Tensor) -> None:
    _check_signal(preds, "preds")
    _check_signal(target, "target")
    if preds.shape != target.shape:
        raise ValueError(
            f"`preds` and `target` must have the same shape, got preds {tuple(preds.shape)} "
            f"and target {tuple(target.shape)}"
        )


def _reduce_dims(x: Tensor, dim: int | None) -> tuple[int, ...]:
    if check_int("dim", dim, allow_none=True) is None:
        return tuple(range(x.ndim))
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"`dim` must be None or a dim of the input (shape {tuple(x.shape)}), got {dim!r}")
    return (dim,)


def _sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0`` with the gradient at ``x = 0`` taken as 0 (``torch.sqrt``'s is ``inf``, which becomes
    NaN once multiplied by the 0 of ``d(x^2)/dx`` on silence). The value is ``torch.sqrt``'s exactly (NaN stays NaN:
    ``x * 0``)."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), x * 0)


# --------------------------------------------------------------------------------------------------------- RMS ratio
def rms(x: Tensor, dim: int | None = -1) -> Tensor:
    r"""Root mean square :math:`\sqrt{\frac{1}{N}\sum_i x_i^2}` over ``dim`` (every element with ``dim=None``).

    Args:
        x: ``(..., time)``.
        dim: the dimension to reduce, or ``None`` for all.

    Returns:
        ``(...)`` with ``dim=-1``, a scalar with ``dim=None``; float32 (float64 for float64 input).
    """
    _check_signal(x, "x")
    x = _as_float(x)
    return _sqrt(x.square().mean(dim=_reduce_dims(x, dim)))


def _rms_ratio_update(preds: Tensor, target: Tensor, dim: int | None = None) -> tuple[Tensor, Tensor, int]:
    """Sums of squares of ``preds`` and ``target`` and the number of elements summed per value."""
    _check_pair(preds, target)
    preds, target = _as_float(preds), _as_float(target)
    dims = _reduce_dims(preds, dim)
    count = math.prod(preds.shape[d] for d in dims)
    return preds.square().sum(dim=dims), target.square().sum(dim=dims), count


def _rms_ratio_compute(sum_sq_preds: Tensor, sum_sq_target: Tensor, count: int | Tensor) -> Tensor:
    r"""``rms_p / rms_t`` with the silent cases defined (``eps = finfo(dtype).eps``).

    - target not silent (``rms_t >= eps``): ``rms_p / rms_t``;
    - target silent, prediction silent: ``1.0`` (silence reproduced: the amplitudes match);
    - target silent, prediction not: ``rms_p / eps`` (large and finite: the output has energy the target lacks).
    """
    count = torch.as_tensor(count, dtype=sum_sq_preds.dtype, device=sum_sq_preds.device).clamp_min(1)
    eps = torch.finfo(sum_sq_preds.dtype).eps
    rms_p = _sqrt(sum_sq_preds / count)
    rms_t = _sqrt(sum_sq_target / count)
    ratio = rms_p / rms_t.clamp_min(eps)
    return torch.where((rms_t < eps) & (rms_p < eps), torch.ones_like(ratio), ratio)


def rms_ratio(preds: Tensor, target: Tensor, dim: int | None = None) -> Tensor:
    r"""Amplitude ratio :math:`\mathrm{RMS}(\hat y) / \mathrm{RMS}(y)` (1.0 = matched loudness).

    With ``dim=None`` (default) the ratio is *global*: both RMS values are taken over every element of the batch,
    :math:`\sqrt{\sum \hat y^2 / \sum y^2}`, so loud items weigh more than quiet ones. This is the number the
    codec post-mortem quoted ("RMS ratio 0.166") and what :class:`~lightning_stability.metrics.RMSRatio` accumulates.
    With ``dim=-1`` it is one ratio per series, shape ``(...)``.

    Silent targets do not produce inf/NaN: below ``eps = finfo(float32).eps`` the target RMS is floored at ``eps``,
    and a silent prediction of a silent target scores exactly ``1.0``.

    Args:
        preds: ``(..., time)`` reconstruction (any float dtype; measured in float32).
        target: ``(..., time)`` reference, same shape.
        dim: ``None`` for the global ratio, ``-1`` for one ratio per series.
    """
    return _rms_ratio_compute(*_rms_ratio_update(preds, target, dim))


# --------------------------------------------------------------------------------------------------------- DC offset
def _dc_offset_update(preds: Tensor, dim: int | None = None) -> tuple[Tensor, int]:
    _check_signal(preds, "preds")
    preds = _as_float(preds)
    dims = _reduce_dims(preds, dim)
    return preds.sum(dim=dims), math.prod(preds.shape[d] for d in dims)


def _dc_offset_compute(total: Tensor, count: int | Tensor) -> Tensor:
    """Mean; ``0.0`` when nothing was seen (``count == 0``)."""
    count = torch.as_tensor(count, dtype=total.dtype, device=total.device)
    return total / count.clamp_min(1)


def dc_offset(preds: Tensor, dim: int | None = None) -> Tensor:
    r"""DC offset: the mean sample value :math:`\frac{1}{N}\sum_i \hat y_i` (0 for a healthy audio output).

    Args:
        preds: ``(..., time)``.
        dim: ``None`` for the mean over every element, ``-1`` for one mean per series ``(...)``.
    """
    return _dc_offset_compute(*_dc_offset_update(preds, dim))


# ---------------------------------------------------------------------------------------------------- peak and clips
def _peak_update(preds: Tensor, clip_level: float, dim: int | None = None) -> tuple[Tensor, Tensor, int]:
    """Peak ``max |x|``, number of samples with ``|x| >= clip_level``, and the number of samples."""
    _check_signal(preds, "preds")
    magnitude = _as_float(preds).abs()
    dims = _reduce_dims(magnitude, dim)
    peak = magnitude.amax(dim=dims) if magnitude.numel() else magnitude.new_zeros(())
    clipped = (magnitude >= clip_level).sum(dim=dims)
    return peak, clipped, math.prod(magnitude.shape[d] for d in dims)


def peak_amplitude(preds: Tensor, dim: int | None = None) -> Tensor:
    r"""Peak magnitude :math:`\max_i |\hat y_i|` over ``dim`` (every element with ``dim=None``).

    Args:
        preds: ``(..., time)``.
        dim: ``None`` or ``-1`` (one peak per series).
    """
    return _peak_update(preds, math.inf, dim)[0]


def clip_fraction(preds: Tensor, clip_level: float = 1.0, dim: int | None = None) -> Tensor:
    r"""Fraction of samples at or beyond the clip level, :math:`\frac{1}{N}\#\{i : |\hat y_i| \ge c\}`.

    ``>=`` so that an output hard-limited to exactly ``±c`` (``clamp(-1, 1)``) counts as clipped.

    Args:
        preds: ``(..., time)``.
        clip_level: ``c`` (> 0); 1.0 is digital full scale.
        dim: ``None`` or ``-1`` (one fraction per series).
    """
    clip_level = check_positive("clip_level", clip_level)
    _, clipped, count = _peak_update(preds, clip_level, dim)
    return clipped.to(_compute_dtype(preds)) / max(count, 1)


# ---------------------------------------------------------------------------------------------------- codebook usage
def _check_codes(codes: Tensor, num_codebooks: int | None, codebook_size: int, *, validate: bool = True) -> None:
    if not isinstance(codes, Tensor):
        raise TypeError(f"`codes` must be a torch.Tensor, got {type(codes).__name__}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"`codes` must be an integer tensor `[B, n_q, T]`, got dtype {codes.dtype}")
    if codes.ndim != 3:
        raise ValueError(f"`codes` must have shape `[B, n_q, T]`, got {tuple(codes.shape)}")
    if num_codebooks is not None and codes.shape[1] != num_codebooks:
        raise ValueError(
            f"`codes` has {codes.shape[1]} quantizer stages (shape {tuple(codes.shape)}), expected "
            f"`num_codebooks`={num_codebooks}"
        )
    if validate and codes.numel():
        low, high = int(codes.min()), int(codes.max())  # one host sync; skipped with validate=False
        if low < 0 or high >= codebook_size:
            raise ValueError(
                f"`codes` must lie in [0, {codebook_size - 1}] (`codebook_size`={codebook_size}), "
                f"got values in [{low}, {high}]"
            )


def codebook_histogram(
    codes: Tensor, codebook_size: int, num_codebooks: int | None = None, *, validate: bool = True
) -> Tensor:
    """Code counts per quantizer stage.

    Args:
        codes: ``[B, n_q, T]`` integer code indices in ``[0, codebook_size)``.
        codebook_size: ``K``, the number of codes per stage.
        num_codebooks: expected ``n_q`` (checked when given).
        validate: check the value range (one host sync). Out-of-range codes are otherwise an indexing error.

    Returns:
        ``[n_q, K]`` int64 counts.
    """
    codebook_size = check_int("codebook_size", codebook_size, 1)
    num_codebooks = check_int("num_codebooks", num_codebooks, 1, allow_none=True)
    _check_codes(codes, num_codebooks, codebook_size, validate=check_bool("validate", validate))
    n_q = codes.shape[1]
    flat = codes.transpose(0, 1).reshape(n_q, -1).long()  # [n_q, B*T]
    hist = torch.zeros(n_q, codebook_size, dtype=torch.long, device=codes.device)
    return hist.scatter_add_(1, flat, torch.ones_like(flat))


def codebook_perplexity(histogram: Tensor) -> Tensor:
    r"""Perplexity :math:`\exp(H)`, :math:`H = -\sum_k p_k \log p_k`, :math:`p_k = n_k / \sum n`, per stage.

    Ranges from 1 (one code used) to ``K`` (uniform use of all codes). A stage that saw no codes scores ``0.0``.

    Args:
        histogram: ``[n_q, K]`` counts (``[K]`` for one stage).

    Returns:
        ``[n_q]`` (or a scalar) float32.
    """
    counts = histogram.to(torch.float64)  # exact for counts up to 2**53
    total = counts.sum(dim=-1, keepdim=True)
    p = counts / total.clamp_min(1)
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)  # xlogy(0, 0) = 0
    return torch.where(total.squeeze(-1) > 0, entropy.exp(), torch.zeros_like(entropy)).float()


def dead_code_fraction(histogram: Tensor) -> Tensor:
    """Fraction of codes never used in the accumulated window, per stage (1.0 for a stage that saw nothing).

    Args:
        histogram: ``[n_q, K]`` counts (``[K]`` for one stage).
    """
    return (histogram == 0).float().mean(dim=-1)


def codebook_usage(codes: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    """Perplexity and dead-code fraction per stage of one batch of codes ``[B, n_q, T]``; each ``[n_q]``."""
    hist = codebook_histogram(codes, codebook_size)
    return codebook_perplexity(hist), dead_code_fraction(hist)
