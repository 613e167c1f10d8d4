"""The decision ``GradientGuard`` makes for one optimizer step, as pure functions.

Two implementations of the same rule:

- :func:`evaluate` / :func:`update_stats` work on Python floats. The guard uses them when the host already knows the
  gradient norm (one ``.item()``-like read per step), and they are what the unit tests pin down.
- :func:`evaluate_on_device` / :func:`update_stats_on_device` work on 0-dim tensors and never read a value back to the
  host; ``GradientGuard(sync_free=True)`` uses them with fused optimizers.

The rule, for the total gradient norm ``g`` of one optimizer (most severe first):

1. ``g`` non-finite: ``AMP_OVERFLOW`` when fp16 AMP's ``GradScaler`` found the overflow (and the loss itself was
   finite; the scaler skips the step and lowers its scale: calibration, not instability), otherwise ``NONFINITE``.
2. a forced skip (the batches right after a rollback): ``FORCED``.
3. ``max_norm`` set and ``g > max_norm``: ``OVER_MAX``.
4. warm-up over and ``g`` above the spike threshold, the larger of ``mean + zscore * std`` (with ``zscore``) and
   ``min_ratio * mean`` (with ``min_ratio``): an *outlier*. Without ``loss_zscore`` every outlier is a spike; with it
   an outlier is a spike only when the step's loss confirms it (below). A spike is ``SPIKE`` (skip) or ``CLIP`` (scale
   the gradients down to the threshold and step); an outlier the loss does not confirm is ``CLIP`` when
   ``g > clip_ratio * mean`` (an extreme norm, whatever the loss says) and ``ACCEPT`` otherwise. Either is ``REBASE``
   (step) when it is the ``rebase_after``-th acted-upon outlier in a row (below).
5. otherwise ``ACCEPT``.

Loss confirmation (``loss_zscore``; the default ``GradientGuard()`` rule). A data fault (a corrupt or wrongly scaled
batch, a loss term that blows up for one step) moves the loss and the gradient norm at once; the legitimate changes of
a healthy run that move the gradient norm (the end of a learning-rate warm-up, unfrozen layers, a smaller batch) do
not move the loss that way, and the noise of a small model's gradient norm (coefficient of variation 0.3-0.6) is not
matched by a loss excursion. So the step's loss ``L`` (summed over micro-batches, averaged over ranks) keeps running
statistics of its own, updated like the norm's (same warm-up, EMA, streak and rebase), and the evidence of a data fault
is the loss's distance from its running mean, in loss standard deviations, times how far the norm is above its
threshold:

    |L - loss mean| / loss std  *  g / threshold  >  loss_zscore

(two-sided: a loss may be negative, as a GAN generator's hinge loss is; the further the norm is out, the less the loss
has to move). The loss std has a floor of ``loss_floor`` (5 %) of the loss mean's magnitude, so a loss that barely
moves (a discriminator's hinge loss stuck near 2) does not make every small wobble a confirmation, and a loss that
enters the statistics is clamped to ``loss mean +- loss_zscore * loss std`` first, so one absurd loss on a step whose
norm stayed normal (a batch at the wrong scale that the network's normalisation absorbed) cannot poison them. A step
whose loss is unknown (no ``backward`` went through Lightning), or whose loss statistics are still warming up, is
unconfirmed: only the ``clip_ratio`` backstop acts on it.

Running statistics (ZClip, Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training"): during the
first ``warmup`` accepted steps the mean and (population) variance are exact (Welford); afterwards they are exponential
moving averages with the incremental form of Finch (2009, "Incremental calculation of weighted mean and variance"):

    delta = v - mean;  mean <- mean + (1 - alpha) * delta;  var <- alpha * (var + (1 - alpha) * delta**2)

where ``v = g`` for an accepted step and ``v = threshold`` for a clipped one (as ZClip does).

Spikes and level shifts. A norm above the threshold (a z-score outlier) does not enter the running statistics, so a
burst of spikes cannot raise the threshold that is meant to catch it. But a healthy run's gradient scale can change
for good (a loss weight switched from 1 to 4, the end of a learning-rate warm-up): every later norm is then an outlier
of the old statistics, and a guard that never lets outliers in skips every step until persistent trouble ends the run.
The rule that tells the two apart is the length of the run of outliers: the guard keeps a second, exact (Welford)
mean/variance of the current *streak* of consecutive finite outliers. An accepted step clears the streak; a step that
says nothing about the level (non-finite, ``max_norm``, AMP overflow, forced) leaves it as it is. When a streak reaches
``rebase_after`` outliers the level is taken to have moved: that step is accepted (``REBASE``) and the statistics
restart from the streak, ``mean = streak mean`` and ``var = max(streak var, var * (streak mean / mean)**2)`` (the old
relative spread, carried to the new level, is a floor: a few similar norms alone would give a too-tight threshold).
So a lasting shift costs ``rebase_after - 1`` skipped (or clipped) steps before the new level is the baseline, and a
burst of fewer outliers leaves the threshold exactly where it was. The trade-off: a burst of ``rebase_after`` or more
consecutive finite spikes is indistinguishable from a level shift and becomes the new baseline (OLMo-core and MaxText
keep every value in their window for the same reason, "so spikes can become the new baseline"); non-finite norms never
enter any statistics and are always skipped, and ``max_norm`` still bounds every step. ``rebase_after=None`` restores
the strict rule (outliers never enter; a lasting shift ends in persistent trouble).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor


class Action(IntEnum):
    """Outcome of one step, ordered by severity (so ranks can agree with a MAX all-reduce)."""

    ACCEPT = 0
    REBASE = 1  # the outlier that completes a streak of ``rebase_after``: accepted, statistics restart from the streak
    CLIP = 2
    FORCED = 3
    SPIKE = 4
    MOMENT_SPIKE = 5  # the first-moment norm spiked while the gradient-norm rule would have stepped
    OVER_MAX = 6
    AMP_OVERFLOW = 7
    NONFINITE = 8


#: actions after which the optimizer does not move (``CLIP`` and ``ACCEPT`` step).
NOT_STEPPED = frozenset(
    {Action.FORCED, Action.SPIKE, Action.MOMENT_SPIKE, Action.OVER_MAX, Action.AMP_OVERFLOW, Action.NONFINITE}
)
#: actions the guard itself is responsible for, counted in ``num_skipped``.
GUARD_SKIPS = frozenset({Action.FORCED, Action.SPIKE, Action.MOMENT_SPIKE, Action.OVER_MAX, Action.NONFINITE})
#: actions after which the optimizer steps.
STEPPED = frozenset({Action.ACCEPT, Action.REBASE, Action.CLIP})
#: actions that count towards ``max_consecutive_skips`` (forced skips after a rollback do not).
TROUBLE = frozenset({Action.SPIKE, Action.MOMENT_SPIKE, Action.OVER_MAX, Action.NONFINITE})
#: gradient-norm outcomes after which the first-moment norm is judged (finite, within ``max_norm``, not forced).
MOMENT_JUDGED = frozenset({Action.ACCEPT, Action.REBASE, Action.CLIP, Action.SPIKE})

REASONS = {
    Action.ACCEPT: "accepted",
    Action.REBASE: "level shift: a streak of z-score outliers became the new baseline",
    Action.CLIP: "gradient-norm spike clipped to the spike threshold",
    Action.FORCED: "skipping batches after a rollback",
    Action.SPIKE: "gradient-norm spike above the spike threshold",
    Action.MOMENT_SPIKE: "first-moment-norm spike above its z-score threshold",
    Action.OVER_MAX: "gradient norm above `max_norm`",
    Action.AMP_OVERFLOW: "fp16 GradScaler overflow (the scaler skips the step and lowers its scale)",
    Action.NONFINITE: "non-finite gradient norm",
}


@dataclass(frozen=True)
class PolicyConfig:
    max_norm: float | None = None
    zscore: float | None = None
    alpha: float = 0.97
    warmup: int = 25
    clip: bool = False  # spike_action == "clip"
    rebase_after: int | None = None  # consecutive outliers after which the statistics restart from them (None: never)
    min_ratio: float | None = None  # an outlier must also exceed this multiple of the running mean (None: no floor)
    loss_zscore: float | None = None  # a spike must also move the loss this many loss stds (None: the norm alone)
    clip_ratio: float | None = None  # an unconfirmed outlier above this multiple of the mean is clipped (None: taken)
    loss_floor: float = 0.05  # the loss std is at least this fraction of the loss mean's magnitude

    @property
    def detects(self) -> bool:
        """Whether finite spikes are detected at all (a threshold exists after the warm-up)."""
        return self.zscore is not None or self.min_ratio is not None


@dataclass
class NormStats:
    """Running mean/variance of accepted norms (``count`` stops at the warm-up length), and the exact mean/variance of
    the current streak of consecutive finite z-score outliers."""

    mean: float = 0.0
    var: float = 0.0
    count: int = 0
    streak_mean: float = 0.0
    streak_var: float = 0.0
    streak_count: int = 0

    #: number of values in :meth:`as_list` (and in the device tensor of sync-free mode)
    SIZE = 6

    def as_list(self) -> list[float]:
        return [float(self.mean), float(self.var), float(self.count), float(self.streak_mean), float(self.streak_var),
                float(self.streak_count)]  # fmt: skip

    @classmethod
    def from_list(cls, values: list[float]) -> NormStats:
        """Inverse of :meth:`as_list`; a 3-value list (``[mean, var, count]``, version 0.1.0) has an empty streak."""
        if len(values) not in (3, cls.SIZE):
            raise ValueError(f"guard statistics must have 3 or {cls.SIZE} values, got {len(values)}: {values!r}")
        v = [float(x) for x in values] + [0.0] * (cls.SIZE - len(values))
        return cls(v[0], v[1], int(v[2]), v[3], v[4], int(v[5]))


@dataclass(frozen=True)
class Decision:
    action: Action
    threshold: float | None  # z-score threshold in force for this step (None during warm-up or without zscore)

    @property
    def reason(self) -> str:
        return REASONS[self.action]


def threshold(stats: NormStats, cfg: PolicyConfig) -> float | None:
    """The larger of ``mean + zscore * std`` and ``min_ratio * mean`` (each when set) once ``warmup`` accepted norms
    were seen, else ``None``."""
    if not cfg.detects or stats.count < cfg.warmup:
        return None
    thr = -math.inf if cfg.zscore is None else stats.mean + cfg.zscore * math.sqrt(max(stats.var, 0.0))
    return thr if cfg.min_ratio is None else max(thr, cfg.min_ratio * stats.mean)


def loss_std(loss_stats: NormStats, cfg: PolicyConfig) -> float:
    """The loss standard deviation the rule uses: at least ``loss_floor`` times the loss mean's magnitude."""
    return max(math.sqrt(max(loss_stats.var, 0.0)), cfg.loss_floor * abs(loss_stats.mean))


def loss_confirms(
    loss: float | None,
    loss_stats: NormStats | None,
    cfg: PolicyConfig,
    norm: float | None = None,
    thr: float | None = None,
) -> bool:
    """Whether the step's loss confirms a gradient-norm outlier ``norm`` above ``thr`` (always, without
    ``loss_zscore``; see the module docstring)."""
    if cfg.loss_zscore is None:
        return True
    if loss is None or loss_stats is None or loss_stats.count < cfg.warmup:
        return False
    if not math.isfinite(loss):
        return True
    excess = norm / thr if norm is not None and thr is not None and thr > 0 else 1.0
    return abs(loss - loss_stats.mean) * excess > cfg.loss_zscore * loss_std(loss_stats, cfg)


def loss_for_stats(loss: float, loss_stats: NormStats, cfg: PolicyConfig) -> float:
    """The value a step's loss enters the loss statistics with: clamped to ``mean +- loss_zscore * std`` once they
    are warm (one absurd loss cannot poison them)."""
    if cfg.loss_zscore is None or loss_stats.count < cfg.warmup or not math.isfinite(loss):
        return loss
    band = cfg.loss_zscore * loss_std(loss_stats, cfg)
    return min(max(loss, loss_stats.mean - band), loss_stats.mean + band)


def loss_evidence(loss: float, loss_stats: NormStats, cfg: PolicyConfig) -> dict[str, float]:
    """What the loss said about a step, for its event: the loss, its running mean and how many (floored) standard
    deviations it was off it."""
    std = loss_std(loss_stats, cfg)
    off = abs(loss - loss_stats.mean) / std if std > 0 else (math.inf if loss != loss_stats.mean else 0.0)
    return {"loss": loss, "loss_mean": loss_stats.mean, "loss_zscore": off}


def evaluate(
    norm: float,
    stats: NormStats,
    cfg: PolicyConfig,
    *,
    amp_overflow: bool = False,
    nonfinite_loss: bool = False,
    forced: bool = False,
    loss: float | None = None,
    loss_stats: NormStats | None = None,
) -> Decision:
    """Classify one step from its total gradient norm and, with ``cfg.loss_zscore``, its loss (see the module
    docstring for the rule)."""
    thr = threshold(stats, cfg)
    if not math.isfinite(norm):
        overflow = amp_overflow and not nonfinite_loss
        return Decision(Action.AMP_OVERFLOW if overflow else Action.NONFINITE, thr)
    if amp_overflow:  # the scaler saw an inf that the fp32 norm did not (cannot normally happen): it skips anyway
        return Decision(Action.AMP_OVERFLOW, thr)
    if forced:
        return Decision(Action.FORCED, thr)
    if cfg.max_norm is not None and norm > cfg.max_norm:
        return Decision(Action.OVER_MAX, thr)
    if thr is not None and norm > thr:
        if loss_confirms(loss, loss_stats, cfg, norm, thr):
            action = Action.CLIP if cfg.clip else Action.SPIKE
        elif cfg.clip_ratio is not None and norm > cfg.clip_ratio * stats.mean:
            action = Action.CLIP
        else:
            return Decision(Action.ACCEPT, thr)
        if cfg.rebase_after is not None and stats.streak_count + 1 >= cfg.rebase_after:
            return Decision(Action.REBASE, thr)
        return Decision(action, thr)
    return Decision(Action.ACCEPT, thr)


def combine(decision: Decision, moment: Decision | None) -> Decision:
    """The step's action when the first-moment norm is watched too (``moment``: its own decision, from its own
    statistics, or ``None`` when it was not judged): a first-moment spike skips a step the gradient-norm rule would
    take. Each signal's statistics follow its own decision (two independent detectors, the more severe one acts)."""
    if moment is None or moment.action is not Action.SPIKE or decision.action not in STEPPED:
        return decision
    return Decision(Action.MOMENT_SPIKE, decision.threshold)


def _welford(mean: float, var: float, count: int, value: float) -> tuple[float, float, int]:
    """Exact mean and population variance after adding ``value``."""
    n1 = count + 1
    delta = value - mean
    new_mean = mean + delta / n1
    return new_mean, (count * var + delta * (value - new_mean)) / n1, n1


def update_stats(
    stats: NormStats,
    decision: Decision,
    norm: float,
    cfg: PolicyConfig,
    *,
    clip_value: float | None = None,
    ema_value: float | None = None,
) -> NormStats:
    """Statistics after ``decision`` (see the module docstring: accepted and clipped norms enter the running
    statistics, outliers the streak, a ``REBASE`` restarts them from the streak, anything else changes nothing).

    ``clip_value``: what a ``CLIP`` step enters into the running statistics (default: the threshold it was clipped to);
    ``ema_value``: what an accepted or clipped step enters (default: ``norm``, or ``clip_value`` for ``CLIP``; the loss
    statistics pass the clamped loss, :func:`loss_for_stats`, while the streak keeps the raw value). A non-finite
    ``norm`` changes nothing."""
    action = decision.action
    if not math.isfinite(norm):
        return stats
    if action not in STEPPED and action is not Action.SPIKE:
        return stats
    streak = (stats.streak_mean, stats.streak_var, stats.streak_count)
    if action is not Action.ACCEPT:  # an outlier: its raw norm extends the streak
        streak = _welford(*streak, norm)
    if action is Action.REBASE:
        s_mean, s_var, _ = streak
        carried = stats.var * (s_mean / stats.mean) ** 2 if stats.mean != 0 else 0.0
        return NormStats(s_mean, max(s_var, carried), stats.count)
    if action is Action.SPIKE:
        return NormStats(stats.mean, stats.var, stats.count, *streak)
    if action is Action.ACCEPT:
        streak = (0.0, 0.0, 0)
    value = norm
    if action is Action.CLIP:
        value = decision.threshold if clip_value is None else clip_value
    if ema_value is not None:
        value = ema_value
    if stats.count < cfg.warmup:  # Welford, population variance
        return NormStats(*_welford(stats.mean, stats.var, stats.count, value), *streak)
    delta = value - stats.mean
    mean = stats.mean + (1.0 - cfg.alpha) * delta
    var = cfg.alpha * (stats.var + (1.0 - cfg.alpha) * delta * delta)
    return NormStats(mean, var, stats.count, *streak)


# ----------------------------------------------------------------------------------------------------------------------
# Device versions: ``stats`` is a float32 tensor ``NormStats.as_list()``; nothing is read back to the host.


def threshold_on_device(stats: Tensor, cfg: PolicyConfig) -> Tensor:
    """:func:`threshold` as a 0-dim float32 tensor (``inf`` during warm-up or without a rule)."""
    if not cfg.detects:
        return torch.full_like(stats[0], math.inf)
    if cfg.zscore is None:
        thr = cfg.min_ratio * stats[0]
    else:
        thr = stats[0] + cfg.zscore * stats[1].clamp_min(0).sqrt()
        if cfg.min_ratio is not None:
            thr = torch.maximum(thr, cfg.min_ratio * stats[0])
    return torch.where(stats[2] >= cfg.warmup, thr, math.inf)


def _loss_std_on_device(loss_stats: Tensor, cfg: PolicyConfig) -> Tensor:
    return torch.maximum(loss_stats[1].clamp_min(0).sqrt(), cfg.loss_floor * loss_stats[0].abs())


def loss_confirms_on_device(
    loss: Tensor | None, loss_stats: Tensor | None, cfg: PolicyConfig, norm: Tensor, thr: Tensor
) -> Tensor | None:
    """:func:`loss_confirms` as a 0-dim bool tensor (``None``: always, no ``loss_zscore``)."""
    if cfg.loss_zscore is None:
        return None
    if loss is None or loss_stats is None:
        return torch.zeros((), dtype=torch.bool, device=norm.device)
    loss = loss.to(torch.float32)
    excess = torch.where(thr > 0, norm / thr, 1.0)
    off = (loss - loss_stats[0]).abs() * excess > cfg.loss_zscore * _loss_std_on_device(loss_stats, cfg)
    return (loss_stats[2] >= cfg.warmup) & (off | ~torch.isfinite(loss))


def loss_for_stats_on_device(loss: Tensor, loss_stats: Tensor, cfg: PolicyConfig) -> Tensor:
    """:func:`loss_for_stats` on the device."""
    if cfg.loss_zscore is None:
        return loss
    band = cfg.loss_zscore * _loss_std_on_device(loss_stats, cfg)
    clamped = torch.minimum(torch.maximum(loss, loss_stats[0] - band), loss_stats[0] + band)
    return torch.where((loss_stats[2] >= cfg.warmup) & torch.isfinite(loss), clamped, loss)


def evaluate_on_device(
    norm: Tensor,
    stats: Tensor,
    cfg: PolicyConfig,
    *,
    amp_overflow: Tensor | None = None,
    nonfinite_loss: Tensor | None = None,
    forced: bool = False,
    loss: Tensor | None = None,
    loss_stats: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Same rule as :func:`evaluate`; returns ``(action code int32, threshold)`` as 0-dim device tensors."""
    thr = threshold_on_device(stats, cfg)
    code = torch.zeros((), dtype=torch.int32, device=norm.device)
    if cfg.detects:
        outlier = norm > thr  # False during warm-up (thr = inf) and for NaN
        confirmed = loss_confirms_on_device(loss, loss_stats, cfg, norm, thr)
        if confirmed is not None:
            spike = outlier & confirmed.to(norm.device)
            clipped = outlier & ~spike
            if cfg.clip_ratio is not None:
                clipped = clipped & (norm > cfg.clip_ratio * stats[0])
            else:
                clipped = torch.zeros_like(outlier)
            acted = spike | clipped
        else:
            spike, clipped, acted = outlier, torch.zeros_like(outlier), outlier
        code = torch.where(spike, int(Action.CLIP if cfg.clip else Action.SPIKE), code)
        code = torch.where(clipped, int(Action.CLIP), code)
        if cfg.rebase_after is not None:
            code = torch.where(acted & (stats[5] + 1 >= cfg.rebase_after), int(Action.REBASE), code)
    if cfg.max_norm is not None:
        code = torch.where(norm > cfg.max_norm, int(Action.OVER_MAX), code)
    if forced:
        code = torch.full_like(code, int(Action.FORCED))
    bad = ~torch.isfinite(norm)
    if amp_overflow is not None:
        overflow = amp_overflow if nonfinite_loss is None else amp_overflow & ~nonfinite_loss
        code = torch.where(overflow, int(Action.AMP_OVERFLOW), code)
        bad = bad & ~overflow
    code = torch.where(bad, int(Action.NONFINITE), code)
    return code, thr


def update_stats_on_device(
    stats: Tensor, code: Tensor, norm: Tensor, thr: Tensor, cfg: PolicyConfig, ema_value: Tensor | None = None
) -> Tensor:
    """Statistics after a step with action ``code`` (a new tensor; ``stats`` is not modified); the same rule as
    :func:`update_stats` (``thr``: what a clipped step enters, as ``clip_value`` there; ``ema_value`` as there), every
    branch computed and the right one selected with ``torch.where``."""
    mean, var, count, s_mean, s_var, s_count = stats.unbind()
    norm = norm.to(stats.dtype)
    value = torch.where(code == int(Action.CLIP), thr, norm) if ema_value is None else ema_value.to(stats.dtype)
    w_mean, w_var, w_count = _welford_t(mean, var, count, value)
    delta = value - mean
    e_mean = mean + (1.0 - cfg.alpha) * delta
    e_var = cfg.alpha * (var + (1.0 - cfg.alpha) * delta * delta)
    warm = count < cfg.warmup
    main = [torch.where(warm, w_mean, e_mean), torch.where(warm, w_var, e_var), torch.where(warm, w_count, count)]
    sm, sv, sc = _welford_t(s_mean, s_var, s_count, norm)  # the streak with this outlier
    zero = torch.zeros_like(mean)
    ratio = sm / torch.where(mean != 0, mean, 1.0)
    carried = torch.where(mean != 0, var * ratio * ratio, zero)
    candidates = {
        Action.ACCEPT: torch.stack([*main, zero, zero, zero]),
        Action.CLIP: torch.stack([*main, sm, sv, sc]),
        Action.SPIKE: torch.stack([mean, var, count, sm, sv, sc]),
        Action.REBASE: torch.stack([sm, torch.maximum(sv, carried), count, zero, zero, zero]),
    }
    out = stats
    for action, new in candidates.items():
        out = torch.where(code == int(action), new, out)
    return torch.where(torch.isfinite(norm), out, stats)


def combine_on_device(code: Tensor, moment_code: Tensor) -> Tensor:
    """:func:`combine` on action codes (``moment_code`` only matters where ``code`` is in ``MOMENT_JUDGED``)."""
    stepped = code <= int(Action.CLIP)
    return torch.where(stepped & (moment_code == int(Action.SPIKE)), int(Action.MOMENT_SPIKE), code)


def judged_on_device(code: Tensor) -> Tensor:
    """Where the first-moment norm is judged and enters its statistics (``MOMENT_JUDGED``)."""
    return (code <= int(Action.SPIKE)) & (code != int(Action.FORCED))


def _welford_t(mean: Tensor, var: Tensor, count: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n1 = count + 1
    delta = value - mean
    new_mean = mean + delta / n1
    return new_mean, (count * var + delta * (value - new_mean)) / n1, n1
