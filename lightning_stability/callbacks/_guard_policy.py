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
4. ``zscore`` set, warm-up over and ``g > mean + zscore * std``: ``SPIKE`` (skip) or ``CLIP`` (scale the gradients
   down to the threshold and step).
5. otherwise ``ACCEPT``.

Running statistics of *accepted* norms (ZClip, Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM
Pre-Training"): during the first ``warmup`` accepted steps the mean and (population) variance are exact (Welford);
afterwards they are exponential moving averages with the incremental form of Finch (2009, "Incremental calculation of
weighted mean and variance"):

    delta = v - mean;  mean <- mean + (1 - alpha) * delta;  var <- alpha * (var + (1 - alpha) * delta**2)

where ``v = g`` for an accepted step and ``v = threshold`` for a clipped one (as ZClip does). Skipped steps never enter
the statistics, so a burst of spikes cannot raise the threshold that is meant to catch it.
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
    CLIP = 1
    FORCED = 2
    SPIKE = 3
    OVER_MAX = 4
    AMP_OVERFLOW = 5
    NONFINITE = 6


#: actions after which the optimizer does not move (``CLIP`` and ``ACCEPT`` step).
NOT_STEPPED = frozenset({Action.FORCED, Action.SPIKE, Action.OVER_MAX, Action.AMP_OVERFLOW, Action.NONFINITE})
#: actions the guard itself is responsible for, counted in ``num_skipped``.
GUARD_SKIPS = frozenset({Action.FORCED, Action.SPIKE, Action.OVER_MAX, Action.NONFINITE})
#: actions that count towards ``max_consecutive_skips`` (forced skips after a rollback do not).
TROUBLE = frozenset({Action.SPIKE, Action.OVER_MAX, Action.NONFINITE})

REASONS = {
    Action.ACCEPT: "accepted",
    Action.CLIP: "gradient-norm spike clipped to the z-score threshold",
    Action.FORCED: "skipping batches after a rollback",
    Action.SPIKE: "gradient-norm spike above the z-score threshold",
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


@dataclass
class NormStats:
    """Running mean/variance of accepted norms; ``count`` stops at the warm-up length."""

    mean: float = 0.0
    var: float = 0.0
    count: int = 0

    def as_list(self) -> list[float]:
        return [float(self.mean), float(self.var), float(self.count)]


@dataclass(frozen=True)
class Decision:
    action: Action
    threshold: float | None  # z-score threshold in force for this step (None during warm-up or without zscore)

    @property
    def reason(self) -> str:
        return REASONS[self.action]


def threshold(stats: NormStats, cfg: PolicyConfig) -> float | None:
    """``mean + zscore * std`` once ``warmup`` accepted norms were seen, else ``None``."""
    if cfg.zscore is None or stats.count < cfg.warmup:
        return None
    return stats.mean + cfg.zscore * math.sqrt(max(stats.var, 0.0))


def evaluate(
    norm: float,
    stats: NormStats,
    cfg: PolicyConfig,
    *,
    amp_overflow: bool = False,
    nonfinite_loss: bool = False,
    forced: bool = False,
) -> Decision:
    """Classify one step from its total gradient norm (see the module docstring for the rule)."""
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
        return Decision(Action.CLIP if cfg.clip else Action.SPIKE, thr)
    return Decision(Action.ACCEPT, thr)


def update_stats(stats: NormStats, decision: Decision, norm: float, cfg: PolicyConfig) -> NormStats:
    """Statistics after ``decision`` (unchanged unless the step was accepted or clipped)."""
    if decision.action not in (Action.ACCEPT, Action.CLIP):
        return stats
    value = decision.threshold if decision.action is Action.CLIP else norm
    if stats.count < cfg.warmup:  # Welford, population variance
        n1 = stats.count + 1
        delta = value - stats.mean
        mean = stats.mean + delta / n1
        var = (stats.count * stats.var + delta * (value - mean)) / n1
        return NormStats(mean, var, n1)
    delta = value - stats.mean
    mean = stats.mean + (1.0 - cfg.alpha) * delta
    var = cfg.alpha * (stats.var + (1.0 - cfg.alpha) * delta * delta)
    return NormStats(mean, var, stats.count)


# ----------------------------------------------------------------------------------------------------------------------
# Device versions: ``stats`` is a float32 tensor ``[mean, var, count]``; nothing is read back to the host.


def threshold_on_device(stats: Tensor, cfg: PolicyConfig) -> Tensor:
    """``mean + zscore * std`` (``inf`` during warm-up or without ``zscore``), a 0-dim float32 tensor."""
    if cfg.zscore is None:
        return torch.full_like(stats[0], math.inf)
    thr = stats[0] + cfg.zscore * stats[1].clamp_min(0).sqrt()
    return torch.where(stats[2] >= cfg.warmup, thr, math.inf)


def evaluate_on_device(
    norm: Tensor,
    stats: Tensor,
    cfg: PolicyConfig,
    *,
    amp_overflow: Tensor | None = None,
    nonfinite_loss: Tensor | None = None,
    forced: bool = False,
) -> tuple[Tensor, Tensor]:
    """Same rule as :func:`evaluate`; returns ``(action code int32, threshold)`` as 0-dim device tensors."""
    thr = threshold_on_device(stats, cfg)
    code = torch.zeros((), dtype=torch.int32, device=norm.device)
    if cfg.zscore is not None:
        code = torch.where(norm > thr, int(Action.CLIP if cfg.clip else Action.SPIKE), code)
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


def update_stats_on_device(stats: Tensor, code: Tensor, norm: Tensor, thr: Tensor, cfg: PolicyConfig) -> Tensor:
    """Statistics after a step with action ``code`` (a new tensor; ``stats`` is not modified)."""
    accepted = code <= int(Action.CLIP)
    value = torch.where(code == int(Action.CLIP), thr, norm)
    mean, var, count = stats[0], stats[1], stats[2]
    n1 = count + 1
    delta = value - mean
    w_mean = mean + delta / n1
    w_var = (count * var + delta * (value - w_mean)) / n1
    e_mean = mean + (1.0 - cfg.alpha) * delta
    e_var = cfg.alpha * (var + (1.0 - cfg.alpha) * delta * delta)
    warm = count < cfg.warmup
    new = torch.stack(
        [torch.where(warm, w_mean, e_mean), torch.where(warm, w_var, e_var), torch.where(warm, n1, count)]
    )
    return torch.where(accepted, new, stats)
