"""Argument checks of ``GradientGuard``: the error names the argument in backticks and shows the value it got."""

from __future__ import annotations

import math
from typing import Any


def check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int{' or None' if allow_none else ''}, got {value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}")


def check_positive(name: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a positive number or None, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}")


#: the default spike rule of ``GradientGuard()`` (see ``guard._policy``): an outlier is a norm above
#: ``SPIKE_RATIO`` times its running mean; it is skipped when the loss is ``LOSS_ZSCORE`` standard deviations off its
#: own running mean, clipped when it is above ``CLIP_RATIO`` times the mean without the loss, and ``REBASE_AFTER``
#: acted-upon outliers in a row are a level shift.
SPIKE_RATIO = 3.0
LOSS_ZSCORE = 6.0
CLIP_RATIO = 10.0
REBASE_AFTER = 3
#: ``zscore_rebase_after`` when ``zscore`` is given (the z-score rule of 0.2)
ZSCORE_REBASE_AFTER = 8


def resolve_rule(
    zscore: float | None,
    zscore_min_ratio: float | None,
    spike_ratio: Any,
    loss_zscore: Any,
    clip_ratio: Any,
    rebase_after: Any,
) -> tuple[float | None, float | None, float | None, int | None]:
    """``(min_ratio, loss_zscore, clip_ratio, rebase_after)`` of the policy, each ``"auto"`` resolved: the default
    rule without ``zscore``, and with ``zscore`` the z-score rule of 0.2 unchanged (no ratio floor unless
    ``zscore_min_ratio``, no loss confirmation, no clip backstop, rebase after 8)."""
    legacy = zscore is not None
    for name, value in (("spike_ratio", spike_ratio), ("loss_zscore", loss_zscore), ("clip_ratio", clip_ratio)):
        if value != "auto":
            check_positive(name, value)
    if rebase_after != "auto":
        check_int("zscore_rebase_after", rebase_after, 2, allow_none=True)
    for name, value in (("spike_ratio", spike_ratio), ("clip_ratio", clip_ratio)):
        if value not in ("auto", None) and value <= 1:
            raise ValueError(f"`{name}` must be > 1 (a multiple of the gradient norm's running mean), got {value!r}")
    if spike_ratio not in ("auto", None) and zscore_min_ratio is not None:
        raise ValueError(
            f"`spike_ratio` and `zscore_min_ratio` set the same floor of the spike threshold: pass one, got"
            f" spike_ratio={spike_ratio!r} and zscore_min_ratio={zscore_min_ratio!r}"
        )
    if spike_ratio == "auto":
        spike_ratio = None if legacy else SPIKE_RATIO
    min_ratio = zscore_min_ratio if spike_ratio is None else float(spike_ratio)
    detects = zscore is not None or min_ratio is not None
    if loss_zscore == "auto":
        loss_zscore = LOSS_ZSCORE if detects and not legacy else None
    if clip_ratio == "auto":
        clip_ratio = CLIP_RATIO if loss_zscore is not None else None
    if rebase_after == "auto":
        rebase_after = ZSCORE_REBASE_AFTER if legacy else REBASE_AFTER
    if not detects and (loss_zscore is not None or clip_ratio is not None):
        raise ValueError(
            "`loss_zscore` and `clip_ratio` refine the spike threshold, which needs `spike_ratio` or `zscore`; got"
            f" spike_ratio=None, zscore=None, loss_zscore={loss_zscore!r}, clip_ratio={clip_ratio!r}"
        )
    if clip_ratio is not None and loss_zscore is None:
        raise ValueError(
            f"`clip_ratio` clips the outliers the loss does not confirm: it needs `loss_zscore`, got clip_ratio="
            f"{clip_ratio!r} and loss_zscore=None"
        )
    as_float = lambda v: None if v is None else float(v)  # noqa: E731
    return as_float(min_ratio), as_float(loss_zscore), as_float(clip_ratio), rebase_after
