"""Argument checks of ``GradientGuard`` (with ``lightning_stability._checks``: a ``TypeError`` for a wrong type, a
``ValueError`` for a wrong value, the argument named in backticks with the value received)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_stability._checks import check_bool, check_choice, check_int, check_number, check_positive

#: the default spike rule of ``GradientGuard()`` (see ``guard._policy``): an outlier is a norm above
#: ``SPIKE_RATIO`` times its running mean; it is skipped when the loss is ``LOSS_ZSCORE`` standard deviations off its
#: own running mean, clipped when it is above ``CLIP_RATIO`` times the mean without the loss, and ``REBASE_AFTER``
#: acted-upon outliers in a row are a level shift.
SPIKE_RATIO = 3.0
LOSS_ZSCORE = 6.0
CLIP_RATIO = 10.0
REBASE_AFTER = 3
#: ``zscore_rebase_after`` when ``zscore`` is given (the earlier z-score rule)
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
    rule without ``zscore``, and with ``zscore`` the earlier z-score rule unchanged (no ratio floor unless
    ``zscore_min_ratio``, no loss confirmation, no clip backstop, rebase after 8)."""
    legacy = zscore is not None
    for name, value in (("spike_ratio", spike_ratio), ("loss_zscore", loss_zscore), ("clip_ratio", clip_ratio)):
        if value != "auto":
            check_positive(name, value, allow_none=True, noun="a positive number")
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


_ON_PERSISTENT = ("rollback", "stop", "raise")
_SPIKE_ACTIONS = ("skip", "clip")
_SNAPSHOT_DEVICES = ("cpu", "same")
_QUARANTINE = ("rollback", "skipped", "off")


def check_arguments(
    *,
    max_norm: Any,
    zscore: Any,
    zscore_alpha: Any,
    zscore_warmup: Any,
    zscore_rebase_after: Any,
    zscore_min_ratio: Any,
    spike_ratio: Any,
    loss_zscore: Any,
    clip_ratio: Any,
    track_first_moment: Any,
    first_moment_zscore: Any,
    spike_action: Any,
    max_consecutive_skips: Any,
    max_consecutive_amp_overflows: Any,
    on_persistent: Any,
    snapshot_every: Any,
    snapshot_device: Any,
    skip_batches_after_rollback: Any,
    max_rollbacks: Any,
    sync_free: Any,
    protect_buffers: Any,
    log_every_n_steps: Any,
    warn_every_n_steps: Any,
    diagnose_top_k: Any,
    agree_across_ranks: Any,
    pause_schedulers_on_skip: Any,
    quarantine: Any = "rollback",
) -> tuple[float | None, float | None, float | None, int | None]:
    """Check every argument of ``GradientGuard``; returns the resolved rule (see :func:`resolve_rule`)."""
    check_positive("max_norm", max_norm, allow_none=True, noun="a positive number")
    check_positive("zscore", zscore, allow_none=True, noun="a positive number")
    if check_number("zscore_alpha", zscore_alpha) >= 1.0 or zscore_alpha <= 0.0:
        raise ValueError(f"`zscore_alpha` must be in (0, 1), got {zscore_alpha!r}")
    check_int("zscore_warmup", zscore_warmup, 1)
    check_positive("zscore_min_ratio", zscore_min_ratio, allow_none=True, noun="a positive number")
    if zscore_min_ratio is not None and zscore_min_ratio <= 1:
        raise ValueError(
            f"`zscore_min_ratio` must be > 1 (a spike is at least this multiple of the running mean), got "
            f"{zscore_min_ratio!r}"
        )
    if zscore_min_ratio is not None and zscore is None:
        raise ValueError("`zscore_min_ratio` is a floor of the z-score threshold: it needs `zscore`, got None")
    check_bool("track_first_moment", track_first_moment)
    check_positive("first_moment_zscore", first_moment_zscore, allow_none=True, noun="a positive number")
    check_choice("spike_action", spike_action, _SPIKE_ACTIONS)
    check_int("max_consecutive_skips", max_consecutive_skips, 1, allow_none=True)
    check_int("max_consecutive_amp_overflows", max_consecutive_amp_overflows, 1, allow_none=True)
    check_choice("on_persistent", on_persistent, _ON_PERSISTENT)
    check_int("snapshot_every", snapshot_every, 1)
    check_choice("snapshot_device", snapshot_device, _SNAPSHOT_DEVICES)
    check_int("skip_batches_after_rollback", skip_batches_after_rollback, 0)
    check_int("max_rollbacks", max_rollbacks, 0)
    check_bool("sync_free", sync_free, allow_none=True)
    rule = resolve_rule(zscore, zscore_min_ratio, spike_ratio, loss_zscore, clip_ratio, zscore_rebase_after)
    min_ratio = rule[0]
    if spike_action == "clip" and zscore is None and min_ratio is None:
        raise ValueError(
            "`spike_action='clip'` needs a spike threshold to clip to (`zscore` or `spike_ratio`), got both None"
        )
    if not (
        isinstance(protect_buffers, (bool, str))
        or callable(protect_buffers)
        or (isinstance(protect_buffers, Sequence) and all(isinstance(p, str) for p in protect_buffers))
    ):
        raise TypeError(
            "`protect_buffers` must be a bool, a glob pattern, a list of patterns or a callable"
            f" (name, buffer) -> bool, got {protect_buffers!r}"
        )
    check_int("log_every_n_steps", log_every_n_steps, 1, allow_none=True)
    check_int("warn_every_n_steps", warn_every_n_steps, 1)
    check_int("diagnose_top_k", diagnose_top_k, 1)
    check_bool("agree_across_ranks", agree_across_ranks)
    check_bool("pause_schedulers_on_skip", pause_schedulers_on_skip)
    check_choice("quarantine", quarantine, _QUARANTINE)

    return rule
