"""``ScaleFactorClamp``: bound every output scale factor of a model, log them, and warn about the collapse symptom."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_stability._checks import check_int, check_number, check_patterns, check_positive
from lightning_stability.callbacks._events import EventLog
from lightning_stability.callbacks._logging import log_scalars
from lightning_stability.callbacks._sharding import ShardLayout, ShardReducer, local_tensor, whole_extremes
from lightning_stability.callbacks._state_key import cached_state_key
from lightning_stability.nn.scale import ClampedRMSScale

__all__ = ["ScaleFactorClamp"]

_MAX_LISTED = 20


#: ``level_gate`` below this (the module's level loss terms act at less than half strength): no "stays high" warning
_GATE_OPEN = 0.5


_FOLD_EVERY = 32  # per-step records kept before they are folded into the window sums (bounds their memory)


@dataclass
class _Tracked:
    """One scale factor: a ``ClampedRMSScale`` layer (``kind="layer"``) or a learnable parameter (``"param"``).

    Every step appends one small record to ``pending`` with at most two tensor ops and no host sync (a layer:
    ``[mean factor, clamped fraction]``; a parameter: a copy of its value before projection). Every
    ``_FOLD_EVERY`` records, and before a read, ``fold`` turns them into the window sums with a handful of vectorised
    ops on the factor's device. Records are fresh tensors, never views of the layer's buffers (DDP broadcasts buffers
    in place at the next forward). ``pending`` is part of the checkpointed state, so a resumed run folds at the same
    steps, in the same order, as an uninterrupted one.

    A *sharded* parameter (``sharded=True``: FSDP2 / tensor-parallel ``DTensor`` or FSDP1 shard) records what a layer
    records, ``[mean factor, clamped fraction]`` of the whole parameter, made from the local shards' sums by the
    callback's one all-reduce per step (see :meth:`ScaleFactorClamp._record_sharded`), so the records are the same on
    every rank and the checkpointed ``pending`` resumes on any rank.
    """

    name: str
    kind: str
    target: nn.Module | nn.Parameter
    factor_sum: Tensor | None = None  # sum over the window of the mean factor
    clamped_sum: Tensor | None = None  # sum over the window of the clamped fraction
    streak: Tensor | None = None  # consecutive steps with mean factor > warn_above
    peak: Tensor | None = None  # longest streak seen in the window
    steps: int = 0  # steps in the window, folded or not
    last_warned_step: int | None = None
    pending: list[Tensor] = field(default_factory=list)  # per-step records not folded yet
    sharded: bool = False

    def init(self, device: torch.device) -> None:
        if self.factor_sum is None:
            self.factor_sum = torch.zeros((), device=device)
            self.clamped_sum = torch.zeros((), device=device)
            self.streak = torch.zeros((), device=device, dtype=torch.long)
            self.peak = torch.zeros((), device=device, dtype=torch.long)

    @torch.no_grad()
    def record(self, min_scale: float, max_scale: float) -> None:
        """This step's factor (a parameter is projected into the range here)."""
        if self.kind == "layer":
            layer: ClampedRMSScale = self.target  # type: ignore[assignment]
            if layer.last_scale.numel() == 0:  # never called yet
                return
            item = torch.stack([layer.last_scale.mean(dtype=torch.float32), layer.last_clamped_fraction.float()])
        else:
            param: Tensor = self.target  # type: ignore[assignment]
            item = param.detach().clone()
            param.clamp_(min_scale, max_scale)
        self.pending.append(item)
        self.steps += 1

    @torch.no_grad()
    def local_sums(self, min_scale: float, max_scale: float) -> Tensor:
        """Sharded parameter: ``[sum of clamp(p), count of p outside the range, count of p]`` over this rank's shard
        (the element count too: an FSDP1 shard does not know its parameter's whole size)."""
        local = local_tensor(self.target.detach()).float().reshape(-1)
        outside = (local < min_scale) | (local > max_scale)
        count = torch.full((), local.numel(), dtype=torch.float32, device=local.device)
        return torch.stack([local.clamp(min_scale, max_scale).sum(), outside.sum().float(), count])

    @torch.no_grad()
    def fold(self, min_scale: float, max_scale: float, warn_above: float | None) -> None:
        """Add the pending records to the window sums and advance the streak (device ops only)."""
        if not self.pending:
            return
        stacked = torch.stack([p.to(self.factor_sum.device) for p in self.pending])
        self.pending = []
        if self.kind == "layer" or self.sharded:
            factors, clamped = stacked[:, 0], stacked[:, 1]
        else:
            values = stacked.reshape(stacked.shape[0], -1).float()  # one row per step; 0-dim scales too
            factors = values.clamp(min_scale, max_scale).mean(dim=1)
            clamped = ((values < min_scale) | (values > max_scale)).float().mean(dim=1)
        self.factor_sum += factors.sum()
        self.clamped_sum += clamped.sum()
        if warn_above is not None:
            # streak after record i: i - (last record not above) or, when every record so far is above, the streak
            # carried in plus i + 1
            idx = torch.arange(factors.numel(), device=factors.device)
            last_low = torch.cummax(torch.where(factors > warn_above, -1, idx), dim=0).values
            streaks = torch.where(last_low >= 0, idx - last_low, self.streak + idx + 1)
            self.streak.copy_(streaks[-1])
            torch.maximum(self.peak, streaks.max(), out=self.peak)

    def state(self) -> dict[str, Any]:
        return {
            "factor_sum": float(self.factor_sum) if self.factor_sum is not None else 0.0,
            "clamped_sum": float(self.clamped_sum) if self.clamped_sum is not None else 0.0,
            "streak": int(self.streak) if self.streak is not None else 0,
            "peak": int(self.peak) if self.peak is not None else 0,
            "steps": self.steps,
            "last_warned_step": self.last_warned_step,
            "pending": [p.tolist() for p in self.pending],  # plain numbers: the state stays JSON-serialisable
        }

    def load(self, state: dict[str, Any], device: torch.device) -> None:
        self.factor_sum = torch.tensor(float(state["factor_sum"]), device=device)
        self.clamped_sum = torch.tensor(float(state["clamped_sum"]), device=device)
        self.streak = torch.tensor(int(state["streak"]), device=device, dtype=torch.long)
        self.peak = torch.tensor(int(state["peak"]), device=device, dtype=torch.long)
        self.steps = int(state["steps"])
        self.last_warned_step = state["last_warned_step"]
        dtype = self.target.dtype if self.kind == "param" and not self.sharded else torch.float32
        self.pending = [torch.tensor(p, dtype=dtype, device=device) for p in state.get("pending", [])]


class ScaleFactorClamp(Callback):
    r"""Keep every output scale factor of a model inside ``[min_scale, max_scale]``, log it, and warn when it sits high.

    docs/design.md: a learnable ``output_scale`` initialised at 3.0 amplified an untrained codec decoder, and the
    cascade transformer's RMS factor ``target_rms / out_rms`` climbed because its residual path collapsed (r = 0.1: RMS
    1.09 against a target of 5.69). The fix was a clamp to [0.7, 1.5] with a warning above 1.3. This callback applies
    it to any model, without editing it.

    **What it finds** (at fit start, and again at validate/test/predict start):

    - every :class:`~lightning_stability.nn.ClampedRMSScale` layer: its clamp range is set to ``[min_scale,
      max_scale]`` (the layer clamps its factor itself, every forward);
    - every trainable parameter whose qualified name matches one of ``param_patterns`` (glob, e.g.
      ``"*output_scale*"``): after every optimizer step (``on_train_batch_end``, so steps a guard skipped are
      included, automatic and manual optimization alike) it is projected back into the range,
      ``p <- clamp(p, min_scale, max_scale)``, in place on its device. At fit start (not on resume) a value farther
      than ``init_warn_ratio`` from 1 (``max(p, 1/p) > init_warn_ratio``, or ``p <= 0``) gets a warning before it
      is projected.

    Nothing found is a RuntimeError (at fit start, after ``configure_model``, so layers a module builds there are
    found) listing some parameter names.

    **What it logs**, every ``log_every_n_steps`` optimizer steps, averaged over the steps since the previous log (and
    over ranks under DDP):

    - ``scale/<name>``: the mean factor (a layer's ``last_scale``, a parameter's value after projection);
    - ``scale/<name>/clamped_fraction``: the fraction of factors that hit a bound (a layer's
      ``last_clamped_fraction``; for a parameter, the fraction of its elements that had to be projected).

    **When it warns** (rank zero): when the mean factor stays above ``warn_above`` for ``warn_after_steps``
    consecutive steps (on any rank), the symptom of a collapsing residual path. A factor at 1.0 never warns. The
    warning repeats for the same factor at most once every ``20 * warn_after_steps`` steps. Each warning is an event
    in ``event_log`` (``kind="scale_high"``), and so is each init warning (``"scale_init"``).

    **Not while the module's level terms are gated off.** A module whose amplitude loss terms are switched on
    gradually can say how far they act: a ``level_gate`` attribute, a scalar tensor in ``[0, 1]`` updated each
    training step (:class:`~lightning_stability.modules.CodecModule` with ``rms_correlation_gate`` sets it to the
    mean weight of its ``rms`` term's correlation gate). While those terms are off, a quiet output (and so a factor at
    its bound) is expected, not a collapse: no "stays high" warning is given while the mean ``level_gate`` since the
    previous check is below 0.5. The factor is still clamped and logged, and the streak keeps counting, so a factor
    still high once the gate opens is warned about at the next check.

    **Cost.** Every step: two tensor ops per factor (a parameter: a copy and the in-place clamp), on the device,
    without a host sync; every 32 steps a few vectorised ops fold those records into the window statistics. At log
    steps: one host read of the window statistics (and one all-reduce under DDP).

    Args:
        min_scale: lower bound (> 0).
        max_scale: upper bound (>= ``min_scale``).
        warn_above: threshold of the "stays high" warning, in ``[min_scale, max_scale)``; ``None`` disables it.
        warn_after_steps: consecutive steps above ``warn_above`` before warning (>= 1).
        param_patterns: glob pattern(s) of learnable scale parameter names; ``()`` for layers only.
        init_warn_ratio: fit-start warning threshold for a parameter's distance from 1 (> 1); ``None`` disables it.
        log_every_n_steps: log (and check the warning) every N optimizer steps; ``None``: the Trainer's
            ``log_every_n_steps``; 0: never log (the warning is then checked every ``warn_after_steps`` steps).

    Raises:
        ValueError: bad arguments (in ``__init__``).
        RuntimeError: nothing to clamp in the model (at fit start).
    """

    def __init__(
        self,
        min_scale: float = 0.7,
        max_scale: float = 1.5,
        *,
        warn_above: float | None = 1.3,
        warn_after_steps: int = 50,
        param_patterns: str | Iterable[str] = ("*output_scale*",),
        init_warn_ratio: float | None = 2.0,
        log_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.min_scale = check_positive("min_scale", min_scale, noun="a float")
        self.max_scale = check_positive("max_scale", max_scale, noun="a float")
        if min_scale > max_scale:
            raise ValueError(
                f"`min_scale` must be <= `max_scale`, got min_scale={min_scale!r} > max_scale={max_scale!r}"
            )
        warn_above = check_number("warn_above", warn_above, allow_none=True)
        if warn_above is not None and not self.min_scale <= warn_above < self.max_scale:
            raise ValueError(
                f"`warn_above` must lie in [min_scale, max_scale) = [{self.min_scale}, {self.max_scale}) so a "
                f"factor can exceed it, got {warn_above!r}"
            )
        warn_after_steps = check_int("warn_after_steps", warn_after_steps, 1)
        patterns = check_patterns("param_patterns", param_patterns, noun="glob pattern")
        init_warn_ratio = check_number("init_warn_ratio", init_warn_ratio, minimum=1, exclusive=True, allow_none=True)
        log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, 0, allow_none=True)
        self.warn_above = warn_above
        self.warn_after_steps = warn_after_steps
        self.param_patterns = patterns
        self.init_warn_ratio = init_warn_ratio
        self.log_every_n_steps = log_every_n_steps
        self.event_log = EventLog(source=self.state_key)
        self._tracked: dict[str, _Tracked] = {}
        self._reducer: ShardReducer | None = None
        self._shard_layout: ShardLayout | None = None
        self._pending_state: dict[str, dict[str, Any]] = {}
        self._fit_started = False
        self._last_step: int | None = None
        self._last_read_step: int | None = None
        # the module's `level_gate` summed over the steps since the last read (on its device; None: no gate)
        self._gate_sum: Tensor | None = None
        self._gate_steps = 0

    @property
    @override
    def state_key(self) -> str:
        return cached_state_key(
            self, min_scale=self.min_scale, max_scale=self.max_scale, param_patterns=self.param_patterns
        )

    @property
    def warn_every_n_steps(self) -> int:
        """Minimum number of steps between two warnings about the same factor."""
        return 20 * self.warn_after_steps

    # -- discovery ---------------------------------------------------------------------------------------------------
    def _discover(self, pl_module: pl.LightningModule) -> dict[str, _Tracked]:
        found: dict[str, _Tracked] = {}
        for name, module in pl_module.named_modules():
            if isinstance(module, ClampedRMSScale):
                module.set_bounds(self.min_scale, self.max_scale)
                found[name or "<root>"] = _Tracked(name or "<root>", "layer", module)
        if self.param_patterns:
            for name, param in pl_module.named_parameters():
                if not param.requires_grad or not param.is_floating_point():
                    continue
                if any(fnmatch.fnmatchcase(name, p) for p in self.param_patterns):
                    found[name] = _Tracked(name, "param", param, sharded=self._is_shard(param))
        return found

    def _check_init(self, trainer: pl.Trainer) -> None:
        if self.init_warn_ratio is None:
            return
        log_ratio = math.log(self.init_warn_ratio)
        for t in self._tracked.values():
            if t.kind != "param":
                continue
            if t.sharded:  # every rank's shard (some may be empty); the same answer on every rank
                lo, hi = whole_extremes(t.target)
            else:
                values = t.target.detach().float()
                lo, hi = float(values.min()), float(values.max())
            far = lo <= 0 or max(abs(math.log(lo)), abs(math.log(hi))) > log_ratio
            if far:
                shown = f"{hi:.4g}" if t.target.numel() == 1 else f"in [{lo:.4g}, {hi:.4g}]"
                reason = (
                    f"learnable scale `{t.name}` starts at {shown}, more than {self.init_warn_ratio:g}x away from 1: "
                    "an output scale far from 1 amplifies (or silences) an untrained network (a decoder's scale "
                    f"at 3.0 gave loss 155, SNR -15 dB); it is projected into [{self.min_scale}, {self.max_scale}] now"
                )
                rank_zero_warn(f"ScaleFactorClamp: {reason}")
                self.event_log.add(trainer.global_step, "scale_init", reason, name=t.name, min=lo, max=hi)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, fitting: bool) -> None:
        self._reducer = ShardReducer.for_trainer(trainer)
        self._shard_layout = None
        tracked = self._discover(pl_module)
        if not fitting:
            return
        if not tracked:
            names = [n for n, _ in pl_module.named_parameters()]
            shown = ", ".join(repr(n) for n in names[:_MAX_LISTED]) + (", ..." if len(names) > _MAX_LISTED else "")
            raise RuntimeError(
                f"ScaleFactorClamp found nothing to clamp in {type(pl_module).__name__}: no `ClampedRMSScale` layer "
                f"and no trainable parameter matching `param_patterns`={self.param_patterns!r}. "
                f"Some parameter names: [{shown}]"
            )
        self._tracked = tracked
        self._restore_tracked()
        self._fit_started = True
        if trainer.ckpt_path is None:
            self._check_init(trainer)
        self._project()
        self._last_step = trainer.global_step
        self._gate_sum, self._gate_steps = None, 0

    def _restore_tracked(self) -> None:
        """Give every tracked factor its checkpointed state (or a fresh one)."""
        for name, t in self._tracked.items():
            device = t.target.last_scale.device if t.kind == "layer" else t.target.device
            if name in self._pending_state:
                t.load(self._pending_state[name], device)
            else:
                t.init(device)
        self._pending_state = {}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module, fitting=True)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._fit_started = False

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "fit":
            self._start(trainer, pl_module, fitting=False)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module, fitting=False)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module, fitting=False)

    def _is_shard(self, param: Tensor) -> bool:
        return self._reducer is not None and (
            hasattr(param, "device_mesh") or bool(getattr(param, "_fsdp_flattened", False))
        )

    # -- every step --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _project(self) -> None:
        for t in self._tracked.values():
            if t.kind == "param":
                local_tensor(t.target).clamp_(self.min_scale, self.max_scale)  # each rank projects its own shard

    @torch.no_grad()
    def _record_sharded(self, items: list[_Tracked]) -> None:
        """One all-reduce for every sharded parameter: whole-parameter ``[mean factor, clamped fraction]`` records."""
        if self._shard_layout is None:
            specs = [self._reducer.spec(t.target, t.name) for t in items]
            self._shard_layout = ShardLayout(specs, items[0].factor_sum.device)
        sums = torch.stack([t.local_sums(self.min_scale, self.max_scale) for t in items])
        whole = self._shard_layout.reduce(sums)
        for t, row in zip(items, whole):
            t.pending.append(row[:2] / row[2])  # [mean factor, clamped fraction] of the whole parameter
            t.steps += 1
            local_tensor(t.target).clamp_(self.min_scale, self.max_scale)

    def _update(self) -> None:
        sharded = [t for t in self._tracked.values() if t.sharded]
        if sharded:
            self._record_sharded(sharded)
        for t in self._tracked.values():
            if not t.sharded:
                t.record(self.min_scale, self.max_scale)
            if len(t.pending) >= _FOLD_EVERY:
                t.fold(self.min_scale, self.max_scale, self.warn_above)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # no optimizer step since the last call (gradient accumulation)
            return
        self._last_step = step
        self._update()
        gate = getattr(pl_module, "level_gate", None)
        if isinstance(gate, Tensor):  # on the device: no host read here
            gate = gate.detach().float().reshape(())
            self._gate_sum = gate if self._gate_sum is None else self._gate_sum + gate
            self._gate_steps += 1
        every = trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps
        read_every = every or self.warn_after_steps
        if step % read_every == 0:
            self._read(trainer, pl_module, step, log=bool(every))

    # -- log steps ---------------------------------------------------------------------------------------------------
    def _read(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, *, log: bool) -> None:
        items = list(self._tracked.values())
        if not items:
            return
        for t in items:
            t.fold(self.min_scale, self.max_scale, self.warn_above)
        device = items[0].factor_sum.device
        stats = torch.stack(
            [torch.stack([t.factor_sum / max(t.steps, 1), t.clamped_sum / max(t.steps, 1)]).to(device) for t in items]
        )
        peaks = torch.stack([t.peak.to(device) for t in items])
        stats = trainer.strategy.reduce(stats, reduce_op="mean")  # same statistics, hence decisions, on every rank
        peaks = trainer.strategy.reduce(peaks, reduce_op="max")
        host_stats, host_peaks = stats.tolist(), peaks.tolist()
        gated = self._gated_off(trainer)
        logged: dict[str, Tensor] = {}
        for i, t in enumerate(items):
            if t.steps == 0:  # a layer that has not run yet
                continue
            factor, clamped = host_stats[i]
            if log:
                logged[f"scale/{t.name}"] = stats[i, 0]
                logged[f"scale/{t.name}/clamped_fraction"] = stats[i, 1]
            self.event_log.trace(t.name, step, factor)
            self.event_log.trace(f"{t.name}/clamped_fraction", step, clamped)
            if self.warn_above is not None and host_peaks[i] >= self.warn_after_steps and not gated:
                self._warn(step, t, factor, int(host_peaks[i]))
            t.factor_sum.zero_()
            t.clamped_sum.zero_()
            t.peak.copy_(t.streak)
            t.steps = 0
        log_scalars(trainer, logged)
        self._last_read_step = step

    def _gated_off(self, trainer: pl.Trainer) -> bool:
        """Whether the module's level terms acted at less than half strength (mean ``level_gate`` < 0.5) over the
        steps since the last read; resets the window. False for a module without a ``level_gate``."""
        if self._gate_sum is None or self._gate_steps == 0:
            return False
        mean = trainer.strategy.reduce(self._gate_sum / self._gate_steps, reduce_op="mean")
        self._gate_sum, self._gate_steps = None, 0
        return float(mean) < _GATE_OPEN

    def _warn(self, step: int, t: _Tracked, factor: float, peak: int) -> None:
        if t.last_warned_step is not None and step - t.last_warned_step < self.warn_every_n_steps:
            return
        t.last_warned_step = step
        if t.kind == "layer":
            why = (
                "The output RMS is far below its target, so the layer amplifies it as far as it may: the path that "
                "feeds it may be collapsing (a cascade stage with residual r = 0.1 left RMS 1.09 "
                "against a target of 5.69); consider a stronger residual or check the stage that feeds this output."
            )
        else:
            why = (
                "The learnable scale keeps growing: the network under it produces too little amplitude and the scale "
                "compensates; check the output level of the layers before it, or give amplitude its "
                "own loss term (an RMS or waveform term) instead of relying on the scale."
            )
        reason = (
            f"scale factor `{t.name}` stayed above warn_above={self.warn_above} for {peak} consecutive steps "
            f"(mean {factor:.3f} over the last steps, clamp range [{self.min_scale}, {self.max_scale}]). {why}"
        )
        rank_zero_warn(f"ScaleFactorClamp: {reason}")
        self.event_log.add(step, "scale_high", reason, name=t.name, factor=factor, steps=peak)

    # -- state -------------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        tracked = {name: t.state() for name, t in self._tracked.items()}
        tracked.update({k: v for k, v in self._pending_state.items() if k not in tracked})
        return {
            "tracked": tracked,
            "last_read_step": self._last_read_step,
            "event_log": self.event_log.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = {k: dict(v) for k, v in state_dict["tracked"].items()}
        self._last_read_step = state_dict["last_read_step"]
        self.event_log.load_state_dict(state_dict["event_log"])
        if self._fit_started:
            # strategies that restore after `setup` (ModelParallelStrategy, DeepSpeed) restore callbacks after
            # `on_fit_start`, when the factors are already tracked: apply the state now
            self._restore_tracked()
