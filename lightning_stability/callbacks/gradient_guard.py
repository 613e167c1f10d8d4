"""``GradientGuard``: skip optimizer steps whose gradients are non-finite, too large or a spike, for real.

Lightning gives a callback no way to veto ``optimizer.step`` (Lightning issues #4956, #5152), and returning ``None``
from ``training_step`` under DDP hangs because ranks disagree (#5243). The guard works in
``on_before_optimizer_step``, which runs after backward (gradients accumulated and, under fp16 AMP with a non-fused
optimizer, unscaled) and before Lightning's gradient clipping and the step, for automatic and manual optimization.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_stability.callbacks._events import EventLog
from lightning_stability.callbacks._guard_moments import first_moment_norm, has_first_moment
from lightning_stability.callbacks._guard_norm import all_finite, collect_grads, grad_norms, layer_norms
from lightning_stability.callbacks._guard_policy import (
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
    update_stats,
    update_stats_on_device,
)
from lightning_stability.callbacks._guard_state import (
    BufferSelector,
    BufferSnapshot,
    TrainingSnapshot,
    select_buffers,
)
from lightning_stability.callbacks._logging import log_scalars
from lightning_stability.callbacks._sharding import ShardReducer
from lightning_stability.callbacks._state_key import cached_state_key

_ON_PERSISTENT = ("rollback", "stop", "raise")
_SPIKE_ACTIONS = ("skip", "clip")
_SNAPSHOT_DEVICES = ("cpu", "same")
# counters kept per optimizer, in this order in the device vector of sync-free mode
_COUNTERS = ("num_skipped", "num_amp_overflows", "num_clipped", "consecutive", "consecutive_amp", "last_skip_step",
             "num_rebased")  # fmt: skip
#: ``state_dict()["version"]``: 1 in 0.1.0 (no streak statistics, no ``num_rebased``; still loads), 2 since
_STATE_VERSION = 2
_STATS_KEYS = ("mean", "var", "count", "streak_mean", "streak_var", "streak_count")


@dataclass
class _OptimizerState:
    """What the guard remembers about one optimizer (host numbers, or device tensors in sync-free mode)."""

    stats: NormStats = field(default_factory=NormStats)
    num_skipped: int = 0
    num_amp_overflows: int = 0
    num_clipped: int = 0
    consecutive: int = 0
    consecutive_amp: int = 0
    last_skip_step: int = -1
    num_rebased: int = 0
    # sync-free mode only
    stats_t: Tensor | None = None  # float32, NormStats.as_list()
    counters_t: Tensor | None = None  # int64, see _COUNTERS
    last_code_t: Tensor | None = None
    last_skip_code_t: Tensor | None = None
    last_skip_norms_t: Tensor | None = None  # per-tensor norms of the last skipped step, for a deferred diagnosis
    last_thr_t: Tensor | None = None
    # first-moment signal (track_first_moment / first_moment_zscore)
    mstats: NormStats = field(default_factory=NormStats)
    mstats_t: Tensor | None = None
    moment_t: Tensor | None = None  # this step's first-moment norm (0-dim, device)

    def host_counters(self) -> list[int]:
        return [self.num_skipped, self.num_amp_overflows, self.num_clipped, self.consecutive, self.consecutive_amp,
                self.last_skip_step, self.num_rebased]  # fmt: skip


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int{' or None' if allow_none else ''}, got {value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}")


def _check_positive(name: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a positive number or None, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}")


def _filled(values: list[float] | list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A device tensor holding ``values``, written with ``fill_`` kernels (no host-to-device copy, no sync)."""
    out = torch.empty(len(values), dtype=dtype, device=device)
    for i, v in enumerate(values):
        out[i].fill_(v)
    return out


def _is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """Optimizers that accept ``found_inf`` / ``grad_scale`` tensors and skip on the device (fused Adam/AdamW/SGD)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


class GradientGuard(Callback):
    r"""Decide, per optimizer step, whether the step may proceed; skip it for real when it may not.

    **Measure.** The total L2 norm of the optimizer's gradients, ``torch._foreach_norm`` per (device, dtype) group,
    accumulated in float32 (fp16/bf16 gradients cannot overflow it). Under sharded strategies (``ModelParallelStrategy``
    with FSDP2 ``fully_shard`` or tensor parallelism, ``FSDPStrategy``) each rank holds a shard of every gradient, some
    empty: the per-parameter squared norms of the local shards are all-reduced as one vector (one collective, on the
    device), so the per-parameter norms of the diagnosis and the total are those of the whole gradients and are
    identical on every rank, and a NaN/inf in any rank's shard skips the step on every rank (see
    ``_sharding.ShardLayout``). Buffer copies and rollback snapshots then hold each rank's own shards.

    **Decide** (most severe first; the pure rule is in ``_guard_policy.evaluate``):

    - non-finite norm: skip (``"nonfinite"``). Under fp16 AMP, an overflow that ``GradScaler`` found while the loss was
      finite is its normal calibration: counted in ``num_amp_overflows`` / ``guard/amp_overflows``, not as a skip; the
      scaler skips that step itself and backs off its scale (its bookkeeping is never touched).
    - ``max_norm``: skip a step whose norm exceeds this fixed bound.
    - ``zscore``: a step whose norm exceeds ``mean + zscore * std`` of the *accepted* norms, after ``zscore_warmup``
      accepted steps, is a spike; ``spike_action="skip"`` skips it, ``"clip"`` scales the gradients down to the
      threshold. Statistics: exact mean/variance during the warm-up, then EMA with ``zscore_alpha`` (ZClip: 0.97, 2.5,
      25). They live in ``state_dict`` so a resumed run makes the same decisions (ZClip itself re-warms).
    - level shifts (``zscore_rebase_after``, default 8): spikes never enter the statistics, so a burst of them cannot
      raise its own threshold; but when ``zscore_rebase_after`` finite spikes come *in a row*, the gradient scale has
      moved for good (a loss weight switched from 1 to 4, the end of a learning-rate warm-up): that step is taken
      (``guard/rebases``, a ``"rebase"`` event) and the statistics restart from the streak (its mean, and the larger
      of its variance and the old relative spread carried to the new level). A healthy level shift therefore costs
      ``zscore_rebase_after - 1`` skipped steps instead of stalling the run into ``on_persistent``; the price is that
      a burst of that many consecutive finite spikes becomes the baseline too (OLMo-core's window makes the same
      trade). Non-finite norms never enter any statistics and are always skipped; ``max_norm`` bounds every step;
      an accepted step ends a streak, non-finite / ``max_norm`` / forced steps neither end nor extend it. With
      ``max_consecutive_skips <= zscore_rebase_after - 1`` persistent trouble fires first. ``None``: outliers never
      enter (the 0.1.0 rule, which stalls on a level shift). The rule is in ``_guard_policy``.

    **Skip.** A skip sets every gradient of the optimizer to ``None``: torch optimizers then leave those parameters
    entirely alone (no moment update, no step count, no weight decay). Zeroing gradients would not be a skip (Adam's
    momentum still moves the weights). Fused optimizers (``fused=True``) are skipped through their ``found_inf`` tensor
    instead (the mechanism GradScaler uses, OR-ed with the scaler's own flag, never replacing it); the kernel skips on
    the device and reverts its step counts. Lightning's ``gradient_clip_val`` clipping runs after the guard and is a
    no-op on a skipped step. ``trainer.global_step`` still advances (``optimizer.step`` was called).

    **Buffers** (``protect_buffers``). Some state changes in the forward pass: BatchNorm statistics, EMA codebooks,
    spectral norm's power-iteration vectors ``_u``/``_v``. At the first batch of every optimizer step the selected
    buffers are copied into preallocated storage (foreach copies, cost proportional to the buffers); when the step is
    not taken (guard skip or AMP overflow) they are copied back. With gradient accumulation the copy is taken before
    the *first* micro-batch, so a skip discards the buffer updates of every micro-batch of that step. In manual
    optimization the copy is taken at the start of the first batch after the last batch that stepped; a skip of any
    optimizer in a batch restores every selected buffer to that copy (so with two optimizers, the other network's
    buffer updates of that batch are undone too). ``True`` (default) selects every buffer of the LightningModule,
    integer ones included (``num_batches_tracked``), so a skipped step is bit-identical; a glob pattern (or a list), or
    a callable ``(name, buffer) -> bool``, selects fewer; ``False`` none.

    **Persistent trouble.** After ``max_consecutive_skips`` guard skips in a row (AMP overflows neither count nor
    reset the run; ``max_consecutive_amp_overflows`` overflows in a row, a collapsing loss scale, count as trouble
    too), ``on_persistent`` acts:

    - ``"rollback"``: restore the in-memory snapshot of the LightningModule (``state_dict``) and every optimizer
      (``state_dict``), taken at the start of training and then after every ``snapshot_every`` accepted steps, at a
      step with no pending skip; then skip the optimizer steps of the next ``skip_batches_after_rollback`` batches.
      Memory: parameters + buffers + optimizer state (3x the parameters with Adam), on the CPU by default
      (``snapshot_device="same"``: on the parameters' device). The guard's running statistics roll back with it;
      learning-rate schedulers and the GradScaler do not. After ``max_rollbacks`` rollbacks the run stops instead.
      The snapshot is not written to checkpoints: after a resume the first snapshot is the resumed state.
    - ``"stop"``: ``trainer.should_stop = True``: the run ends cleanly after this batch. Skipped steps never changed the
      parameters, so the state that checkpoints save is the last good one.
    - ``"raise"``: ``RuntimeError`` with the diagnosis.

    **Corrupted weights.** A non-finite step whose parameters or optimizer state are themselves non-finite (a stray
    in-place write, an update that overflowed; checked with one max-abs reduction per non-finite step, host mode only)
    is persistent trouble at once, since no skip can repair it: ``"rollback"`` rolls back immediately (rollback
    snapshots are only ever taken of a finite state); ``"stop"`` (or ``"rollback"`` without a snapshot or with
    ``max_rollbacks`` spent) raises ``RuntimeError`` instead of stopping cleanly, because a clean end would let
    checkpoint callbacks save the corrupted weights over the last good checkpoint.

    **Diagnosis.** On a skipped step an event (``"skip"``, ``"amp_overflow"``, ``"rollback"``, ``"stop"``...) goes to
    ``event_log`` with the reason, the norm, the parameters whose gradient norm is non-finite (module paths) and the
    ``diagnose_top_k`` layers with the largest norms; a rank-zero warning says the same at most once every
    ``warn_every_n_steps`` steps.

    **Ranks.** The decision is a deterministic function of the gradients, which DDP has already all-reduced (so an
    inf on one rank is an inf on every rank) and of state every rank updates identically; rank-local inputs (the loss
    flag under fp16 AMP) and sharded norms are all-reduced on the device. ``agree_across_ranks=True`` additionally
    all-reduces (MAX) the decision itself every step.

    **Sync-free mode** (``sync_free=True``). With a fused optimizer the whole decision stays on the device: norm,
    statistics, counters and the buffer restore (``torch.where``) are tensors, and the skip is the optimizer's
    ``found_inf``; nothing is read back to the host except every ``log_every_n_steps`` steps, where counters are read,
    events and warnings are emitted (the diagnosis describes the most recent skip), metrics are logged, snapshots are
    taken and persistent trouble is acted on (so a rollback/stop/raise may come up to ``log_every_n_steps`` steps
    late; every step in between is still skipped or accepted correctly). Non-fused optimizers can only be skipped from
    the host (``p.grad = None``): for them sync-free mode falls back to one host read of the decision per step (a
    warning says so once). The first step of a fused optimizer is also decided on the host: its kernel initialises
    the state of new parameters even on a skipped step (torch's fused SGD even leaves an uninitialised momentum
    buffer), which the guard then removes.

    **First moment** (``track_first_moment``, ``first_moment_zscore``; Adam-family optimizers). Marin's 32B runs saw
    Adam update-norm spikes (the first moment doubling, the second moment flat) before loss spikes. With
    ``track_first_moment=True`` the guard computes, on the device and before the step, the norm of the first moment
    this step would write, ``||beta1 * exp_avg + (1 - beta1) * grad||``, logs it as ``guard/first_moment_norm`` and
    traces it in ``event_log`` (host mode: read in the same transfer as the gradient norm, no extra host read;
    sync-free mode: read at the ``log_every_n_steps`` sync point). Cost: a foreach lerp into temporaries the size of
    the gradients and a foreach norm per step. ``first_moment_zscore`` acts on it: a second, independent z-score
    detector with its own statistics (same ``zscore_alpha``, ``zscore_warmup`` and ``zscore_rebase_after`` rule), and
    a step it flags is skipped (``"moment_spike"``) even when the gradient-norm rule would take it. It is judged only
    on steps whose gradient norm is finite, within ``max_norm`` and not forced. An optimizer without ``betas`` /
    ``exp_avg`` (SGD) has no first moment: a warning says so once and the signal is off for it.

    **Logs** (every ``log_every_n_steps`` optimizer steps, default: the Trainer's): ``guard/grad_norm``,
    ``guard/skipped`` (cumulative), ``guard/consecutive_skips``, ``guard/rollbacks``, ``guard/amp_overflows`` and,
    with ``zscore``, ``guard/threshold`` and ``guard/rebases`` (cumulative).

    Args:
        max_norm: skip steps whose total gradient norm exceeds this (``None``: no fixed bound).
        zscore: spike threshold in standard deviations above the running mean (``None``: off; ZClip uses 2.5).
        zscore_alpha: EMA factor of the running statistics after the warm-up, in (0, 1).
        zscore_warmup: accepted steps before spikes are detected (>= 1).
        zscore_rebase_after: consecutive finite spikes after which the statistics restart from them (>= 2; ``None``:
            never), see above.
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
        sync_free: decide on the device, see above.
        protect_buffers: which buffers a skip restores, see above.
        log_every_n_steps: logging (and, in sync-free mode, host read) interval; ``None``: the Trainer's.
        warn_every_n_steps: minimum number of steps between two rank-zero warnings.
        diagnose_top_k: layers listed in a diagnosis.
        agree_across_ranks: all-reduce the decision every step (only needed for exotic strategies).

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
        zscore_rebase_after: int | None = 8,
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
        sync_free: bool = False,
        protect_buffers: BufferSelector = True,
        log_every_n_steps: int | None = None,
        warn_every_n_steps: int = 100,
        diagnose_top_k: int = 5,
        agree_across_ranks: bool = False,
    ) -> None:
        _check_positive("max_norm", max_norm)
        _check_positive("zscore", zscore)
        if isinstance(zscore_alpha, bool) or not isinstance(zscore_alpha, (int, float)):
            raise TypeError(f"`zscore_alpha` must be a number in (0, 1), got {zscore_alpha!r}")
        if not 0.0 < zscore_alpha < 1.0:
            raise ValueError(f"`zscore_alpha` must be in (0, 1), got {zscore_alpha!r}")
        _check_int("zscore_warmup", zscore_warmup, 1)
        _check_int("zscore_rebase_after", zscore_rebase_after, 2, allow_none=True)
        if not isinstance(track_first_moment, bool):
            raise TypeError(f"`track_first_moment` must be a bool, got {track_first_moment!r}")
        _check_positive("first_moment_zscore", first_moment_zscore)
        if spike_action not in _SPIKE_ACTIONS:
            raise ValueError(f"`spike_action` must be one of {_SPIKE_ACTIONS}, got {spike_action!r}")
        if spike_action == "clip" and zscore is None:
            raise ValueError("`spike_action='clip'` needs `zscore` (the threshold it clips to), got zscore=None")
        _check_int("max_consecutive_skips", max_consecutive_skips, 1, allow_none=True)
        _check_int("max_consecutive_amp_overflows", max_consecutive_amp_overflows, 1, allow_none=True)
        if on_persistent not in _ON_PERSISTENT:
            raise ValueError(f"`on_persistent` must be one of {_ON_PERSISTENT}, got {on_persistent!r}")
        _check_int("snapshot_every", snapshot_every, 1)
        if snapshot_device not in _SNAPSHOT_DEVICES:
            raise ValueError(f"`snapshot_device` must be one of {_SNAPSHOT_DEVICES}, got {snapshot_device!r}")
        _check_int("skip_batches_after_rollback", skip_batches_after_rollback, 0)
        _check_int("max_rollbacks", max_rollbacks, 0)
        if not isinstance(sync_free, bool):
            raise TypeError(f"`sync_free` must be a bool, got {sync_free!r}")
        if not (
            isinstance(protect_buffers, (bool, str))
            or callable(protect_buffers)
            or (isinstance(protect_buffers, Sequence) and all(isinstance(p, str) for p in protect_buffers))
        ):
            raise TypeError(
                "`protect_buffers` must be a bool, a glob pattern, a list of patterns or a callable"
                f" (name, buffer) -> bool, got {protect_buffers!r}"
            )
        _check_int("log_every_n_steps", log_every_n_steps, 1, allow_none=True)
        _check_int("warn_every_n_steps", warn_every_n_steps, 1)
        _check_int("diagnose_top_k", diagnose_top_k, 1)
        if not isinstance(agree_across_ranks, bool):
            raise TypeError(f"`agree_across_ranks` must be a bool, got {agree_across_ranks!r}")

        self.max_norm = None if max_norm is None else float(max_norm)
        self.zscore = None if zscore is None else float(zscore)
        self.zscore_alpha = float(zscore_alpha)
        self.zscore_warmup = zscore_warmup
        self.zscore_rebase_after = zscore_rebase_after
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
        self._cfg = PolicyConfig(
            self.max_norm, self.zscore, self.zscore_alpha, zscore_warmup, spike_action == "clip", zscore_rebase_after
        )
        self._cfg_m = None  # the first-moment detector: its own z-score, the same EMA, warm-up and rebase rule
        if self.first_moment_zscore is not None:
            self._cfg_m = PolicyConfig(
                None, self.first_moment_zscore, self.zscore_alpha, zscore_warmup, False, zscore_rebase_after
            )
        self._no_moment: set[int] = set()  # optimizers without a first moment (warned once)

        self.event_log = EventLog(source=self.state_key)
        self.num_rollbacks = 0
        self.last_grad_norm: Tensor | None = None
        self._opt_states: dict[int, _OptimizerState] = {}
        self._skip_remaining = 0
        self._rolled_back_this_batch = False
        self._good_since_snapshot = 0
        self._snapshot_due = False
        self._snapshot: TrainingSnapshot | None = None
        self._last_warn_step: int | None = None
        self._buffers: BufferSnapshot | None = None
        self._buffers_armed = False
        self._stepped_this_batch = False
        self._param_names: dict[int, str] = {}
        self._loss_bad: Tensor | None = None
        self._pending_found_inf: dict[int, Tensor] = {}
        self._we_set_found_inf: dict[int, bool] = {}
        self._fresh: dict[int, list[Tensor]] = {}
        self._initialized: set[int] = set()
        self._host_skipped: dict[int, bool] = {}
        self._hook_handles: list[Any] = []
        self._hooked: set[int] = set()
        self._warned_fallback = False
        self._log_every = 50
        self._last_read: dict[int, list[int]] = {}
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
        return sum(self._read(s)[0] for s in self._opt_states.values())

    @property
    def num_amp_overflows(self) -> int:
        return sum(self._read(s)[1] for s in self._opt_states.values())

    @property
    def num_clipped(self) -> int:
        return sum(self._read(s)[2] for s in self._opt_states.values())

    @property
    def num_rebased(self) -> int:
        """Level shifts: steps at which a streak of ``zscore_rebase_after`` spikes became the new baseline."""
        return sum(self._read(s)[6] for s in self._opt_states.values())

    @property
    def consecutive_skips(self) -> int:
        return max((self._read(s)[3] for s in self._opt_states.values()), default=0)

    @staticmethod
    def _read(st: _OptimizerState) -> list[int]:
        if st.counters_t is not None:
            return [int(v) for v in st.counters_t.tolist()]
        return st.host_counters()

    @override
    def state_dict(self) -> dict[str, Any]:
        optimizers = {}
        for idx, st in self._opt_states.items():
            values = st.stats_t.tolist() if st.stats_t is not None else st.stats.as_list()
            stats = dict(zip(_STATS_KEYS, values))
            for key in ("count", "streak_count"):
                stats[key] = int(stats[key])
            optimizers[idx] = {"stats": stats, "counters": dict(zip(_COUNTERS, self._read(st)))}
            if self._cfg_m is not None:
                values = st.mstats_t.tolist() if st.mstats_t is not None else st.mstats.as_list()
                optimizers[idx]["first_moment_stats"] = dict(zip(_STATS_KEYS, values))
        return {
            "version": _STATE_VERSION,
            "optimizers": optimizers,
            "num_rollbacks": self.num_rollbacks,
            "skip_remaining": self._skip_remaining,
            "good_since_snapshot": self._good_since_snapshot,
            "last_warn_step": self._last_warn_step,
            "event_log": self.event_log.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version")
        if version not in (1, _STATE_VERSION):
            raise ValueError(
                f"`GradientGuard` state has version {version!r}; this release reads versions 1 (0.1.0) and"
                f" {_STATE_VERSION}. Was the checkpoint written by a newer lightning_stability?"
            )
        self._opt_states = {}
        for idx, saved in state_dict["optimizers"].items():
            st = _OptimizerState()
            s = saved["stats"]
            # version 1 has no streak and no rebase counter: an empty streak, no rebases so far
            st.stats = NormStats.from_list([s.get(k, 0.0) for k in _STATS_KEYS])
            for name in _COUNTERS:
                setattr(st, name, int(saved["counters"].get(name, 0)))
            if "first_moment_stats" in saved:
                st.mstats = NormStats.from_list([saved["first_moment_stats"][k] for k in _STATS_KEYS])
            self._opt_states[int(idx)] = st
        self.num_rollbacks = int(state_dict["num_rollbacks"])
        self._skip_remaining = int(state_dict["skip_remaining"])
        self._good_since_snapshot = int(state_dict["good_since_snapshot"])
        self._last_warn_step = state_dict["last_warn_step"]
        self.event_log.load_state_dict(state_dict["event_log"])

    # ------------------------------------------------------------------------------------------------------------------
    # hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if "deepspeed" in type(trainer.strategy).__name__.lower():
            raise RuntimeError(
                f"`GradientGuard` does not support `{type(trainer.strategy).__name__}`: DeepSpeed partitions gradients"
                " and skips overflow steps itself."
            )
        self._log_every = self.log_every_n_steps or trainer.log_every_n_steps or 50

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the precision plugin and the strategy are fixed from here on: look them up once, not every step
        self._active_scaler = self._scaler(trainer)
        self._shards = ShardReducer.for_trainer(trainer)  # None unless parameters are sharded (FSDP, DTensor)
        # a plain SUM over every rank: right for sums over data-parallel shards only; `self._shards` handles any mesh
        self._process_group = torch.distributed.group.WORLD if self._shards is not None else None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._param_names = {id(p): name for name, p in pl_module.named_parameters()}
        self._buffers = None
        if self.protect_buffers is not False:
            entries = select_buffers(pl_module, self.protect_buffers)
            self._buffers = BufferSnapshot(entries) if entries else None
        self._buffers_armed = False
        self._snapshot = None
        if self.on_persistent == "rollback":
            self._take_snapshot(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._snapshot_due:
            self._take_snapshot(trainer, pl_module)
        if self._buffers is not None and not self._buffers_armed:
            self._buffers.capture()
            self._buffers_armed = True

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._stepped_this_batch:  # the next batch starts a new optimizer step: take a new buffer copy then
            self._stepped_this_batch = False
            self._buffers_armed = False
        if self._rolled_back_this_batch:
            self._rolled_back_this_batch = False
        elif self._skip_remaining > 0:
            self._skip_remaining -= 1

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        # only needed to tell an fp16 overflow (finite loss) from a real NaN/inf loss
        if self._active_scaler is None or trainer.sanity_checking:
            return
        bad = ~torch.isfinite(loss.detach())
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if trainer.sanity_checking:
            return
        idx = self._optimizer_index(trainer, optimizer)
        st = self._opt_states.get(idx)
        if st is None:  # not `setdefault`: it would build (and drop) a fresh state every step
            st = self._opt_states[idx] = _OptimizerState()
        params, grads = collect_grads(optimizer)
        loss_bad, self._loss_bad = self._loss_bad, None
        self._stepped_this_batch = True
        # FSDP1: a rank may hold no part of any gradient while others do, and must still join the reduction; elsewhere
        # every rank has the same set of gradients, so none here means none anywhere
        if not grads and (self._shards is None or self._shards.kind != "fsdp"):
            return
        fused = _is_fused(optimizer)
        if fused:
            self._install_step_hooks(optimizer)
        scaler = self._active_scaler
        amp_state = self._scaler_state(scaler, optimizer)
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
        forced = self._skip_remaining > 0
        device_mode = self.sync_free and fused and not self._has_fresh_params(optimizer)
        if self.sync_free and not fused and not self._warned_fallback:
            self._warned_fallback = True
            rank_zero_warn(
                f"`GradientGuard(sync_free=True)`: `{type(optimizer).__name__}` is not fused, and a non-fused torch"
                " optimizer can only be skipped from the host, so the guard reads its decision once per step"
                " (pass `fused=True` to the optimizer for a step without host synchronisation)."
            )
        if device_mode:
            self._host_skipped[id(optimizer)] = False
            self._device_step(trainer, pl_module, optimizer, idx, st, params, grads, norms, amp_found, loss_bad, forced)
        else:
            self._host_step(trainer, pl_module, optimizer, idx, st, params, grads, norms, amp_found, loss_bad, forced)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        # keyed by id(optimizer): a later fit may create new optimizers at the same addresses
        for per_optimizer in (self._hooked, self._initialized, self._fresh, self._pending_found_inf, self._no_moment):
            per_optimizer.clear()
        self._we_set_found_inf.clear()
        self._host_skipped.clear()
        self._snapshot = None
        self._buffers = None
        self._shards = None

    # ------------------------------------------------------------------------------------------------------------------
    # host-decided step (default)

    def _host_step(self, trainer, pl_module, optimizer, idx, st, params, grads, norms, amp_found, loss_bad, forced):
        device = norms.total.device
        moment = None
        if amp_found is None and loss_bad is None and st.moment_t is None:
            norm, amp, lossbad = norms.total.item(), False, False  # the one host read of this step
        else:
            false = torch.zeros((), dtype=torch.bool, device=device)
            packed = torch.stack(
                [
                    norms.total,
                    (amp_found if amp_found is not None else false).to(torch.float32),
                    (loss_bad if loss_bad is not None else false).to(torch.float32),
                    st.moment_t.to(device) if st.moment_t is not None else false.to(torch.float32),
                ]
            ).tolist()  # the one host read of this step
            norm, amp, lossbad = packed[0], bool(packed[1]), bool(packed[2])
            moment = packed[3] if st.moment_t is not None else None
        decision = evaluate(
            norm, st.stats, self._cfg, amp_overflow=amp and amp_found is not None, nonfinite_loss=lossbad, forced=forced
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
            for g in grads:
                g.mul_(factor)
        skipped = action in NOT_STEPPED
        if skipped:
            self._skip_optimizer(optimizer, params, fused=_is_fused(optimizer))
            if self._buffers is not None and self._buffers_armed:
                self._buffers.restore()
        self._host_skipped[id(optimizer)] = skipped

        # the gradient-norm statistics follow the gradient-norm rule's own decision (see `combine`)
        st.stats = update_stats(st.stats, g_decision if action is Action.MOMENT_SPIKE else decision, norm, self._cfg)
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
            data = self._diagnose(params, norms.per_tensor.tolist(), action, norm, decision.threshold)
            if moment is not None:
                data["first_moment_norm"] = moment
                if moment_thr is not None:
                    data["first_moment_threshold"] = moment_thr
            kinds = {Action.AMP_OVERFLOW: "amp_overflow", Action.CLIP: "clip", Action.REBASE: "rebase"}
            kind = kinds.get(action, "skip")
            self.event_log.add(step, kind, decision.reason, **data)
            if action in GUARD_SKIPS:
                self._warn(step, f"GradientGuard skipped step {step}: {decision.reason}. {self._describe(data)}")
            elif action is Action.REBASE:
                self._warn(
                    step,
                    f"GradientGuard: {self.zscore_rebase_after} gradient-norm spikes in a row at step {step}: taken"
                    f" as a level shift; the z-score statistics restart from them (mean {st.stats.mean:.4g}).",
                )

        # a non-finite step may come from weights that are themselves corrupted (a stray in-place write, an update
        # that overflowed): skipping cannot repair them, and every checkpoint written from now on would hold them
        corrupted = action is Action.NONFINITE and not self._state_is_finite(trainer, pl_module)
        accepted = action in STEPPED
        self._after_decision(trainer, pl_module, st, accepted=accepted, corrupted=corrupted)
        if (step + 1) % self._log_every == 0:
            thr = decision.threshold if decision.threshold is not None else None
            self._log(pl_module, norm, thr, moment)

    # ------------------------------------------------------------------------------------------------------------------
    # device-decided step (sync_free=True with a fused optimizer)

    def _device_step(self, trainer, pl_module, optimizer, idx, st, params, grads, norms, amp_found, loss_bad, forced):
        device = norms.total.device
        self._to_device(st, device, norms.per_tensor.numel())
        code, thr = evaluate_on_device(
            norms.total, st.stats_t, self._cfg, amp_overflow=amp_found, nonfinite_loss=loss_bad, forced=forced
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
            torch._foreach_mul_(grads, factor)
        not_stepped = code >= int(Action.FORCED)
        self._set_found_inf(optimizer, not_stepped.to(torch.float32))
        if self._buffers is not None and self._buffers_armed:
            self._buffers.restore_where(not_stepped)
        stats_code = torch.where(code == int(Action.MOMENT_SPIKE), g_code, code)  # see `combine`
        st.stats_t = update_stats_on_device(st.stats_t, stats_code, norms.total, thr, self._cfg)
        guard_skip = not_stepped & (code != int(Action.AMP_OVERFLOW))
        amp = code == int(Action.AMP_OVERFLOW)
        trouble = guard_skip & (code != int(Action.FORCED)) & (not forced)  # see _host_step
        accepted = ~not_stepped
        c = st.counters_t
        st.counters_t = torch.stack(
            [
                c[0] + guard_skip,
                c[1] + amp,
                c[2] + (code == int(Action.CLIP)),
                torch.where(accepted, 0, c[3] + trouble),
                torch.where(accepted, 0, c[4] + amp),
                torch.where(guard_skip, trainer.global_step, c[5]),
                c[6] + (code == int(Action.REBASE)),
            ]
        )
        st.last_code_t = code
        st.last_thr_t = thr
        st.last_skip_code_t = torch.where(not_stepped, code, st.last_skip_code_t)
        if st.last_skip_norms_t is not None and st.last_skip_norms_t.shape == norms.per_tensor.shape:
            st.last_skip_norms_t = torch.where(not_stepped, norms.per_tensor, st.last_skip_norms_t)
        else:
            st.last_skip_norms_t = torch.where(not_stepped, norms.per_tensor, torch.zeros_like(norms.per_tensor))
        if (trainer.global_step + 1) % self._log_every == 0:
            self._sync_point(trainer, pl_module, optimizer, idx, st, params, norms)

    def _to_device(self, st: _OptimizerState, device: torch.device, n: int) -> None:
        if st.stats_t is None or st.stats_t.device != device:
            st.stats_t = _filled(st.stats.as_list(), torch.float32, device)
            st.counters_t = _filled(st.host_counters(), torch.int64, device)
            st.last_skip_code_t = torch.zeros((), dtype=torch.int32, device=device)
            st.mstats_t = _filled(st.mstats.as_list(), torch.float32, device)
            self._last_read[id(st)] = st.host_counters()

    def _sync_point(self, trainer, pl_module, optimizer, idx, st, params, norms) -> None:
        """Sync-free mode: the host reads the device state (once per ``log_every_n_steps`` steps) and acts on it."""
        values = torch.cat(
            [
                st.counters_t.to(torch.float64),
                st.stats_t.to(torch.float64),
                torch.stack([norms.total, st.last_thr_t]).to(torch.float64),
                st.last_code_t.reshape(1).to(torch.float64),
                st.last_skip_code_t.reshape(1).to(torch.float64),
                (st.moment_t if st.moment_t is not None else st.last_thr_t).reshape(1).to(torch.float64),
            ]
        ).tolist()
        moment = values[-1] if st.moment_t is not None else None
        nc, ns = len(_COUNTERS), NormStats.SIZE
        counters = [int(v) for v in values[:nc]]
        norm, thr = values[nc + ns], values[nc + ns + 1]
        code, last_skip_code = Action(int(values[nc + ns + 2])), Action(int(values[nc + ns + 3]))
        before = self._last_read.get(id(st), [0] * nc)
        self._last_read[id(st)] = counters
        new_skips = counters[0] - before[0]
        new_amp = counters[1] - before[1]
        new_rebases = counters[6] - before[6]
        step = trainer.global_step
        self.event_log.trace("grad_norm", step, norm)
        if moment is not None:
            self.event_log.trace("first_moment_norm", step, moment)
        if new_rebases > 0:
            self.event_log.add(step, "rebase", f"{new_rebases} level shift(s) since the last read", norm=norm)
        if new_skips > 0 or new_amp > 0:
            per_tensor = st.last_skip_norms_t.tolist()
            last_norm = math.sqrt(sum(v * v for v in per_tensor))  # the last skipped step's total norm
            data = self._diagnose(params, per_tensor, last_skip_code, last_norm, None)
            data.update(new_skips=new_skips, new_amp_overflows=new_amp, last_skip_step=counters[5])
            kind = "amp_overflow" if new_skips == 0 else "skip"
            reason = (
                f"{new_skips} skip(s), {new_amp} AMP overflow(s) since the last read; last: {REASONS[last_skip_code]}"
            )
            self.event_log.add(step, kind, reason, **data)
            if new_skips > 0:
                self._warn(step, f"GradientGuard: {reason}. {self._describe(data)}")
        # mirror the host numbers so persistent trouble and snapshots use the same code as the host path
        st.consecutive, st.consecutive_amp = counters[3], counters[4]
        accepted = code in STEPPED
        if self._check_persistent(trainer, pl_module, st):
            self._set_found_inf(optimizer, torch.ones((), dtype=torch.float32, device=norms.total.device))
        elif accepted and self.on_persistent == "rollback":
            # the steps since the last read that were neither skipped nor overflowed were accepted
            self._good_since_snapshot += max(self._log_every - new_skips - new_amp, 0)
            if self._good_since_snapshot >= self.snapshot_every:
                self._snapshot_due = True
        self._log(pl_module, norm, thr if math.isfinite(thr) else None, moment)

    # ------------------------------------------------------------------------------------------------------------------
    # shared pieces

    def _after_decision(self, trainer, pl_module, st: _OptimizerState, accepted: bool, corrupted: bool = False) -> None:
        if self._check_persistent(trainer, pl_module, st, corrupted=corrupted):
            return
        if accepted and self.on_persistent == "rollback":
            self._good_since_snapshot += 1
            if self._good_since_snapshot >= self.snapshot_every:
                self._snapshot_due = True

    def _check_persistent(self, trainer, pl_module, st: _OptimizerState, corrupted: bool = False) -> bool:
        """Act on persistent trouble; True when the current step must be skipped (rollback).

        ``corrupted`` (the parameters or the optimizer state are not finite) is persistent trouble at once: no skip
        can repair it. It is rolled back when a snapshot is available; otherwise the guard raises even with
        ``on_persistent="stop"``, because a clean stop would let checkpoint callbacks save the corrupted weights over
        the last good checkpoint."""
        too_many_skips = self.max_consecutive_skips is not None and st.consecutive >= self.max_consecutive_skips
        too_many_amp = (
            self.max_consecutive_amp_overflows is not None and st.consecutive_amp >= self.max_consecutive_amp_overflows
        )
        if not (too_many_skips or too_many_amp or corrupted):
            return False
        step = trainer.global_step
        if corrupted:
            what = "non-finite parameters or optimizer state (skipping steps cannot repair them)"
        elif too_many_skips:
            what = f"{st.consecutive} consecutive skipped steps"
        else:
            what = f"{st.consecutive_amp} consecutive fp16 overflows (the loss scale is collapsing)"
        last = self.event_log.events[-1].to_dict() if self.event_log.events else {}
        diagnosis = f"GradientGuard: persistent trouble at step {step}: {what}. Last event: {last}"
        if self.on_persistent == "raise":
            self.event_log.add(step, "raise", what)
            raise RuntimeError(diagnosis)
        if self.on_persistent == "rollback" and self.num_rollbacks < self.max_rollbacks and self._snapshot is not None:
            self._rollback(trainer, pl_module, what)
            return True
        if corrupted:
            self.event_log.add(step, "raise", what)
            raise RuntimeError(
                f"{diagnosis}. Not stopping cleanly (`on_persistent={self.on_persistent!r}`): the run would end with"
                " these weights and checkpoint callbacks would save them over the last good checkpoint. Resume from"
                " that checkpoint, or use `on_persistent='rollback'`."
            )
        reason = what if self.on_persistent == "stop" else f"{what}; `max_rollbacks={self.max_rollbacks}` reached"
        self.event_log.add(step, "stop", reason)
        rank_zero_warn(f"{diagnosis}. Stopping the run (`trainer.should_stop = True`).")
        trainer.should_stop = True
        st.consecutive = 0
        st.consecutive_amp = 0
        if st.counters_t is not None:
            st.counters_t[3:5] = 0
        return False

    def _rollback(self, trainer, pl_module, what: str) -> None:
        snap = self._snapshot
        assert snap is not None
        extra = snap.restore(pl_module, trainer.optimizers)
        for idx, saved in extra.items():
            st = self._opt_states.setdefault(idx, _OptimizerState())
            st.stats = NormStats.from_list(saved[: NormStats.SIZE])
            st.mstats = NormStats.from_list(saved[NormStats.SIZE :])
            if st.stats_t is not None:
                st.stats_t = _filled(st.stats.as_list(), torch.float32, st.stats_t.device)
                st.mstats_t = _filled(st.mstats.as_list(), torch.float32, st.stats_t.device)
        for st in self._opt_states.values():
            st.consecutive = 0
            st.consecutive_amp = 0
            if st.counters_t is not None:
                st.counters_t[3:5] = 0
        for opt in trainer.optimizers:
            params, _ = collect_grads(opt)
            self._skip_optimizer(opt, params, fused=_is_fused(opt))
        self._initialized.clear()  # the snapshot may predate the optimizers' first step
        self.num_rollbacks += 1
        self._skip_remaining = self.skip_batches_after_rollback
        self._rolled_back_this_batch = True
        self._good_since_snapshot = 0
        step = trainer.global_step
        self.event_log.add(
            step,
            "rollback",
            f"{what}: restored the snapshot of step {snap.step}",
            to_step=snap.step,
            rollbacks=self.num_rollbacks,
            skip_batches=self.skip_batches_after_rollback,
        )
        rank_zero_warn(
            f"GradientGuard: {what} at step {step}; rolled back to the snapshot of step {snap.step}"
            f" (rollback {self.num_rollbacks}/{self.max_rollbacks}), skipping the next"
            f" {self.skip_batches_after_rollback} batches."
        )

    def _take_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._snapshot_due = False
        if not self._state_is_finite(trainer, pl_module):
            # never save a corrupted state as "last good": a NaN written by a step that looked healthy (an overflowing
            # update, a stray in-place write) would otherwise be restored by every later rollback
            self._good_since_snapshot = 0
            kept = "no snapshot yet" if self._snapshot is None else f"kept the snapshot of step {self._snapshot.step}"
            self.event_log.add(
                trainer.global_step, "snapshot_refused", f"non-finite parameters or optimizer state; {kept}"
            )
            rank_zero_warn(
                f"GradientGuard: not taking a rollback snapshot at step {trainer.global_step}: the parameters or the"
                f" optimizer state are not finite ({kept})."
            )
            return
        extra = {}
        for idx, st in self._opt_states.items():
            extra[idx] = st.stats_t.tolist() if st.stats_t is not None else st.stats.as_list()
            extra[idx] += st.mstats_t.tolist() if st.mstats_t is not None else st.mstats.as_list()
        device = "cpu" if self.snapshot_device == "cpu" else None
        self._snapshot = TrainingSnapshot(trainer.global_step, pl_module, trainer.optimizers, device, extra)
        self._snapshot_due = False
        self._good_since_snapshot = 0

    @staticmethod
    @torch.no_grad()
    def _state_is_finite(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Whether every parameter and every floating optimizer state tensor is finite, agreed across ranks (a
        weight corrupted on one rank only must not leave the ranks with snapshots of different steps)."""
        tensors = [p.detach() for p in pl_module.parameters()]
        for opt in trainer.optimizers:
            for state in opt.state.values():
                tensors += [v for v in state.values() if isinstance(v, Tensor) and v.is_floating_point()]
        # sharded: each rank checks its own shards (some may be empty), the flag is combined below
        finite = bool(all_finite(tensors))  # one host read per snapshot
        if trainer.world_size > 1:
            finite = bool(trainer.strategy.reduce_boolean_decision(finite, all=True))
        return finite

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

    def _skip_optimizer(self, optimizer: torch.optim.Optimizer, params: list[Tensor], fused: bool) -> None:
        if fused:  # the kernel skips on the device; p.grad = None would break GradScaler.update() (no inf checks)
            device = params[0].device if params else torch.device("cpu")
            self._set_found_inf(optimizer, torch.ones((), dtype=torch.float32, device=device))
        else:
            for p in params:
                p.grad = None

    def _install_step_hooks(self, optimizer: torch.optim.Optimizer) -> None:
        if id(optimizer) in self._hooked:
            return
        self._hooked.add(id(optimizer))
        self._hook_handles.append(optimizer.register_step_pre_hook(self._pre_step))
        self._hook_handles.append(optimizer.register_step_post_hook(self._post_step))

    def _set_found_inf(self, optimizer: torch.optim.Optimizer, flag: Tensor) -> None:
        """Skip a fused optimizer's step on the device when ``flag`` (0-dim float32) is 1.

        Without a GradScaler the hook runs inside ``optimizer.step(closure)``, after the step pre-hooks: the flag is set
        here. With fp16 AMP, ``GradScaler.step`` sets its own ``found_inf`` after this hook: the pre-hook then ORs ours
        into it.
        """
        key = id(optimizer)
        existing = getattr(optimizer, "found_inf", None)
        if existing is not None and existing is not self._pending_found_inf.get(key):
            optimizer.found_inf = torch.maximum(existing, flag.to(existing.device, existing.dtype))
        else:
            optimizer.found_inf = flag
        self._pending_found_inf[key] = optimizer.found_inf
        self._we_set_found_inf[key] = True
        if key not in self._initialized:
            self._fresh[key] = [p for g in optimizer.param_groups for p in g["params"] if not optimizer.state.get(p)]

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        key = id(optimizer)
        ours = self._pending_found_inf.get(key)
        if ours is None:
            return
        existing = getattr(optimizer, "found_inf", None)
        if existing is not None and existing is not ours:  # GradScaler replaced the flag: OR them, never clobber
            optimizer.found_inf = torch.maximum(existing, ours.to(existing.device, existing.dtype))
            self._we_set_found_inf[key] = False  # the scaler deletes the attribute after the step

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        key = id(optimizer)
        if self._pending_found_inf.pop(key, None) is None:
            return
        if self._we_set_found_inf.pop(key, False) and hasattr(optimizer, "found_inf"):
            del optimizer.found_inf
        fresh = self._fresh.pop(key, [])
        if fresh and self._host_skipped.get(key, False):
            # a fused kernel initialises the state of new parameters even when found_inf skips the step (and torch's
            # fused SGD leaves its momentum buffer uninitialised, `empty_like`): drop it, as if the step never ran
            for p in fresh:
                optimizer.state.pop(p, None)
        elif not fresh:
            self._initialized.add(key)

    def _has_fresh_params(self, optimizer: torch.optim.Optimizer) -> bool:
        """True until every parameter has optimizer state (the first step of a fused optimizer is decided on the host,
        so that a skipped first step can drop the state the kernel initialised)."""
        key = id(optimizer)
        if key in self._initialized:
            return False
        if all(optimizer.state.get(p) for g in optimizer.param_groups for p in g["params"]):
            self._initialized.add(key)
            return False
        return True

    @staticmethod
    def _optimizer_index(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> int:
        for i, opt in enumerate(trainer.optimizers):
            if opt is optimizer:
                return i
        return 0

    @staticmethod
    def _scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        return scaler

    @staticmethod
    def _scaler_state(scaler: torch.amp.GradScaler | None, optimizer: torch.optim.Optimizer) -> dict | None:
        """The scaler's overflow flag for this optimizer (after ``unscale_``), or ``stage_ready`` when the gradients
        are still scaled (fused optimizers: Lightning leaves unscaling to the kernel)."""
        if scaler is None:
            return None
        state = scaler._per_optimizer_states.get(id(optimizer)) if hasattr(scaler, "_per_optimizer_states") else None
        found = state.get("found_inf_per_device") if state else None
        if found:
            return {"found_inf": sum(v.to(next(iter(found.values())).device) for v in found.values())}
        return {"stage_ready": _is_fused(optimizer)}

    def _diagnose(self, params, per_tensor: list[float], action: Action, norm: float, thr: float | None) -> dict:
        names = [self._param_names.get(id(p), f"param[{i}]") for i, p in enumerate(params)]
        if len(names) != len(per_tensor):
            names = [f"param[{i}]" for i in range(len(per_tensor))]
        data: dict[str, Any] = {"cause": action.name.lower(), "norm": norm}
        if thr is not None:
            data["threshold"] = thr
        data["nonfinite_params"] = [n for n, v in zip(names, per_tensor) if not math.isfinite(v)]
        data["top_layers"] = layer_norms(names, per_tensor, self.diagnose_top_k)
        return data

    @staticmethod
    def _describe(data: dict) -> str:
        parts = [f"norm={data['norm']:.4g}"]
        if data.get("nonfinite_params"):
            shown = data["nonfinite_params"][:8]
            more = len(data["nonfinite_params"]) - len(shown)
            parts.append("non-finite gradients in: " + ", ".join(shown) + (f" (+{more} more)" if more > 0 else ""))
        parts.append("largest layers: " + ", ".join(f"{n}={v:.3g}" for n, v in data["top_layers"]))
        return "; ".join(parts)

    def _warn(self, step: int, message: str) -> None:
        if self._last_warn_step is not None and step - self._last_warn_step < self.warn_every_n_steps:
            return
        self._last_warn_step = step
        rank_zero_warn(message)

    def _log(self, pl_module: pl.LightningModule, norm: float, thr: float | None, moment: float | None = None) -> None:
        totals = [self._read(s) for s in self._opt_states.values()]
        metrics = {
            "guard/grad_norm": norm,
            "guard/skipped": float(sum(c[0] for c in totals)),
            "guard/consecutive_skips": float(max(c[3] for c in totals)),
            "guard/rollbacks": float(self.num_rollbacks),
            "guard/amp_overflows": float(sum(c[1] for c in totals)),
        }
        if self.zscore is not None and self.zscore_rebase_after is not None:
            metrics["guard/rebases"] = float(sum(c[6] for c in totals))
        if moment is not None:
            metrics["guard/first_moment_norm"] = moment
        if self.zscore is not None and thr is not None:
            metrics["guard/threshold"] = thr
        log_scalars(pl_module.trainer, metrics)


__all__ = ["GradientGuard"]
