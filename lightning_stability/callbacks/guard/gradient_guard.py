"""``GradientGuard``: skip optimizer steps whose gradients are non-finite, too large or a spike, for real.

Lightning gives a callback no way to veto ``optimizer.step`` (Lightning issues #4956, #5152), and returning ``None``
from ``training_step`` under DDP hangs because ranks disagree (#5243). The guard works in
``on_before_optimizer_step``, which runs after backward (gradients accumulated and, under fp16 AMP with a non-fused
optimizer, unscaled) and before Lightning's gradient clipping and the step, for automatic and manual optimization.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from os import PathLike
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_stability.callbacks._events import EventLog
from lightning_stability.callbacks._refit import begin_fit
from lightning_stability.callbacks._sharding import ShardReducer
from lightning_stability.callbacks._state_key import cached_state_key
from lightning_stability.callbacks.guard._checks import check_arguments
from lightning_stability.callbacks.guard._manual import DeferredRestore, buffer_owners, plain_name, restore_buffers
from lightning_stability.callbacks.guard._metrics import log_guard, publish_latest
from lightning_stability.callbacks.guard._moments import first_moment_norm, has_first_moment
from lightning_stability.callbacks.guard._norm import collect_grads, describe, diagnose, grad_norms
from lightning_stability.callbacks.guard._optim import (
    StepSkipper,
    active_scaler,
    is_fused,
    optimizer_index,
    scaler_state,
)
from lightning_stability.callbacks.guard._persist import guard_state_dict, load_guard_state
from lightning_stability.callbacks.guard._policy import (
    GUARD_SKIPS,
    MOMENT_JUDGED,
    NOT_STEPPED,
    REASONS,
    STEPPED,
    TROUBLE,
    Action,
    Decision,
    NormStats,
    PolicyConfig,
    combine,
    combine_on_device,
    evaluate,
    evaluate_on_device,
    judged_on_device,
    loss_confirms,
    loss_evidence,
    loss_for_stats,
    loss_for_stats_on_device,
    update_stats,
    update_stats_on_device,
)
from lightning_stability.callbacks.guard._quarantine import Position, Quarantine
from lightning_stability.callbacks.guard._replay import Replayed, replay, unavailable_reason
from lightning_stability.callbacks.guard._rollback import Rollback, state_is_finite
from lightning_stability.callbacks.guard._sched import SchedulerHold
from lightning_stability.callbacks.guard._state import (
    COUNTERS,
    BufferSelector,
    BufferSnapshot,
    Counters,
    OptimizerState,
    StepContext,
    select_buffers,
)


class GradientGuard(Callback):
    r"""Decide, per optimizer step, whether the step may proceed; skip it for real when it may not.

    Measures the total L2 norm of the optimizer's gradients (``torch._foreach_norm`` per (device, dtype) group,
    in float32; all-reduced as one vector under sharded strategies), decides with a pure rule (most severe first:
    non-finite, over ``max_norm``, a spike against the running statistics of accepted norms, confirmed by the loss by
    default; ``guard._policy.evaluate``), and skips for real: every gradient of the optimizer is set to ``None`` (a
    fused optimizer is skipped through its ``found_inf``), the protected buffers are restored, step-interval
    learning-rate schedulers are held. fp16 AMP overflows are the scaler's calibration, counted apart. Persistent
    trouble (``max_consecutive_skips`` skips in a row, a collapsing loss scale, corrupted weights) rolls back to an
    in-memory snapshot, stops or raises (``on_persistent``). After a rollback the batch of the triggering step is
    replayed once from the restored state (a ``"replay"`` event: ``"data"`` or ``"state"``) and the batches that led
    to it are quarantined, by ``(epoch, batch_idx)``, in the checkpoint too, and skipped when they come back
    (``quarantine``, ``load_quarantine``; the guide's section "Recovery that remembers"). Every decision that is not
    a plain accept is an event in ``event_log`` (kind and ``data["cause"]``), read by ``StabilityReport``;
    ``guard/*`` metrics are logged every ``log_every_n_steps`` steps. With ``sync_free`` (by default on a GPU with a
    fused optimizer) the decision stays on the device and the host reads it every ``log_every_n_steps`` steps.

    The full rule (the default spike rule and the earlier z-score rule, level shifts, buffers, rollback, corrupted
    weights, ranks, sync-free mode, the first moment) is in the guide, ``docs/guides/gradient-guard.md``, section
    "How the guard decides" (published with the documentation of this version).

    Args:
        max_norm: skip steps whose total gradient norm exceeds this (``None``: no fixed bound).
        zscore: spike threshold in standard deviations above the running mean (``None``: off; ZClip uses 2.5); selects
            the earlier z-score rule (see above).
        zscore_alpha: EMA factor of the running statistics after the warm-up, in (0, 1).
        zscore_warmup: accepted steps before spikes are detected (>= 1).
        zscore_rebase_after: consecutive acted-upon outliers after which the statistics restart from them (>= 2;
            ``None``: never; ``"auto"``: 3, or 8 with ``zscore``), see above.
        zscore_min_ratio: a spike must also exceed this multiple of the running mean (> 1; ``None``: no floor), see
            above; needs ``zscore``.
        spike_ratio: an outlier's norm is above this multiple of the running mean (> 1; ``"auto"``: 3, or ``None``
            with ``zscore``; ``None`` without ``zscore``: finite spikes are not detected, the earlier default).
        loss_zscore: an outlier is a spike only when the step's loss is this many standard deviations off its
            running mean (``"auto"``: 6 with the default rule, ``None`` with ``zscore``; ``None``: the norm alone).
        clip_ratio: an outlier the loss does not confirm is clipped when its norm is above this multiple of the
            running mean (> 1, needs ``loss_zscore``; ``"auto"``: 10 with ``loss_zscore``).
        track_first_moment: compute and log the first-moment norm, see above.
        first_moment_zscore: also skip a step whose first-moment norm spikes this many standard deviations above its
            own running statistics (``None``: off; implies ``track_first_moment``).
        spike_action: ``"skip"`` or ``"clip"`` (to the threshold).
        max_consecutive_skips: guard skips in a row that count as persistent trouble (``None``: never).
        max_consecutive_amp_overflows: fp16 overflows in a row that count as persistent trouble (``None``: never).
        on_persistent: ``"rollback"``, ``"stop"`` or ``"raise"``.
        snapshot_every: accepted steps between rollback snapshots.
        snapshot_device: ``"cpu"`` or ``"same"`` (the parameters' device).
        skip_batches_after_rollback: batches whose optimizer steps are skipped after a rollback.
        max_rollbacks: rollbacks before the guard stops the run instead.
        sync_free: decide on the device, see above (``None``, the default: on the device when the gradients are on a
            GPU and the optimizer is fused, on the host otherwise, where a host read costs no synchronisation).
        protect_buffers: which buffers a skip restores, see above.
        log_every_n_steps: logging (and, in sync-free mode, host read) interval; ``None``: the Trainer's.
        warn_every_n_steps: minimum number of steps between two rank-zero warnings.
        diagnose_top_k: layers listed in a diagnosis.
        agree_across_ranks: all-reduce the decision every step (only needed for exotic strategies).
        pause_schedulers_on_skip: a step not taken (guard skip or fp16 overflow) does not advance the optimizer's
            ``interval="step"`` learning-rate schedulers (automatic optimization; see ``guard._sched``).
        quarantine: which batches, known by ``(epoch, batch_idx)``, are remembered (in the checkpoint too) and have
            their steps skipped whenever they come back (a resume from an earlier checkpoint): ``"rollback"``, those
            that led to a rollback (unless its replay blamed the state, see the guide); ``"skipped"``, also every
            batch whose step the guard skipped as trouble; ``"off"``. See ``guard._quarantine``.

    Raises:
        ValueError: an argument out of range or not one of the accepted words.
        TypeError: an argument of the wrong type.
        RuntimeError: in ``setup``, for a DeepSpeed strategy (DeepSpeed skips overflow steps itself), and in
            training with ``on_persistent="raise"``.
    """

    def __init__(
        self,
        *,
        max_norm: float | None = None,
        zscore: float | None = None,
        zscore_alpha: float = 0.97,
        zscore_warmup: int = 25,
        zscore_rebase_after: int | None | Literal["auto"] = "auto",
        zscore_min_ratio: float | None = None,
        spike_ratio: float | None | Literal["auto"] = "auto",
        loss_zscore: float | None | Literal["auto"] = "auto",
        clip_ratio: float | None | Literal["auto"] = "auto",
        track_first_moment: bool = False,
        first_moment_zscore: float | None = None,
        spike_action: Literal["skip", "clip"] = "skip",
        max_consecutive_skips: int | None = 10,
        max_consecutive_amp_overflows: int | None = 30,
        on_persistent: Literal["rollback", "stop", "raise"] = "stop",
        snapshot_every: int = 100,
        snapshot_device: Literal["cpu", "same"] = "cpu",
        skip_batches_after_rollback: int = 0,
        max_rollbacks: int = 3,
        sync_free: bool | None = None,
        protect_buffers: BufferSelector = True,
        log_every_n_steps: int | None = None,
        warn_every_n_steps: int = 100,
        diagnose_top_k: int = 5,
        agree_across_ranks: bool = False,
        pause_schedulers_on_skip: bool = True,
        quarantine: Literal["rollback", "skipped", "off"] = "rollback",
    ) -> None:
        min_ratio, loss_zscore, clip_ratio, zscore_rebase_after = check_arguments(
            max_norm=max_norm, zscore=zscore, zscore_alpha=zscore_alpha, zscore_warmup=zscore_warmup,
            zscore_rebase_after=zscore_rebase_after, zscore_min_ratio=zscore_min_ratio, spike_ratio=spike_ratio,
            loss_zscore=loss_zscore, clip_ratio=clip_ratio, track_first_moment=track_first_moment,
            first_moment_zscore=first_moment_zscore, spike_action=spike_action,
            max_consecutive_skips=max_consecutive_skips, max_consecutive_amp_overflows=max_consecutive_amp_overflows,
            on_persistent=on_persistent, snapshot_every=snapshot_every, snapshot_device=snapshot_device,
            skip_batches_after_rollback=skip_batches_after_rollback, max_rollbacks=max_rollbacks, sync_free=sync_free,
            protect_buffers=protect_buffers, log_every_n_steps=log_every_n_steps,
            warn_every_n_steps=warn_every_n_steps, diagnose_top_k=diagnose_top_k,
            agree_across_ranks=agree_across_ranks, pause_schedulers_on_skip=pause_schedulers_on_skip,
            quarantine=quarantine,
        )  # fmt: skip

        self.max_norm = None if max_norm is None else float(max_norm)
        self.zscore = None if zscore is None else float(zscore)
        self.zscore_alpha = float(zscore_alpha)
        self.zscore_warmup = zscore_warmup
        self.zscore_rebase_after = zscore_rebase_after
        self.zscore_min_ratio = None if zscore_min_ratio is None else float(zscore_min_ratio)
        self.spike_ratio = min_ratio if zscore is None else (None if spike_ratio in ("auto", None) else min_ratio)
        self.loss_zscore = loss_zscore
        self.clip_ratio = clip_ratio
        self.first_moment_zscore = None if first_moment_zscore is None else float(first_moment_zscore)
        self.track_first_moment = track_first_moment or first_moment_zscore is not None
        self.spike_action = spike_action
        self.max_consecutive_skips = max_consecutive_skips
        self.max_consecutive_amp_overflows = max_consecutive_amp_overflows
        self.on_persistent = on_persistent
        self.snapshot_every = snapshot_every
        self.snapshot_device = snapshot_device
        self.skip_batches_after_rollback = skip_batches_after_rollback
        self.max_rollbacks = max_rollbacks
        self.sync_free = sync_free
        self.protect_buffers = protect_buffers if not isinstance(protect_buffers, list) else tuple(protect_buffers)
        self.log_every_n_steps = log_every_n_steps
        self.warn_every_n_steps = warn_every_n_steps
        self.diagnose_top_k = diagnose_top_k
        self.agree_across_ranks = agree_across_ranks
        self.pause_schedulers_on_skip = pause_schedulers_on_skip
        self.quarantine = quarantine
        self._quarantine = Quarantine(quarantine)  # see `guard._quarantine`
        self._sched_hold = SchedulerHold()  # see `guard._sched`
        self._cfg = PolicyConfig(
            self.max_norm,
            self.zscore,
            self.zscore_alpha,
            zscore_warmup,
            spike_action == "clip",
            zscore_rebase_after,
            min_ratio,
            loss_zscore,
            clip_ratio,
        )
        self._cfg_m = None  # the first-moment detector: its own z-score, the same EMA, warm-up and rebase rule
        if self.first_moment_zscore is not None:
            self._cfg_m = PolicyConfig(
                None, self.first_moment_zscore, self.zscore_alpha, zscore_warmup, False, zscore_rebase_after
            )
        self._no_moment: set[int] = set()  # optimizers without a first moment (warned once)

        self.event_log = EventLog(source=self.state_key)
        self._skipper = StepSkipper()  # p.grad = None, or found_inf for fused optimizers (with its step hooks)
        self._rollback = Rollback(
            on_persistent=on_persistent,
            max_consecutive_skips=max_consecutive_skips,
            max_consecutive_amp_overflows=max_consecutive_amp_overflows,
            snapshot_every=snapshot_every,
            snapshot_device=snapshot_device,
            skip_batches_after_rollback=skip_batches_after_rollback,
            max_rollbacks=max_rollbacks,
            event_log=self.event_log,
            skipper=self._skipper,
        )
        self.last_grad_norm: Tensor | None = None
        self._last_host: tuple[float, float | None, float | None] | None = None  # host mode: norm, threshold, moment
        self._opt_states: dict[int, OptimizerState] = {}
        self._last_warn_step: int | None = None
        self._warned_reasons: set[int] = set()  # kinds of skip announced so far (see `_warn`)
        self._buffers: BufferSnapshot | None = None
        self._buffers_armed = False
        self._deferred: DeferredRestore | None = None  # manual optimization: restores wait for the batch's end
        self._stepped_this_batch = False
        self._param_names: dict[int, str] = {}
        self._loss_bad: Tensor | None = None
        self._loss_sum: Tensor | None = None  # the loss of the backward passes since the last optimizer step
        self._batch_loss: Tensor | None = None  # the last such loss of this batch (a second optimizer reuses it)
        self._warned_fallback = False
        self._log_every = 50
        self._last_read: dict[int, Counters] = {}
        self._active_scaler: torch.amp.GradScaler | None = None
        self._shards: ShardReducer | None = None
        self._process_group: Any = None

    # ------------------------------------------------------------------------------------------------------------------
    # identity and state

    @property
    def state_key(self) -> str:
        return cached_state_key(self, max_norm=self.max_norm, zscore=self.zscore, spike_action=self.spike_action)

    @property
    def num_skipped(self) -> int:
        """Optimizer steps the guard skipped (AMP overflows excluded)."""
        return sum(s.read_counters().num_skipped for s in self._opt_states.values())

    @property
    def num_amp_overflows(self) -> int:
        return sum(s.read_counters().num_amp_overflows for s in self._opt_states.values())

    @property
    def num_clipped(self) -> int:
        return sum(s.read_counters().num_clipped for s in self._opt_states.values())

    @property
    def num_rebased(self) -> int:
        """Level shifts: steps at which a streak of ``zscore_rebase_after`` spikes became the new baseline."""
        return sum(s.read_counters().num_rebased for s in self._opt_states.values())

    @property
    def num_rollbacks(self) -> int:
        """Rollbacks so far in this fit."""
        return self._rollback.num_rollbacks

    @property
    def quarantined(self) -> list[Position]:
        """The quarantined batches, ``(epoch, batch_idx)`` in order: their steps are skipped when they come back."""
        return self._quarantine.sorted()

    def load_quarantine(self, source: str | PathLike | Iterable[Iterable[int]]) -> list[Position]:
        """Add quarantined batches: from a checkpoint file that holds this guard's state (a later checkpoint of the
        run, when resuming from an earlier one), or ``(epoch, batch_idx)`` pairs. Returns the positions that were new.
        """
        if isinstance(source, (str, PathLike)):
            from lightning.fabric.utilities.cloud_io import _load as pl_load

            checkpoint = pl_load(source, map_location="cpu", weights_only=False)
            states = checkpoint.get("callbacks", {})
            if self.state_key not in states:
                raise ValueError(
                    f"`source`: the checkpoint {str(source)!r} holds no state of this guard (`{self.state_key}`);"
                    f" it holds {sorted(states)}"
                )
            return self._quarantine.add(states[self.state_key].get("quarantine", ()))
        try:
            pairs = [tuple(p) for p in source]
        except TypeError:
            raise TypeError(f"`source` must be a checkpoint path or (epoch, batch_idx) pairs, got {source!r}") from None
        if not all(len(p) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in p) for p in pairs):
            raise ValueError(f"`source` must hold (epoch, batch_idx) pairs of ints, got {source!r}")
        return self._quarantine.add(pairs)

    @property
    def consecutive_skips(self) -> int:
        return max((s.read_counters().consecutive for s in self._opt_states.values()), default=0)

    @property
    def _armed_buffers(self) -> BufferSnapshot | None:
        """The protected buffers, when a copy was taken for this optimizer step (what a skip restores)."""
        return self._buffers if self._buffers_armed else None

    def _new_fit(self, keep_statistics: bool) -> None:
        """The same guard in a new fit (see ``callbacks._refit``): fresh counters, events and rollback state; the
        running statistics kept when ``keep_statistics`` (the same module keeps training)."""
        states = {}
        for idx, old in self._opt_states.items():
            st = OptimizerState()
            if keep_statistics:
                st.stats = NormStats.from_list(old.stats_t.tolist()) if old.stats_t is not None else old.stats
                st.mstats = NormStats.from_list(old.mstats_t.tolist()) if old.mstats_t is not None else old.mstats
            states[idx] = st
        self._opt_states = states
        self.event_log.reset()
        self._rollback.reset()
        self._quarantine.reset()  # the quarantined batches stay: they describe the data, not the fit
        self.last_grad_norm = None
        self._last_host = None
        self._last_warn_step = None
        self._warned_reasons = set()
        self._last_read.clear()

    @override
    def state_dict(self) -> dict[str, Any]:
        return guard_state_dict(self)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load_guard_state(self, state_dict)

    # ------------------------------------------------------------------------------------------------------------------
    # hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        again = begin_fit(self, pl_module)  # a reused guard: this fit's counters; statistics kept for the same module
        if again is not None:
            self._new_fit(keep_statistics=again)
        if "deepspeed" in type(trainer.strategy).__name__.lower():
            raise RuntimeError(
                f"`GradientGuard` does not support `{type(trainer.strategy).__name__}`: DeepSpeed partitions gradients"
                " and skips overflow steps itself."
            )
        self._log_every = self.log_every_n_steps or trainer.log_every_n_steps or 50

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the precision plugin and the strategy are fixed from here on: look them up once, not every step
        self._active_scaler = active_scaler(trainer)
        self._shards = ShardReducer.for_trainer(trainer)  # None unless parameters are sharded (FSDP, DTensor)
        # a plain SUM over every rank: right for sums over data-parallel shards only; `self._shards` handles any mesh
        self._process_group = torch.distributed.group.WORLD if self._shards is not None else None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._param_names = {id(p): plain_name(name) for name, p in pl_module.named_parameters()}
        self._buffers = None
        if self.protect_buffers is not False:
            entries = select_buffers(pl_module, self.protect_buffers)
            self._buffers = BufferSnapshot(entries) if entries else None
        self._deferred = None
        if not pl_module.automatic_optimization and self._buffers is not None:
            self._deferred = DeferredRestore(buffer_owners(pl_module, self._buffers.names, trainer.optimizers))
        self._buffers_armed = False
        self._rollback.train_start(trainer, pl_module, self._opt_states, self._deferred)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_loss = None
        self._quarantine.batch_start(trainer.current_epoch, batch_idx, batch)
        self._rollback.batch_start(trainer, pl_module, self._opt_states)
        if self._buffers is not None and not self._buffers_armed:
            self._buffers.capture()
            self._buffers_armed = True

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._sched_hold.undo()  # Lightning stepped the step-interval schedulers before this hook
        if self._deferred is not None:  # manual optimization: every backward of the batch has run
            self._deferred.apply(self._buffers)
        if trainer.is_last_batch:  # monitors checked at the end of the epoch find the keys (`guard._metrics`)
            publish_latest(self, trainer)
        if self._stepped_this_batch:  # the next batch starts a new optimizer step: take a new buffer copy then
            self._stepped_this_batch = False
            self._buffers_armed = False
        self._rollback.batch_end(trainer, pl_module, self._opt_states)
        self._quarantine.batch_end()

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        publish_latest(self, trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        publish_latest(self, trainer)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if trainer.sanity_checking:
            return
        scaler = self._active_scaler
        if self._cfg.loss_zscore is not None:  # the loss that confirms a spike: summed over micro-batches, unscaled
            value = loss.detach().to(torch.float32)
            scale = getattr(scaler, "_scale", None) if scaler is not None else None
            if scale is not None:  # Lightning hands callbacks the loss already multiplied by the fp16 loss scale
                value = value / scale.to(value.device)
            self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        # needed to tell an fp16 overflow (finite loss) from a real NaN/inf loss
        if scaler is None:
            return
        bad = ~torch.isfinite(loss.detach())
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if trainer.sanity_checking:
            return
        idx = optimizer_index(trainer, optimizer)
        st = self._opt_states.get(idx)
        if st is None:  # not `setdefault`: it would build (and drop) a fresh state every step
            st = self._opt_states[idx] = OptimizerState()
        params, grads = collect_grads(optimizer)
        loss_bad, self._loss_bad = self._loss_bad, None
        loss = self._step_loss(trainer)
        self._stepped_this_batch = True
        # FSDP1: a rank may hold no part of any gradient while others do, and must still join the reduction; elsewhere
        # every rank has the same set of gradients, so none here means none anywhere
        if not grads and (self._shards is None or self._shards.kind != "fsdp"):
            return
        fused = is_fused(optimizer)
        if fused:
            self._skipper.install_hooks(optimizer)
        scaler = self._active_scaler
        amp_state = scaler_state(scaler, optimizer)
        inv_scale = None
        if scaler is not None and amp_state is not None and amp_state.get("stage_ready", False):
            inv_scale = scaler._get_scale_async().double().reciprocal().float()  # grads still scaled (fused optimizer)
        shards, shard_index = None, None
        if self._shards is not None:
            everything = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
            shards, shard_index = self._shards.layout(optimizer, everything, params)
        norms = grad_norms(grads, inv_scale=inv_scale, shards=shards, shard_index=shard_index)
        self.last_grad_norm = norms.total
        amp_found = None
        if scaler is not None:
            amp_found = (
                amp_state["found_inf"].to(norms.total.device) > 0
                if amp_state is not None and amp_state.get("found_inf") is not None
                else ~torch.isfinite(norms.total)
            )
            if loss_bad is not None:
                loss_bad = loss_bad.to(norms.total.device)
                if trainer.world_size > 1 and torch.distributed.is_initialized():
                    flag = loss_bad.to(torch.int32)
                    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                    loss_bad = flag > 0
        st.moment_t = self._moment_norm(optimizer, inv_scale) if self.track_first_moment else None
        forced = self._rollback.forced or self._quarantine.hit
        # automatic (None): decide on the device where a host read would stall one (CUDA) and the optimizer can be
        # skipped there (fused); on a CPU the host read costs nothing
        sync_free = self.sync_free if self.sync_free is not None else norms.total.device.type != "cpu"
        device_mode = sync_free and fused and not self._skipper.has_fresh_params(optimizer)
        if self.sync_free and not fused and not self._warned_fallback:
            self._warned_fallback = True
            rank_zero_warn(
                f"`GradientGuard(sync_free=True)`: `{type(optimizer).__name__}` is not fused, and a non-fused torch"
                " optimizer can only be skipped from the host, so the guard reads its decision once per step"
                " (pass `fused=True` to the optimizer for a step without host synchronisation)."
            )
        ctx = StepContext(
            trainer, pl_module, optimizer, idx, st, params, grads, norms, amp_found, loss_bad, forced, loss
        )
        if device_mode:
            self._skipper.host_skipped[id(optimizer)] = False
            self._device_step(ctx)
        else:
            self._host_step(ctx)
        if self.pause_schedulers_on_skip:
            self._sched_hold.decided(trainer, optimizer, self._skipper, device_mode)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # keyed by id(optimizer): a later fit may create new optimizers at the same addresses
        self._skipper.clear()
        self._sched_hold.clear()
        self._no_moment.clear()
        self._rollback.teardown()
        self._quarantine.batch_end()
        self._buffers = None
        self._shards = None
        self._loss_sum = self._batch_loss = None

    # ------------------------------------------------------------------------------------------------------------------
    # host-decided step (default)

    def _host_step(self, ctx: StepContext) -> None:
        trainer, pl_module, optimizer, st, norms = ctx.trainer, ctx.pl_module, ctx.optimizer, ctx.state, ctx.norms
        amp_found, loss_bad, loss, forced = ctx.amp_found, ctx.loss_bad, ctx.loss, ctx.forced
        device = norms.total.device
        moment = loss_value = None
        if amp_found is None and loss_bad is None and st.moment_t is None and loss is None:
            norm, amp, lossbad = norms.total.item(), False, False  # the one host read of this step
        else:
            false = torch.zeros((), dtype=torch.float32, device=device)
            packed = torch.stack(
                [
                    norms.total,
                    (amp_found if amp_found is not None else false).to(torch.float32),
                    (loss_bad if loss_bad is not None else false).to(torch.float32),
                    st.moment_t.to(device) if st.moment_t is not None else false,
                    loss.to(device, torch.float32) if loss is not None else false,
                ]
            ).tolist()  # the one host read of this step
            norm, amp, lossbad = packed[0], bool(packed[1]), bool(packed[2])
            moment = packed[3] if st.moment_t is not None else None
            loss_value = packed[4] if loss is not None else None
        loss_stats = st.lstats
        decision = evaluate(
            norm,
            st.stats,
            self._cfg,
            amp_overflow=amp and amp_found is not None,
            nonfinite_loss=lossbad,
            forced=forced,
            loss=loss_value,
            loss_stats=loss_stats,
        )
        g_decision = decision
        moment_thr = None
        if moment is not None and self._cfg_m is not None and decision.action in MOMENT_JUDGED:
            m_decision = evaluate(moment, st.mstats, self._cfg_m)
            st.mstats = update_stats(st.mstats, m_decision, moment, self._cfg_m)
            moment_thr = m_decision.threshold
            decision = combine(decision, m_decision)
        if self.agree_across_ranks and trainer.world_size > 1 and torch.distributed.is_initialized():
            code = torch.tensor(int(decision.action), device=device)
            torch.distributed.all_reduce(code, op=torch.distributed.ReduceOp.MAX)
            decision = Decision(Action(int(code.item())), decision.threshold)
        action = decision.action
        step = trainer.global_step

        if action is Action.CLIP:
            factor = decision.threshold / norm
            for g in ctx.grads:
                g.mul_(factor)
        skipped = action in NOT_STEPPED
        if skipped:
            self._skipper.skip(optimizer, ctx.params, fused=is_fused(optimizer))
            restore_buffers(self._armed_buffers, self._deferred, ctx.idx, True)
        self._skipper.host_skipped[id(optimizer)] = skipped

        # the gradient-norm (and loss) statistics follow the gradient-norm rule's own decision (see `combine`)
        stats_decision = g_decision if action is Action.MOMENT_SPIKE else decision
        st.stats = update_stats(st.stats, stats_decision, norm, self._cfg)
        if loss_value is not None:
            entered = loss_for_stats(loss_value, st.lstats, self._cfg)  # the streak keeps the raw loss
            st.lstats = update_stats(st.lstats, stats_decision, loss_value, self._cfg, ema_value=entered)
        if action in GUARD_SKIPS:
            st.num_skipped += 1
            st.last_skip_step = step
        if action is Action.AMP_OVERFLOW:
            st.num_amp_overflows += 1
        if action is Action.CLIP:
            st.num_clipped += 1
        if action is Action.REBASE:
            st.num_rebased += 1
        if action in STEPPED:
            st.consecutive = 0
            st.consecutive_amp = 0
        else:
            # inside the skip window after a rollback every step is skipped anyway: a bad batch there is not new
            # trouble (counting it would roll back again to the same snapshot and burn `max_rollbacks`)
            st.consecutive += action in TROUBLE and not forced
            st.consecutive_amp += action is Action.AMP_OVERFLOW

        self.event_log.trace("grad_norm", step, norm)
        if moment is not None:
            self.event_log.trace("first_moment_norm", step, moment)
        if action is not Action.ACCEPT:
            per_tensor = norms.per_tensor.tolist()
            data = diagnose(
                ctx.params, self._param_names, per_tensor, action, norm, decision.threshold, self.diagnose_top_k
            )
            if moment is not None:
                data["first_moment_norm"] = moment
                if moment_thr is not None:
                    data["first_moment_threshold"] = moment_thr
            reason = decision.reason
            if forced and self._quarantine.hit:
                data["quarantined"] = True
                if action is Action.FORCED:
                    epoch, batch_idx = self._quarantine.current
                    data["cause"] = "quarantined"
                    reason = f"skipping a quarantined batch (epoch {epoch}, batch {batch_idx})"
            if loss_value is not None:
                data.update(loss_evidence(loss_value, loss_stats, self._cfg))
                data["loss_confirmed"] = self._cfg.loss_zscore is not None and loss_confirms(
                    loss_value, loss_stats, self._cfg, norm, decision.threshold
                )
                if data["loss_confirmed"] and action in (Action.SPIKE, Action.CLIP, Action.REBASE):
                    reason += f", with the loss {data['loss_zscore']:.1f} standard deviations off its running mean"
            kinds = {Action.AMP_OVERFLOW: "amp_overflow", Action.CLIP: "clip", Action.REBASE: "rebase"}
            kind = kinds.get(action, "skip")
            self.event_log.add(step, kind, reason, **data)
            if action in GUARD_SKIPS:
                self._warn(step, f"GradientGuard skipped step {step}: {reason}. {describe(data)}", action)
            elif action is Action.REBASE:
                self._warn(
                    step,
                    f"GradientGuard: {self.zscore_rebase_after} gradient-norm spikes in a row at step {step}: taken"
                    f" as a level shift; the z-score statistics restart from them (mean {st.stats.mean:.4g}).",
                    action,
                )

        # a non-finite step may come from weights that are themselves corrupted (a stray in-place write, an update
        # that overflowed): skipping cannot repair them, and every checkpoint written from now on would hold them
        corrupted = action is Action.NONFINITE and not state_is_finite(trainer, pl_module)
        accepted = action in STEPPED
        self._last_host = (norm, decision.threshold, moment)
        self._quarantine.note(action, forced)
        rollbacks = self._rollback.num_rollbacks
        self._rollback.after_decision(trainer, pl_module, self._opt_states, st, accepted=accepted, corrupted=corrupted)
        if self._rollback.num_rollbacks > rollbacks:
            self._after_rollback(ctx)
        if (step + 1) % self._log_every == 0:
            thr = decision.threshold if decision.threshold is not None else None
            self._log(pl_module, norm, thr, moment)

    # ------------------------------------------------------------------------------------------------------------------
    # device-decided step (sync_free=True with a fused optimizer)

    def _device_step(self, ctx: StepContext) -> None:
        trainer, optimizer, st, norms, loss = ctx.trainer, ctx.optimizer, ctx.state, ctx.norms, ctx.loss
        device = norms.total.device
        if st.to_device(device):  # device state just built from the host numbers (first step, or a new device)
            self._last_read[id(st)] = st.host_counters()
        loss = loss.to(device, torch.float32) if loss is not None else None
        code, thr = evaluate_on_device(
            norms.total,
            st.stats_t,
            self._cfg,
            amp_overflow=ctx.amp_found,
            nonfinite_loss=ctx.loss_bad,
            forced=ctx.forced,
            loss=loss,
            loss_stats=st.lstats_t,
        )
        if st.moment_t is not None and self._cfg_m is not None:
            moment = st.moment_t.to(device)
            m_code, m_thr = evaluate_on_device(moment, st.mstats_t, self._cfg_m)
            m_new = update_stats_on_device(st.mstats_t, m_code, moment, m_thr, self._cfg_m)
            st.mstats_t = torch.where(judged_on_device(code), m_new, st.mstats_t)
            g_code, code = code, combine_on_device(code, m_code)
        else:
            g_code = code
        if self.agree_across_ranks and trainer.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(code, op=torch.distributed.ReduceOp.MAX)
        if self._cfg.clip:
            factor = torch.where(code == int(Action.CLIP), thr / norms.total, 1.0)
            torch._foreach_mul_(ctx.grads, factor)
        not_stepped = code >= int(Action.FORCED)
        self._skipper.set_found_inf(optimizer, not_stepped.to(torch.float32))
        restore_buffers(self._armed_buffers, self._deferred, ctx.idx, not_stepped)
        stats_code = torch.where(code == int(Action.MOMENT_SPIKE), g_code, code)  # see `combine`
        st.stats_t = update_stats_on_device(st.stats_t, stats_code, norms.total, thr, self._cfg)
        if loss is not None:
            entered = loss_for_stats_on_device(loss, st.lstats_t, self._cfg)  # the streak keeps the raw loss
            st.lstats_t = update_stats_on_device(st.lstats_t, stats_code, loss, loss, self._cfg, ema_value=entered)
        guard_skip = not_stepped & (code != int(Action.AMP_OVERFLOW))
        amp = code == int(Action.AMP_OVERFLOW)
        trouble = guard_skip & (code != int(Action.FORCED)) & (not ctx.forced)  # see _host_step
        accepted = ~not_stepped
        c = Counters(*st.counters_t.unbind())
        st.counters_t = torch.stack(
            Counters(
                num_skipped=c.num_skipped + guard_skip,
                num_amp_overflows=c.num_amp_overflows + amp,
                num_clipped=c.num_clipped + (code == int(Action.CLIP)),
                consecutive=torch.where(accepted, 0, c.consecutive + trouble),
                consecutive_amp=torch.where(accepted, 0, c.consecutive_amp + amp),
                last_skip_step=torch.where(guard_skip, trainer.global_step, c.last_skip_step),
                num_rebased=c.num_rebased + (code == int(Action.REBASE)),
            )
        )
        st.last_code_t = code
        st.last_thr_t = thr
        self._quarantine.note_on_device(code, ctx.forced)
        st.last_skip_code_t = torch.where(not_stepped, code, st.last_skip_code_t)
        if st.last_skip_norms_t is not None and st.last_skip_norms_t.shape == norms.per_tensor.shape:
            st.last_skip_norms_t = torch.where(not_stepped, norms.per_tensor, st.last_skip_norms_t)
        else:
            st.last_skip_norms_t = torch.where(not_stepped, norms.per_tensor, torch.zeros_like(norms.per_tensor))
        if (trainer.global_step + 1) % self._log_every == 0:
            self._sync_point(ctx)

    def _sync_point(self, ctx: StepContext) -> None:
        """Sync-free mode: the host reads the device state (once per ``log_every_n_steps`` steps) and acts on it."""
        trainer, pl_module, st, norms = ctx.trainer, ctx.pl_module, ctx.state, ctx.norms
        codes = self._quarantine.pending_codes()  # the decisions since the last read, for the quarantine's streak
        values = torch.cat(
            [
                torch.stack(codes).to(norms.total.device, torch.float64) if codes else st.counters_t[:0].double(),
                st.counters_t.to(torch.float64),
                st.stats_t.to(torch.float64),
                torch.stack([norms.total, st.last_thr_t]).to(torch.float64),
                st.last_code_t.reshape(1).to(torch.float64),
                st.last_skip_code_t.reshape(1).to(torch.float64),
                (st.moment_t if st.moment_t is not None else st.last_thr_t).reshape(1).to(torch.float64),
            ]
        ).tolist()
        self._quarantine.settle(values[: len(codes)])
        values = values[len(codes) :]
        moment = values[-1] if st.moment_t is not None else None
        nc, ns = len(COUNTERS), NormStats.SIZE
        counters = Counters(*(int(v) for v in values[:nc]))
        norm, thr = values[nc + ns], values[nc + ns + 1]
        code, last_skip_code = Action(int(values[nc + ns + 2])), Action(int(values[nc + ns + 3]))
        before = self._last_read.get(id(st), Counters())
        self._last_read[id(st)] = counters
        new_skips = counters.num_skipped - before.num_skipped
        new_amp = counters.num_amp_overflows - before.num_amp_overflows
        new_rebases = counters.num_rebased - before.num_rebased
        step = trainer.global_step
        self.event_log.trace("grad_norm", step, norm)
        if moment is not None:
            self.event_log.trace("first_moment_norm", step, moment)
        if new_rebases > 0:
            self.event_log.add(
                step, "rebase", f"{new_rebases} level shift(s) since the last read", cause="rebase", norm=norm
            )
        if new_skips > 0 or new_amp > 0:
            per_tensor = st.last_skip_norms_t.tolist()
            last_norm = math.sqrt(sum(v * v for v in per_tensor))  # the last skipped step's total norm
            top_k = self.diagnose_top_k
            data = diagnose(ctx.params, self._param_names, per_tensor, last_skip_code, last_norm, None, top_k)
            data.update(new_skips=new_skips, new_amp_overflows=new_amp, last_skip_step=counters.last_skip_step)
            kind = "amp_overflow" if new_skips == 0 else "skip"
            reason = (
                f"{new_skips} skip(s), {new_amp} AMP overflow(s) since the last read; last: {REASONS[last_skip_code]}"
            )
            self.event_log.add(step, kind, reason, **data)
            if new_skips > 0:
                self._warn(step, f"GradientGuard: {reason}. {describe(data)}", last_skip_code)
        # mirror the host numbers so persistent trouble and snapshots use the same code as the host path
        st.consecutive, st.consecutive_amp = counters.consecutive, counters.consecutive_amp
        accepted = code in STEPPED
        if self._rollback.check_persistent(trainer, pl_module, self._opt_states, st):
            ones = torch.ones((), dtype=torch.float32, device=norms.total.device)
            self._skipper.set_found_inf(ctx.optimizer, ones)
            self._after_rollback(ctx)
        elif accepted:
            # the steps since the last read that were neither skipped nor overflowed were accepted
            self._rollback.count_accepted(max(self._log_every - new_skips - new_amp, 0))
        self._log(pl_module, norm, thr if math.isfinite(thr) else None, moment)

    # ------------------------------------------------------------------------------------------------------------------
    # after a rollback: replay the batch, quarantine

    def _after_rollback(self, ctx: StepContext) -> None:
        """Replay the batch of the step that triggered the rollback from the restored state (``guard._replay``), say
        in a ``"replay"`` event whether the trouble came back with it (``"data"``) or not (``"state"``), and
        quarantine the batches of the streak unless the state was to blame (``guard._quarantine``)."""
        trainer, pl_module = ctx.trainer, ctx.pl_module
        q = self._quarantine
        streak = q.take_streak()
        snap = self._rollback.snapshot
        step = trainer.global_step
        why = unavailable_reason(pl_module, q.batch, self._shards is not None)
        result = why
        if why is None:
            result = replay(trainer, pl_module, ctx.optimizer, q.batch, q.batch_idx)
            # the snapshot once more: whatever `training_step` changed in place (a parameter it normalises or clamps,
            # a buffer outside the `state_dict`) is undone; the replay itself restored the gradients and buffers
            self._rollback.finish(trainer, pl_module, self._opt_states)
        where = "" if q.current is None else f" (epoch {q.current[0]}, batch {q.current[1]})"
        data: dict[str, Any] = {
            "position": None if q.current is None else list(q.current),
            "to_step": None if snap is None else snap.step,
        }
        if isinstance(result, Replayed):
            st = self._opt_states.get(ctx.idx, ctx.state)  # the statistics restored with the snapshot
            loss_stats = st.lstats if self._cfg.loss_zscore is not None else None
            decision = evaluate(result.norm, st.stats, self._cfg, loss=result.loss, loss_stats=loss_stats)
            came_back = not (math.isfinite(result.norm) and math.isfinite(result.loss))
            came_back = came_back or decision.action is not Action.ACCEPT
            cause = "data" if came_back else "state"
            data.update(norm=result.norm, loss=result.loss, threshold=decision.threshold)
            data["rule"] = decision.action.name.lower()  # what the guard's rule says of the replayed step
            measured = f"gradient norm {result.norm:.4g}, loss {result.loss:.4g}"
            if came_back:
                reason = (
                    f"the batch of step {step}{where} replayed from the restored state: {measured}"
                    f" ({REASONS[decision.action]}): the trouble came back with the batch (a data problem)"
                )
            else:
                reason = (
                    f"the batch of step {step}{where} replayed from the restored state: {measured}, accepted by the"
                    " rule: the trouble did not come back with it (the state at that point: the learning rate or the"
                    " weights)"
                )
        else:
            cause = "unavailable"
            data["why"] = result
            reason = f"the batch of step {step}{where} was not replayed: {result}"
        quarantined = streak if q.enabled and cause != "state" else []
        q.add(quarantined)
        data["batches"] = [list(p) for p in streak]
        data["quarantined"] = [list(p) for p in quarantined]
        if quarantined:
            listed = ", ".join(f"({e}, {b})" for e, b in quarantined)
            reason += f"; quarantined (epoch, batch) {listed}"
        self.event_log.add(step, "replay", reason, cause=cause, **data)
        rank_zero_warn(f"GradientGuard: {reason}.")

    # ------------------------------------------------------------------------------------------------------------------
    # shared pieces

    def _step_loss(self, trainer: pl.Trainer) -> Tensor | None:
        """The loss of this optimizer step (``None`` without ``loss_zscore``, or when no backward went through
        Lightning): the backward passes since the last optimizer step, else the last loss of this batch (a second
        optimizer stepped on the same backward), averaged over ranks (one collective on the device)."""
        if self._cfg.loss_zscore is None:
            return None
        loss, self._loss_sum = self._loss_sum, None
        if loss is None:
            return self._batch_loss
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            loss = loss.clone()
            torch.distributed.all_reduce(loss)
            loss = loss / trainer.world_size
        self._batch_loss = loss
        return loss

    def _moment_norm(self, optimizer: torch.optim.Optimizer, inv_scale: Tensor | None) -> Tensor | None:
        if id(optimizer) in self._no_moment:
            return None
        if not has_first_moment(optimizer):
            self._no_moment.add(id(optimizer))
            rank_zero_warn(
                f"`GradientGuard(track_first_moment=True)`: `{type(optimizer).__name__}` keeps no Adam first moment"
                " (`betas` / `exp_avg`): the first-moment signal is off for it."
            )
            return None
        return first_moment_norm(optimizer, inv_scale=inv_scale, process_group=self._process_group)

    def _warn(self, step: int, message: str, kind: Action | None = None) -> None:
        """A rank-zero warning at most every ``warn_every_n_steps`` steps, except that the first one of a new kind
        of skip (non-finite, spike, over ``max_norm``...) is always announced."""
        new_kind = kind is not None and int(kind) not in self._warned_reasons
        if not new_kind and self._last_warn_step is not None and step - self._last_warn_step < self.warn_every_n_steps:
            return
        if kind is not None:
            self._warned_reasons.add(int(kind))
        self._last_warn_step = step
        rank_zero_warn(message)

    def _log(self, pl_module: pl.LightningModule, norm: float, thr: float | None, moment: float | None = None) -> None:
        log_guard(self, pl_module.trainer, norm, thr, moment)


__all__ = ["GradientGuard"]
