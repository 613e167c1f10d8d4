"""``AdaptiveLossWeight``: the stable adaptive controller for the weight of one loss term (docs/design.md)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_stability._checks import check_fraction, check_int, check_number, check_positive, check_str
from lightning_stability.callbacks._events import EventLog
from lightning_stability.callbacks._logging import log_scalars
from lightning_stability.callbacks._outputs import only_the_loss, only_the_loss_message
from lightning_stability.callbacks._refit import begin_fit
from lightning_stability.callbacks._sharding import ShardReducer
from lightning_stability.callbacks._state_key import cached_state_key
from lightning_stability.callbacks.guard._norm import collect_grads, grad_norms
from lightning_stability.losses.weights import LossWeights, SpikeDamping

__all__ = ["AdaptiveLossWeight", "Decision"]


class Decision(IntEnum):
    """What the controller did with one step; the number is what ``adaptive/<name>/decision`` logs."""

    DECREASE = -1  #: weight multiplied by ``1 - max_change``
    HOLD = 0  #: ratio inside [decrease_ratio, increase_ratio] and gradients not growing
    INCREASE = 1  #: weight multiplied by ``1 + max_change``
    SPIKE = 2  #: ratio > spike_ratio: the term was damped on the device, weight held, stable counter reset
    REJECTED = 3  #: non-finite (or negative) loss: counted, not averaged in, nothing decided
    WARMUP = 4  #: fewer than ``warmup_steps`` accepted steps so far
    COOLING = 5  #: within ``cooling_steps`` of the last change (or spike, rollback, manual set)
    HIGH_VARIANCE = 6  #: relative variance of the recent window above ``variance_limit``
    FROZEN = 7  #: frozen by :meth:`AdaptiveLossWeight.freeze`
    INVALID = 8  #: the proposed weight failed validation (non-finite or outside the bounds) and was not applied


def _scalar(t: Tensor) -> Tensor:
    """``t.detach().reshape(()).float()``, skipping the steps that would return an equal tensor (each is a dispatched
    op on the step's critical path; a term or norm is usually a detached 0-dim float32 tensor already)."""
    if t.requires_grad:
        t = t.detach()
    if t.dim():
        t = t.reshape(())
    return t if t.dtype is torch.float32 else t.float()


def _total_grad_norm(grads: list[Tensor]) -> Tensor:
    """2-norm of all gradients as one vector (foreach kernels where available; no host synchronisation)."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        return get_total_norm(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))


@dataclass
class _Pending:
    """The reduced statistics of one optimizer step, on their way to the host (see the class docstring)."""

    step: int
    reference: float | None  # the damping reference in effect during that step
    buffer: Tensor | None = None  # [loss] or [loss, grad_norm], summed over ranks
    handle: Any = None  # async all_reduce work, waited on when consumed
    host: Tensor | None = None  # pinned host copy (CUDA)
    event: Any = None  # CUDA event recorded after the host copy
    world_size: int = 1
    values: tuple[float, ...] | None = None  # materialised buffer

    def materialise(self) -> tuple[float, ...]:
        if self.values is None:
            if self.handle is not None:
                self.handle.wait()
                self.handle = None
            if self.event is not None:
                self.event.synchronize()
                raw = self.host.tolist()
            else:
                raw = self.buffer.tolist()
            self.values = tuple(float(v) for v in raw)
            self.buffer = self.host = self.event = None
        return self.values


class AdaptiveLossWeight(Callback):
    r"""Adapt the weight of one named loss term with the stable controller of docs/design.md's post-mortem 1.

    The module follows the loss-dict protocol: it keeps ``self.loss_weights`` (a
    :class:`~lightning_stability.losses.LossWeights`), combines its terms with
    ``self.loss_weights.weighted_sum(losses)`` and returns ``{"loss": total, "losses": {name: unweighted}}``.
    This callback owns ``loss_weights[loss]``: it reads the unweighted term from ``outputs["losses"][loss]`` after every
    batch and writes the new weight back between steps.

    **Controller.** Per optimizer step :math:`t` (micro-batches of one accumulated step are averaged, and the value is
    averaged over ranks), with :math:`\ell_t` the term and :math:`a` its running average:

    1. A non-finite (or negative) :math:`\ell_t` is *rejected*: counted in ``num_rejected``, never averaged in.
    2. :math:`\text{ratio}_t = \ell_t / a_{t-2}` (the reference the device used for the same step, see *Timing*).
    3. :math:`a \leftarrow \beta a + (1-\beta)\min(\ell_t, r_s a_{t-2})` with :math:`\beta` = ``ema_decay`` (0.99)
       and :math:`r_s` = ``spike_ratio``: a spike enters the average at its damped value, so one outlier moves the
       average by at most :math:`(1-\beta)(r_s-1)` = 1 %, while a genuine level shift is still followed (at about 1 %
       per step). The variance window gets the raw value.
    4. Decision, in this order: ratio > ``spike_ratio`` -> **spike** (the term was damped on the device by
       ``spike_ratio / ratio``, see below; the weight is held and the stable-step counter reset); ``freeze()``-d ->
       hold; fewer than ``warmup_steps`` accepted steps -> hold; within ``cooling_steps`` steps of the last change,
       spike, rollback or manual set -> hold; relative variance of the window > ``variance_limit`` -> hold;
       ratio > ``increase_ratio`` and gradients not growing -> **increase**; ratio < ``decrease_ratio`` or gradient
       norm growing -> **decrease**; otherwise hold.
    5. A change multiplies the weight by :math:`1 \pm` ``max_change`` (5 %). The new weight is validated (finite and in
       [``min_weight``, ``max_weight``]); an invalid one is rejected and the weight kept (decision ``INVALID``).

    The variance gate uses the *relative* variance :math:`\operatorname{Var}(w)/\operatorname{mean}(w)^2` of the last
    ``variance_window`` accepted values :math:`w`: it does not depend on the scale of the loss, so the one
    default (0.5, a coefficient of variation of 0.71) means the same for a mel L1 around 2 (the seed table of
    docs/design.md's post-mortem 1; there it equals a raw variance of 2) as for an STFT loss around 50, for which a
    raw limit of 0.5 would be a 1.4 % standard deviation and would keep the weight shut almost always (and a loss
    around 0.1 could never reach
    it). On the seed table's loss (about 2 with mild noise) the steady decline never trips the gate; a chaotic phase
    (the loss alternating between 0.5 and 4: relative variance 0.6) does.

    "Gradient norm growing" means: the mean of the last ``variance_window`` finite total gradient norms is above
    ``grad_growth`` times their running average (same :math:`\beta`). The norm is read from a ``GradientGuard`` on the
    trainer (its ``last_grad_norm``) when there is one, else computed here in ``on_before_optimizer_step`` with foreach
    kernels (unscaled under fp16 AMP). ``grad_growth=None`` turns this off. With several optimizers stepping in one
    batch (a GAN in manual optimization) the own norm covers all of their gradients, and a guard's is the norm of the
    last optimizer step; pass ``grad_growth=None`` there if the discriminator's gradients should not count.

    **Spike damping** happens on the device inside ``weighted_sum`` of the *same* step (this callback only sees the
    loss after the step): the callback registers a 0-dim reference tensor (the running average) with
    ``loss_weights.register_damping(loss, reference, spike_ratio)``, and the term becomes
    :math:`\ell \cdot \min(1, r_s a / \ell)`, i.e. damped by ``spike_ratio / ratio`` when ratio > ``spike_ratio``.
    Each rank damps its own term against the shared average; DDP then averages the damped gradients. Damping is off
    during validation.

    **Timing (one async reduction, no per-step sync).** At the end of step :math:`t` the step's statistics
    ``[loss, grad norm]`` are stacked into one tensor, an ``all_reduce(async_op=True)`` is launched when
    training is distributed, and on CUDA a non-blocking copy into pinned memory is queued behind it with an event.
    They are consumed at the end of step :math:`t+1`, when that work finished long ago, so the host never waits on the
    device: the decision about step :math:`t` is taken one step late, and a new weight applies from step
    :math:`t+2`. The damping reference the host publishes (``fill_`` of a device scalar, no sync) therefore lags too:
    step :math:`t` is damped against :math:`a_{t-2}`, and the host judges step :math:`t` against that same reference,
    so the host knows exactly which steps the device damped. The lag is the same on one device and on many, and the
    in-flight step is part of :meth:`state_dict`, so a resumed run takes the same decisions at the same steps.
    The last step of a run stays pending (it is decided by the next ``fit``).

    **Logging and events.** Each decided step logs ``adaptive/<loss>/weight``, ``.../ratio``, ``.../variance`` and
    ``.../decision`` (the :class:`Decision` code: -1 decrease, 0 hold, 1 increase, 2 spike, 3 rejected, 4 warm-up,
    5 cooling, 6 high variance, 7 frozen, 8 invalid weight) straight to the trainer's loggers, at Lightning's own
    logging step (as ``LearningRateMonitor`` does; ``self.log`` of a Python float would copy it to the device with a
    synchronising copy every step), and into ``trainer.callback_metrics`` (monitorable like a ``self.log`` value).
    The decision about step t is read one step later (the loss average is all-reduced asynchronously), so the values
    published at the end of step t + 1 describe step t. ``event_log`` keeps the weight/ratio/variance traces and a
    bounded list of events (changes, spikes, rejections, invalid proposals, rollbacks and manual actions), each with
    the step and a reason.

    Every rank takes the same decisions: they depend only on the rank-averaged statistics. Manual calls
    (:meth:`set_weight`, :meth:`rollback`, :meth:`freeze`, :meth:`unfreeze`) must be made on every rank.

    Args:
        loss: name of the term (a key of ``loss_weights`` and of ``outputs["losses"]``).
        base_weight: initial weight; ``None`` takes the module's configured ``loss_weights[loss]``.
        min_weight, max_weight: bounds of the weight.
        warmup_steps: accepted steps before the first change.
        cooling_steps: steps without change after a change, spike, rollback or manual set.
        variance_limit: no change while the relative variance of the window is above this (> 0; ``math.inf``
            switches the gate off).
        variance_window: number of recent steps in the variance (and gradient-growth) window.
        increase_ratio, decrease_ratio: ratio thresholds.
        max_change: relative size of one change.
        spike_ratio: ratio above which the step is a spike (and its term is damped to ``spike_ratio * average``).
        ema_decay: :math:`\beta` of the running averages.
        grad_growth: gradient-growth factor, or ``None`` to ignore gradient norms.
        max_history: previous weights kept for :meth:`rollback`.
        max_events: events kept in ``event_log``.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range (the message names it and shows the value).
        RuntimeError: at setup, the module has no ``loss_weights`` or it has no weight for ``loss``; on the first
            batch, ``outputs["losses"]`` lacks ``loss`` (the message lists the terms it reports).
    """

    def __init__(
        self,
        loss: str = "mel",
        *,
        base_weight: float | None = 2.5,
        min_weight: float = 1.0,
        max_weight: float = 5.0,
        warmup_steps: int = 100,
        cooling_steps: int = 50,
        variance_limit: float = 0.5,
        variance_window: int = 20,
        increase_ratio: float = 1.1,
        decrease_ratio: float = 0.9,
        max_change: float = 0.05,
        spike_ratio: float = 2.0,
        ema_decay: float = 0.99,
        grad_growth: float | None = 1.5,
        max_history: int = 100,
        max_events: int = 1000,
    ) -> None:
        loss = check_str("loss", loss)
        min_weight = check_positive("min_weight", min_weight)
        max_weight = check_number("max_weight", max_weight)
        if not max_weight > min_weight:
            raise ValueError(f"`max_weight` must be finite and > `min_weight` ({min_weight!r}), got {max_weight!r}")
        base_weight = check_number("base_weight", base_weight, minimum=min_weight, maximum=max_weight, allow_none=True)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.cooling_steps = check_int("cooling_steps", cooling_steps, 0)
        self.variance_window = check_int("variance_window", variance_window, 2)
        self.max_history = check_int("max_history", max_history, 1)
        max_events = check_int("max_events", max_events, 1)
        if isinstance(variance_limit, float) and variance_limit == math.inf:  # inf switches the gate off
            variance_limit = math.inf
        else:
            variance_limit = check_positive("variance_limit", variance_limit)
        increase_ratio = check_number("increase_ratio", increase_ratio, minimum=1, exclusive=True)
        decrease_ratio = check_fraction("decrease_ratio", decrease_ratio)
        max_change = check_fraction("max_change", max_change)
        spike_ratio = check_number("spike_ratio", spike_ratio)
        if not spike_ratio > increase_ratio:
            raise ValueError(
                f"`spike_ratio` must be finite and > `increase_ratio` ({increase_ratio!r}), got {spike_ratio!r}"
            )
        ema_decay = check_fraction("ema_decay", ema_decay)
        grad_growth = check_number("grad_growth", grad_growth, minimum=1, exclusive=True, allow_none=True)

        self.loss = loss
        self.base_weight = base_weight
        self.min_weight = min_weight
        self.max_weight = max_weight
        self.variance_limit = variance_limit
        self.increase_ratio = increase_ratio
        self.decrease_ratio = decrease_ratio
        self.max_change = max_change
        self.spike_ratio = spike_ratio
        self.ema_decay = ema_decay
        self.grad_growth = grad_growth
        self.event_log = EventLog(source=self.state_key, max_events=max_events)
        self._reset_state()
        # runtime (not state)
        self._loss_weights: LossWeights | None = None
        self._shards: ShardReducer | None = None
        self._damping: SpikeDamping | None = None
        self._reference: Tensor | None = None
        self._guard: Any = None
        self._checked_outputs = False
        self._warned_negative = False
        self._seen_global_step: int | None = None
        self._pending: _Pending | None = None
        self._host: Tensor | None = None
        self._event: Any = None
        self._acc_loss: Tensor | float | None = None
        self._acc_count = 0
        self._acc_grad_sq: Tensor | float | None = None
        self._acc_grad_count = 0

    def _new_fit(self, keep_weight: bool) -> None:
        """This fit's counters, history and events; the weight and loss averages kept when ``keep_weight``."""
        kept = (self.weight, self.avg, self.published_avg, self._window, self.grad_avg, self._grad_window,
                self.observed, self.frozen)  # fmt: skip
        self._reset_state()
        self.event_log.reset()
        self._pending, self._seen_global_step = None, None
        self._acc_loss, self._acc_count, self._acc_grad_sq, self._acc_grad_count = None, 0, None, 0
        if keep_weight:
            (self.weight, self.avg, self.published_avg, self._window, self.grad_avg, self._grad_window,
             self.observed, self.frozen) = kept  # fmt: skip

    def _reset_state(self) -> None:
        self.weight: float | None = self.base_weight
        self.avg: float | None = None
        self.published_avg: float | None = None
        self._window: deque[float] = deque(maxlen=self.variance_window)
        self.grad_avg: float | None = None
        self._grad_window: deque[float] = deque(maxlen=self.variance_window)
        self.observed = 0
        self.since_change = 0
        self.num_rejected = 0
        self.num_rejected_grad = 0
        self.num_spikes = 0
        self.num_changes = 0
        self.num_invalid = 0
        self.frozen = False
        self.history: list[tuple[int, float]] = []
        self.last_step: int | None = None
        self.last_decision: Decision | None = None
        self.last_ratio: float = math.nan
        self.last_variance: float = math.nan

    @property
    @override
    def state_key(self) -> str:
        return cached_state_key(self, loss=self.loss)

    # --- the decision ----------------------------------------------------------------------------------------------
    def _evaluate(
        self,
        *,
        ratio: float,
        variance: float,
        grad_growing: bool,
        observed: int,
        since_change: int,
        frozen: bool,
    ) -> tuple[Decision, str]:
        """The controller's decision for one accepted step (pure: reads only the configuration)."""
        if ratio > self.spike_ratio:
            return Decision.SPIKE, (
                f"spike: ratio {ratio:.3g} > {self.spike_ratio:g}; term damped by {self.spike_ratio / ratio:.3g},"
                f" weight held, stable counter reset"
            )
        if frozen:
            return Decision.FROZEN, "weight frozen by freeze()"
        if observed <= self.warmup_steps:
            return Decision.WARMUP, f"warm-up: {observed} of {self.warmup_steps} steps"
        if since_change <= self.cooling_steps:
            return Decision.COOLING, f"cooling: {since_change} of {self.cooling_steps} steps since the last change"
        if variance > self.variance_limit:
            return Decision.HIGH_VARIANCE, f"relative variance {variance:.3g} > {self.variance_limit:g}"
        if ratio > self.increase_ratio and not grad_growing:
            return Decision.INCREASE, f"ratio {ratio:.3g} > {self.increase_ratio:g} and gradient norm not growing"
        if ratio < self.decrease_ratio:
            return Decision.DECREASE, f"ratio {ratio:.3g} < {self.decrease_ratio:g}"
        if grad_growing:
            return Decision.DECREASE, f"gradient norm growing (ratio {ratio:.3g})"
        return Decision.HOLD, f"ratio {ratio:.3g} within [{self.decrease_ratio:g}, {self.increase_ratio:g}]"

    def _relative_variance(self) -> float:
        n = len(self._window)
        if n < 2:
            return 0.0
        mean = sum(self._window) / n
        if mean <= 0:
            return 0.0
        return sum([(x - mean) ** 2 for x in self._window]) / n / (mean * mean)  # a list: no generator frames

    def _grad_is_growing(self) -> bool:
        if self.grad_growth is None or self.grad_avg is None or len(self._grad_window) < self.variance_window:
            return False
        recent = sum(self._grad_window) / len(self._grad_window)
        return recent > self.grad_growth * self.grad_avg

    def _observe(
        self, step: int, loss: float, grad_norm: float | None = None, reference: float | None = None
    ) -> tuple[Decision, str]:
        """Feed one step's (rank-averaged) loss and gradient norm to the controller and act on its decision.

        ``reference`` is the damping reference the device used for this step (``None``: there was none).
        """
        if grad_norm is not None:
            if math.isfinite(grad_norm):
                b = self.ema_decay
                self.grad_avg = grad_norm if self.grad_avg is None else b * self.grad_avg + (1 - b) * grad_norm
                self._grad_window.append(grad_norm)
            else:
                self.num_rejected_grad += 1
        self.last_step = step
        if not math.isfinite(loss) or loss < 0:
            self.num_rejected += 1
            if loss < 0 and not self._warned_negative:
                self._warned_negative = True
                rank_zero_warn(f"AdaptiveLossWeight: the `{self.loss}` term is negative ({loss!r}); it is rejected.")
            decision = Decision.REJECTED
            reason = f"{'non-finite' if not math.isfinite(loss) else 'negative'} loss {loss!r} rejected, not averaged"
            self.last_ratio = math.nan
            self._record(step, decision, reason, loss=loss)
            return decision, reason
        base = reference if reference is not None and reference > 0 else self.avg
        ratio = loss / base if base else 1.0
        clipped = min(loss, self.spike_ratio * base) if base else loss
        b = self.ema_decay
        self.avg = clipped if self.avg is None else b * self.avg + (1 - b) * clipped
        self._window.append(loss)
        self.observed += 1
        self.since_change += 1
        variance = self._relative_variance()
        decision, reason = self._evaluate(
            ratio=ratio,
            variance=variance,
            grad_growing=self._grad_is_growing(),
            observed=self.observed,
            since_change=self.since_change,
            frozen=self.frozen,
        )
        self.last_ratio, self.last_variance = ratio, variance
        data: dict[str, Any] = {"loss": loss, "ratio": ratio, "average": self.avg, "weight": self.weight}
        if decision is Decision.SPIKE:
            self.num_spikes += 1
            self.since_change = 0
            if reference is not None and reference > 0:
                data.update(reference=base, factor=self.spike_ratio / ratio)
            else:
                reason = f"spike: ratio {ratio:.3g} > {self.spike_ratio:g} before the damping had a reference"
                reason += "; weight held, stable counter reset"
        elif decision in (Decision.INCREASE, Decision.DECREASE):
            sign = 1.0 if decision is Decision.INCREASE else -1.0
            proposed = self.weight * (1.0 + sign * self.max_change)
            if math.isfinite(proposed) and self.min_weight <= proposed <= self.max_weight:
                self._change_weight(step, proposed)
                reason = f"{reason}: weight {data['weight']:.6g} -> {proposed:.6g}"
            else:
                self.num_invalid += 1
                reason = (
                    f"{reason}, but the proposed weight {proposed:.6g} is outside"
                    f" [{self.min_weight:g}, {self.max_weight:g}]; kept {self.weight:.6g}"
                )
                decision = Decision.INVALID
            data["new_weight"] = self.weight
        self._record(step, decision, reason, **data)
        return decision, reason

    def _record(self, step: int, decision: Decision, reason: str, **data: Any) -> None:
        repeated = decision is self.last_decision
        self.last_decision = decision
        self.event_log.trace("weight", step, self.weight)
        self.event_log.trace("ratio", step, self.last_ratio)
        self.event_log.trace("variance", step, self.last_variance)
        # Every change is an event; spikes, rejections and invalid proposals only at the start of a run of them (their
        # totals are in num_spikes / num_rejected / num_invalid), so a long incident cannot flush the event list.
        if decision in (Decision.INCREASE, Decision.DECREASE) or (
            decision in (Decision.SPIKE, Decision.REJECTED, Decision.INVALID) and not repeated
        ):
            self.event_log.add(step, decision.name.lower(), reason, **data)

    def _change_weight(self, step: int, weight: float, *, manual: bool = False) -> None:
        if self.weight is not None:  # (None: base_weight=None before setup read the module's weight)
            self.history.append((int(step), float(self.weight)))
            del self.history[: -self.max_history]
        self.weight = float(weight)
        self.since_change = 0
        if not manual:
            self.num_changes += 1
        self._apply_weight()

    def _apply_weight(self) -> None:
        if self._loss_weights is not None and self.weight is not None:
            self._loss_weights[self.loss] = self.weight

    # --- manual control ---------------------------------------------------------------------------------------------
    def _now(self) -> int:
        return -1 if self.last_step is None else self.last_step

    def set_weight(self, weight: float, reason: str = "manual override") -> None:
        """Set the weight by hand (validated; it can be undone with :meth:`rollback`; starts a cooling period)."""
        value = check_number("weight", weight, minimum=self.min_weight, maximum=self.max_weight)
        old = self.weight
        self._change_weight(self._now(), value, manual=True)
        self.event_log.add(self._now(), "set", f"{reason}: weight {old} -> {value}", weight=value, previous=old)

    def rollback(self) -> float:
        """Restore the weight before the last change (controller or manual); returns it. Starts a cooling period.

        Raises:
            RuntimeError: there is no earlier weight.
        """
        if not self.history:
            raise RuntimeError(f"AdaptiveLossWeight(`{self.loss}`): no earlier weight to roll back to")
        step, previous = self.history.pop()
        old = self.weight
        self.weight = previous
        self.since_change = 0
        self._apply_weight()
        self.event_log.add(
            self._now(), "rollback", f"rolled back {old} -> {previous} (set at step {step})", weight=previous
        )
        return previous

    def freeze(self, reason: str = "manual freeze") -> None:
        """Stop automatic changes until :meth:`unfreeze` (spikes are still damped)."""
        self.frozen = True
        self.event_log.add(self._now(), "freeze", reason, weight=self.weight)

    def unfreeze(self, reason: str = "manual unfreeze") -> None:
        """Resume automatic changes."""
        self.frozen = False
        self.event_log.add(self._now(), "unfreeze", reason, weight=self.weight)

    # --- hooks --------------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        again = begin_fit(self, pl_module)  # a reused callback: see `_refit` for what carries over
        if again is not None:
            self._new_fit(keep_weight=again)
        loss_weights = getattr(pl_module, "loss_weights", None)
        if not isinstance(loss_weights, LossWeights):
            found = "no attribute `loss_weights`" if loss_weights is None else f"`loss_weights` = {loss_weights!r}"
            raise RuntimeError(
                f"AdaptiveLossWeight(loss={self.loss!r}) needs the module to keep a LossWeights as"
                f" `self.loss_weights` (from lightning_stability.losses import LossWeights), but"
                f" {type(pl_module).__name__} has {found}"
            )
        if self.loss not in loss_weights:
            raise RuntimeError(
                f"AdaptiveLossWeight(loss={self.loss!r}): `{type(pl_module).__name__}.loss_weights` has no weight"
                f" for {self.loss!r}; it has {list(loss_weights.names)}"
            )
        if self.weight is None:
            configured = loss_weights[self.loss]
            if not self.min_weight <= configured <= self.max_weight:
                raise RuntimeError(
                    f"AdaptiveLossWeight(loss={self.loss!r}, base_weight=None): the module's weight {configured!r}"
                    f" is outside [`min_weight`, `max_weight`] = [{self.min_weight!r}, {self.max_weight!r}]"
                )
            self.weight = configured
        elif loss_weights[self.loss] != self.weight and self.observed == 0:
            rank_zero_info(
                f"AdaptiveLossWeight: the weight of {self.loss!r} starts at {self.weight} (the module had"
                f" {loss_weights[self.loss]})"
            )
        self._loss_weights = loss_weights
        self._guard = None
        if self.grad_growth is not None:
            self._guard = next(
                (cb for cb in trainer.callbacks if cb is not self and hasattr(cb, "last_grad_norm")), None
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the checkpoint restore and the move to the device: write the (restored) weight into the module and
        # register the damping with a reference tensor on the module's device.
        self._loss_weights = pl_module.loss_weights
        self._shards = ShardReducer.for_trainer(trainer)  # sharded gradients: the own norm is the whole model's
        self._apply_weight()
        value = math.nan if self.published_avg is None else self.published_avg
        self._reference = torch.full((), value, dtype=torch.float32, device=pl_module.device)
        self._damping = self._loss_weights.register_damping(self.loss, self._reference, self.spike_ratio)
        self._seen_global_step = trainer.global_step

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._damping is not None:
            self._damping.enabled = False

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._damping is not None:
            self._damping.enabled = True

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.grad_growth is None or self._guard is not None or trainer.sanity_checking:
            return
        if self._shards is not None:  # local shards (some empty): one all-reduce of their squared norms
            params, local = collect_grads(optimizer)
            everything = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
            layout, index = self._shards.layout(optimizer, everything, params)
            norm = grad_norms(local, shards=layout, shard_index=index).total
        else:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if not grads:
                return
            norm = _total_grad_norm(grads).float()
        inv_scale = self._inverse_amp_scale(trainer, optimizer)
        if inv_scale is not None:
            norm = norm * inv_scale
        square = norm * norm
        self._acc_grad_sq = square if self._acc_grad_sq is None else self._acc_grad_sq + square
        self._acc_grad_count += 1

    @staticmethod
    def _inverse_amp_scale(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> Tensor | None:
        """1/scale when fp16 AMP left this optimizer's gradients scaled (fused optimizers unscale in ``step``)."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        try:
            from torch.amp.grad_scaler import OptState

            if scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.UNSCALED:
                return None
            scale = scaler._get_scale_async()
        except (AttributeError, KeyError, ImportError):  # a GradScaler without these internals: leave the norm
            return None
        return None if scale is None else scale.double().reciprocal().float()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.sanity_checking:
            return
        value = self._term_from(outputs, pl_module)
        if value is not None:
            value = _scalar(value)
            self._acc_loss = value if self._acc_loss is None else self._acc_loss + value
            self._acc_count += 1
        if self._seen_global_step is None:
            self._seen_global_step = trainer.global_step
        if trainer.global_step == self._seen_global_step:
            return  # inside an accumulation window: no optimizer step yet
        step = self._seen_global_step
        self._seen_global_step = trainer.global_step
        if self._guard is not None:
            norm = getattr(self._guard, "last_grad_norm", None)
            if isinstance(norm, Tensor):
                norm = _scalar(norm)
                self._acc_grad_sq, self._acc_grad_count = norm * norm, 1
        # the reference the device damped this step against, before consuming the previous step republishes it
        reference = self.published_avg
        # consume the previous step first (decides with a one-step lag), then send this one on its way
        self._consume(trainer)
        if self._acc_count == 0:
            self._acc_grad_sq, self._acc_grad_count = None, 0
            return
        self._launch(trainer, pl_module, step, reference)

    def _term_from(self, outputs: Any, pl_module: pl.LightningModule) -> Tensor | None:
        losses = outputs.get("losses") if isinstance(outputs, Mapping) else None
        term = losses.get(self.loss) if isinstance(losses, Mapping) else None
        if not self._checked_outputs and outputs is not None:
            if term is None and only_the_loss(outputs):
                raise RuntimeError(
                    f"AdaptiveLossWeight(loss={self.loss!r}) needs the unweighted term `outputs['losses']"
                    f"[{self.loss!r}]`, but {only_the_loss_message(f'{type(pl_module).__name__}.training_step')}"
                )
            if term is None:
                reported = list(losses) if isinstance(losses, Mapping) else None
                what = (
                    f"its `losses` reports {reported}"
                    if reported is not None
                    else f"it returned {type(outputs).__name__}"
                    + (f" with keys {list(outputs)}" if isinstance(outputs, Mapping) else "")
                )
                raise RuntimeError(
                    f"AdaptiveLossWeight(loss={self.loss!r}): `{type(pl_module).__name__}.training_step` must return"
                    f" {{'loss': total, 'losses': {{{self.loss!r}: <unweighted scalar tensor>, ...}}}}, but {what}"
                )
            self._checked_outputs = True
        if term is None:
            return None
        if not isinstance(term, Tensor) or term.numel() != 1:
            raise RuntimeError(
                f"AdaptiveLossWeight(loss={self.loss!r}): `outputs['losses'][{self.loss!r}]` must be a scalar tensor,"
                f" got {term!r}"
            )
        return term

    def _launch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, reference: float | None) -> None:
        # one micro-batch (the usual case): the sum is the mean (x / 1 is exact), no division op
        loss = self._acc_loss if self._acc_count == 1 else self._acc_loss / self._acc_count
        if not isinstance(loss, Tensor):  # restored mid-accumulation sums are floats
            loss = torch.tensor(loss, dtype=torch.float32, device=pl_module.device)
        # every rank takes the same optimizer steps, so every rank has a norm or none does: no count is reduced
        if self._acc_grad_count:  # [loss, grad norm] in one stack (0-dim float32 both)
            grad_sq = torch.as_tensor(self._acc_grad_sq, dtype=torch.float32, device=loss.device)
            buffer = torch.stack([loss, grad_sq.sqrt()])
        else:
            buffer = torch.stack([loss])  # a fresh tensor, never a view of the module's term (reduced in place)
        self._acc_loss, self._acc_count, self._acc_grad_sq, self._acc_grad_count = None, 0, None, 0
        pending = _Pending(step=step, reference=reference, buffer=buffer)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            pending.handle = dist.all_reduce(buffer, op=dist.ReduceOp.SUM, async_op=True)
            pending.world_size = trainer.world_size
        if buffer.is_cuda:
            if pending.handle is not None:
                pending.handle.wait()  # NCCL: the current stream waits for the reduction; the host does not
                pending.handle = None
            # one pinned buffer and one event are enough: the previous step was consumed (read) just before this
            if self._host is None:
                self._host = torch.empty(2, dtype=torch.float32, pin_memory=True)
                self._event = torch.cuda.Event()
            pending.host, pending.event = self._host[: buffer.numel()], self._event
            pending.host.copy_(buffer, non_blocking=True)
            pending.event.record()
        self._pending = pending

    def _consume(self, trainer: pl.Trainer) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        values = pending.materialise()
        world = pending.world_size
        grad = values[1] / world if len(values) > 1 else None
        decision, _ = self._observe(pending.step, values[0] / world, grad, pending.reference)
        if decision is not Decision.REJECTED:
            # an average of 0 (a term that was exactly 0 so far) is no reference: nothing is damped against it
            self.published_avg = self.avg if self.avg is not None and self.avg > 0 else None
            if self._reference is not None:
                self._reference.fill_(math.nan if self.published_avg is None else self.published_avg)
        self._log(trainer, decision)

    def _log(self, trainer: pl.Trainer, decision: Decision) -> None:
        prefix = f"adaptive/{self.loss}/"
        metrics = {
            prefix + "weight": float(self.weight),
            prefix + "ratio": self.last_ratio if decision is not Decision.REJECTED else math.nan,
            prefix + "variance": self.last_variance,
            prefix + "decision": float(int(decision)),
        }
        log_scalars(trainer, metrics)  # at Lightning's own logging step (W&B steps stay monotonic); monitorable

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:
            self._pending.materialise()  # no collective may be left in flight when the process group goes away
        self._detach_damping()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._detach_damping()

    def _detach_damping(self) -> None:
        if self._loss_weights is not None and self._damping is not None:
            self._loss_weights.remove_damping(self.loss, self._damping)
        self._damping = None

    # --- state ------------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        pending = None
        if self._pending is not None:
            values = self._pending.materialise()
            pending = {
                "step": self._pending.step,
                "reference": self._pending.reference,
                "values": list(values),
                "world_size": self._pending.world_size,
            }

        def _float(x: Tensor | float | None) -> float | None:
            return None if x is None else float(x)

        return {
            "loss": self.loss,
            "weight": self.weight,
            "avg": self.avg,
            "published_avg": self.published_avg,
            "window": list(self._window),
            "grad_avg": self.grad_avg,
            "grad_window": list(self._grad_window),
            "observed": self.observed,
            "since_change": self.since_change,
            "num_rejected": self.num_rejected,
            "num_rejected_grad": self.num_rejected_grad,
            "num_spikes": self.num_spikes,
            "num_changes": self.num_changes,
            "num_invalid": self.num_invalid,
            "frozen": self.frozen,
            "history": [list(h) for h in self.history],
            "last_step": self.last_step,
            "last_decision": None if self.last_decision is None else int(self.last_decision),
            "last_ratio": self.last_ratio,
            "last_variance": self.last_variance,
            "pending": pending,
            "accumulated": {
                "loss": _float(self._acc_loss),
                "count": self._acc_count,
                "grad_sq": _float(self._acc_grad_sq),
                "grad_count": self._acc_grad_count,
            },
            "event_log": self.event_log.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("loss", self.loss) != self.loss:
            raise ValueError(f"state for loss {state_dict['loss']!r} loaded into AdaptiveLossWeight({self.loss!r})")
        self.weight = state_dict["weight"]
        self.avg = state_dict["avg"]
        self.published_avg = state_dict["published_avg"]
        self._window = deque(state_dict["window"], maxlen=self.variance_window)
        self.grad_avg = state_dict["grad_avg"]
        self._grad_window = deque(state_dict["grad_window"], maxlen=self.variance_window)
        for key in (
            "observed",
            "since_change",
            "num_rejected",
            "num_rejected_grad",
            "num_spikes",
            "num_changes",
            "num_invalid",
        ):
            setattr(self, key, int(state_dict[key]))
        self.frozen = bool(state_dict["frozen"])
        self.history = [(int(s), float(w)) for s, w in state_dict["history"]]
        self.last_step = state_dict["last_step"]
        last = state_dict["last_decision"]
        self.last_decision = None if last is None else Decision(last)
        self.last_ratio = state_dict["last_ratio"]
        self.last_variance = state_dict["last_variance"]
        pending = state_dict["pending"]
        self._pending = None
        if pending is not None:
            self._pending = _Pending(
                step=int(pending["step"]),
                reference=pending["reference"],
                world_size=int(pending["world_size"]),
                values=tuple(float(v) for v in pending["values"]),
            )
        acc = state_dict["accumulated"]
        self._acc_loss, self._acc_count = acc["loss"], int(acc["count"])
        self._acc_grad_sq, self._acc_grad_count = acc["grad_sq"], int(acc["grad_count"])
        self._checked_outputs = self.observed > 0
        self.event_log.load_state_dict(state_dict["event_log"])
        if self._reference is not None and self.published_avg is not None:
            self._reference.fill_(self.published_avg)
        self._apply_weight()
