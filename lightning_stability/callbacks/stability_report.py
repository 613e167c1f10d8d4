"""``StabilityReport``: one JSON file, one picture and a short summary of what went wrong (or right) in a run."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import tempfile
from collections import Counter
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_stability._checks import check_bool, check_int, check_str
from lightning_stability.callbacks._events import EventLog
from lightning_stability.callbacks._refit import begin_fit
from lightning_stability.callbacks._state_key import cached_state_key

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_stability.callbacks._report_plot import Panel

__all__ = ["StabilityReport"]

SCHEMA_VERSION = 1
_SKIP_KINDS = ("skip",)
_BOUND_ATTRIBUTES = ("min_scale", "max_scale", "min_weight", "max_weight")


class StabilityReport(Callback):
    r"""Collect every stability callback's events and traces and write a report at the end of fit (or on a crash).

    Sources: every callback on the trainer with an ``event_log``
    (:class:`~lightning_stability.callbacks.EventLog`): ``GradientGuard`` ("skip", "clip", "amp_overflow",
    "rollback", "stop" events, "grad_norm" trace), ``AdaptiveLossWeight`` (weight decisions, "weight" trace),
    ``ScaleFactorClamp`` (scale traces), ``SpectralNormInjection`` ("<module>/sigma" traces), ``SignalMonitor``
    ("train/snr", "val/rms_ratio", ... traces) or any user callback following the same protocol. Any subset works,
    none included. The report also records the training loss itself: ``outputs["loss"]`` of every optimizer step,
    at that step's index (``global_step`` as ``training_step`` sees it, 0-based, the axis of the other traces and of
    Lightning's own step logging; under gradient accumulation the last micro-batch's loss, times
    ``accumulate_grad_batches`` in automatic optimization, where Lightning hands callbacks the normalised loss),
    copied into a preallocated device buffer with no host sync and read back every ``flush_every_n_steps`` steps
    (one sync per flush). With several processes (DDP, FSDP, ``ModelParallelStrategy``) it records rank zero's loss
    and writes on rank zero only; at the end of fit it gathers every rank's events, so an event that only another
    rank's source recorded is in the report too, with ``data["rank"]`` (after a crash: rank zero's events only).

    At ``on_fit_end`` (status ``"finished"``) and ``on_exception`` (status ``"interrupted"``) it writes, into
    ``dirpath`` (default: ``trainer.log_dir``, else ``trainer.default_root_dir``, resolved at setup on every rank):

    - ``{filename}.json``, schema (version 1; non-finite floats are written as the strings ``"nan"``, ``"inf"``,
      ``"-inf"``)::

        {
          "schema_version": 1,
          "status": "finished" | "interrupted",
          "exception": null | "RuntimeError: ...",
          "created": "2026-01-01T12:00:00+00:00",         # UTC, ISO 8601
          "global_step": int, "epoch": int, "precision": "16-mixed" | ...,
          "loss": [[step, value], ...],                     # the report's own trace
          "sources": {                                      # one per callback with an event_log, by state_key
            "<state_key>": {"callback": "GradientGuard", "label": "guard", "source": "<state_key>",
                            "events": [{"step", "source", "kind", "reason", "data"}, ...],
                            "num_events": {kind: count},    # counts survive the bounded event list
                            "traces": {name: [[step, value], ...]}}
          },
          "summary": {
            "skipped_steps": [{"step", "reason", "source"}, ...],
            "skip_reasons": {class: count},                 # by the events' data["cause"]: "non-finite", "spike"...
            "num_skipped": int, "num_amp_overflows": int, "num_rollbacks": int, "num_clipped": int,
            "weight_changes": {label: {"first": w0, "last": w1, "changes": n, "min": .., "max": ..}},
            "other_events": {label: {kind: count}},         # e.g. clip, stop, increase, scale_high
            "final_metrics": {key: value},                  # trainer.callback_metrics scalars at the end
            "recommendations": [str, ...]
          },
          "panels": [panel titles drawn in the PNG]
        }

    - ``{filename}.png``: one panel per kind of data present (only those): gradient norm over steps with skipped
      steps, rollbacks and AMP overflows marked as vertical lines; training loss (log scale); loss-weight
      trajectories; scale factors (with the clamp bounds); spectral-norm sigmas; SNR/SI-SNR; RMS ratio (with 1.0).
      Non-finite points are drawn as red crosses at the top edge.

    With a ``WandbLogger`` and ``log_to_wandb`` it also logs the PNG (``stability_report/figure``) and the event table
    (``stability_report/events``). It prints a short summary through ``rank_zero_info``: steps skipped and why,
    rollbacks, weight changes, final metrics, and recommendations where the evidence supports one:

    - fp16 overflows after the first ``warmup_steps`` steps in more than 5 % of steps -> try ``bf16-mixed``;
    - at least 3 non-finite-gradient skips within the first ``warmup_steps`` steps -> lower LR, warm-up, smaller init;
    - more than 5 % of steps skipped -> look for bad batches / lower the LR;
    - any rollback -> persistent trouble; the step of the first one;
    - a scale factor pinned at its upper (lower) bound over the last quarter of the run -> the residual path is
      collapsing (the model is amplifying);
    - an adaptive loss weight at its ceiling -> the weight is compensating for a term that does not improve;
    - gradient norm median grew more than 5x from the first to the last quarter -> clip / spectral norm / lower LR;
    - final validation RMS ratio outside [0.5, 2] or |DC offset| > 0.1 -> amplitude handling (RMS loss,
      normalisation);
    - a non-finite final loss;
    - every finding a source recorded with advice (an event whose ``data["advice"]`` is a string, e.g.
      ``CodebookMonitor``'s "codebook_collapse" or ``AdversarialBalanceMonitor``'s "disc_winning"): one line per
      source and kind, with the first such event's reason and step.

    ``state_dict`` carries its own loss trace (and the sources keep theirs), so a resumed run's report covers the
    whole run.

    Args:
        dirpath: folder for the files (default: the run directory, see above).
        filename: file stem (``.json`` and ``.png`` are appended); no path separators.
        log_to_wandb: log figure and event table to a ``WandbLogger`` when present.
        print_summary: print the end-of-run summary (rank zero).
        flush_every_n_steps: loss values buffered on the device between host reads.
        warmup_steps: "early" for the recommendations (non-finite skips) and the grace period for fp16 overflows.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: an argument's value is out of range (the message names it and shows the value).
    """

    def __init__(
        self,
        *,
        dirpath: str | os.PathLike | None = None,
        filename: str = "stability_report",
        log_to_wandb: bool = True,
        print_summary: bool = True,
        flush_every_n_steps: int = 50,
        warmup_steps: int = 100,
    ) -> None:
        if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
            raise TypeError(f"`dirpath` must be a path or None, got {dirpath!r}")
        if os.sep in check_str("filename", filename) or "/" in filename:
            raise ValueError(f"`filename` must be a file stem without path separators, got {filename!r}")
        self.log_to_wandb = check_bool("log_to_wandb", log_to_wandb)
        self.print_summary = check_bool("print_summary", print_summary)
        self.flush_every_n_steps = check_int("flush_every_n_steps", flush_every_n_steps, 1)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.filename = filename

        self.event_log = EventLog(source=self.state_key)
        self._run_dir: Path | None = None
        self._buffer: Tensor | None = None
        self._buffer_steps: list[int] = []
        self._last_step = -1
        self._batch_step = 0
        self.last_report: dict[str, Any] | None = None
        self.last_paths: tuple[Path, Path] | None = None

    @property
    @override
    def state_key(self) -> str:
        return cached_state_key(self, filename=self.filename)

    # ------------------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if begin_fit(self, pl_module) is not None:  # a reused report describes this fit only (see `_refit`)
            self.event_log.reset()
            self._buffer, self._buffer_steps, self._last_step = None, [], -1
            self.last_report = self.last_paths = None
        if self.dirpath is not None:
            self._run_dir = self.dirpath
        else:
            log_dir = trainer.log_dir  # a broadcast: every rank must call it, so resolve it here, not at the end
            self._run_dir = Path(log_dir if log_dir is not None else trainer.default_root_dir)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step - 1  # a resumed run continues after its checkpointed step

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_step = trainer.global_step  # the step this batch belongs to, as `training_step` sees it

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = self._batch_step
        if pl_module.automatic_optimization and trainer.global_step == step:
            return  # a micro-batch of gradient accumulation: the step completes on a later batch
        if step <= self._last_step:
            return  # one value per step
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            return
        self._last_step = step
        loss = loss.detach()
        if loss.dim():  # reshape / float only when they change something (each is an op on the step's path)
            loss = loss.reshape(())
        if loss.dtype is not torch.float32:
            loss = loss.float()
        if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
            loss = loss * trainer.accumulate_grad_batches
        if self._buffer is None or self._buffer.device != loss.device:
            self._flush()
            self._buffer = torch.empty(self.flush_every_n_steps, dtype=torch.float32, device=loss.device)
        self._buffer[len(self._buffer_steps)] = loss  # a device copy, no host sync
        self._buffer_steps.append(step)
        if len(self._buffer_steps) == self.flush_every_n_steps:
            self._flush()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, status="finished")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        try:
            self._write(trainer, status="interrupted", exception=exception)
        except Exception as err:  # the original exception is the one the user must see
            rank_zero_warn(f"StabilityReport: could not write the report after {exception!r}: {err!r}")

    @override
    def state_dict(self) -> dict[str, Any]:
        self._flush()
        return {"event_log": self.event_log.state_dict(), "last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.event_log.load_state_dict(state_dict["event_log"])
        self._last_step = int(state_dict["last_step"])
        self._buffer_steps = []

    # ------------------------------------------------------------------------------------------------- loss trace
    def _flush(self) -> None:
        if not self._buffer_steps or self._buffer is None:
            return
        values = self._buffer[: len(self._buffer_steps)].tolist()  # the one host sync per flush
        for step, value in zip(self._buffer_steps, values):
            self.event_log.trace("loss", step, value)
        self._buffer_steps = []

    # ------------------------------------------------------------------------------------------------- report
    def _sources(self, trainer: pl.Trainer) -> list[Callback]:
        return [
            cb
            for cb in trainer.callbacks
            if cb is not self
            and not isinstance(cb, StabilityReport)
            and isinstance(getattr(cb, "event_log", None), EventLog)
        ]

    def build_report(
        self,
        trainer: pl.Trainer,
        *,
        status: str = "finished",
        exception: BaseException | None = None,
        rank_events: Mapping[str, list[dict[str, Any]]] | None = None,
    ) -> dict[str, Any]:
        """The report as a JSON-safe dict (see the class docstring for the schema). ``rank_events``: events other
        ranks recorded and this one did not, by source (see :meth:`_gather_rank_events`)."""
        self._flush()
        sources = {}
        labels: Counter[str] = Counter()
        for cb in self._sources(trainer):
            view = cb.event_log.to_json()
            label = _label(cb)
            labels[label] += 1
            if labels[label] > 1:  # two instances of one callback: keep the labels apart
                label = f"{label}#{labels[label]}"
            view.update(callback=type(cb).__name__, label=label)
            others = (rank_events or {}).get(cb.state_key, [])
            if others:
                view["events"] = sorted([*view["events"], *others], key=lambda e: e["step"])
                counts = dict(view["num_events"])
                for e in others:
                    counts[e["kind"]] = counts.get(e["kind"], 0) + 1
                view["num_events"] = counts
            for attr in _BOUND_ATTRIBUTES:  # bounds the recommendations compare traces with
                value = getattr(cb, attr, None)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    view[attr] = float(value)
            sources[cb.state_key] = _json_safe(view)
        report = {
            "schema_version": SCHEMA_VERSION,
            "status": status,
            "exception": None if exception is None else f"{type(exception).__name__}: {exception}",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "global_step": int(trainer.global_step),
            "epoch": int(trainer.current_epoch),
            "precision": str(trainer.precision),
            "loss": _json_safe([list(p) for p in self.event_log.traces.get("loss", [])]),
            "sources": sources,
        }
        report["summary"] = _json_safe(self._summarise(trainer, report))
        return report

    def _write(self, trainer: pl.Trainer, *, status: str, exception: BaseException | None = None) -> None:
        self._flush()
        # at the end of fit every rank is here, so the ranks' events can be gathered; after an exception (possibly on
        # one rank only) a collective could hang, so the report then holds rank zero's events only
        rank_events = self._gather_rank_events(trainer) if status == "finished" else {}
        if not trainer.is_global_zero:
            return
        from lightning_stability.callbacks._report_plot import render_report

        run_dir = self._run_dir or self.dirpath or Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        report = self.build_report(trainer, status=status, exception=exception, rank_events=rank_events)
        panels = self._panels(trainer, report)
        report["panels"] = [p.title for p in panels]
        json_path = run_dir / f"{self.filename}.json"
        png_path = run_dir / f"{self.filename}.png"
        _atomic_write_text(json_path, json.dumps(report, indent=2, allow_nan=False))
        title = f"Stability report: {status} at step {report['global_step']} ({report['precision']})"
        render_report(panels, png_path, title=title)
        self.last_report = report
        self.last_paths = (json_path, png_path)
        if self.log_to_wandb:
            self._log_wandb(trainer, report, png_path)
        if self.print_summary:
            rank_zero_info(self.format_summary(report, json_path, png_path))

    def _gather_rank_events(self, trainer: pl.Trainer) -> dict[str, list[dict[str, Any]]]:
        """On rank zero: the events that other ranks' sources recorded and rank zero's did not (same step, kind and
        reason counts as the same event), each with ``data["rank"]``; ``{}`` elsewhere and on one process.

        The package's callbacks take the same decisions on every rank, so under DDP and FSDP this is usually empty;
        it keeps what a rank-local source (a user's callback, a rank that alone saw something) recorded. One
        ``all_gather_object`` of the event lists, collective: every rank must call it.
        """
        import torch.distributed as dist

        if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return {}
        mine = {cb.state_key: [e.to_dict() for e in cb.event_log.events] for cb in self._sources(trainer)}
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        if not trainer.is_global_zero:
            return {}
        seen = {key: {(e["step"], e["kind"], e["reason"]) for e in events} for key, events in gathered[0].items()}
        extra: dict[str, list[dict[str, Any]]] = {}
        for rank, theirs in enumerate(gathered[1:], start=1):
            for key, events in theirs.items():
                known = seen.setdefault(key, set())
                for e in events:
                    signature = (e["step"], e["kind"], e["reason"])
                    if signature not in known:
                        known.add(signature)
                        extra.setdefault(key, []).append({**e, "data": {**e["data"], "rank": rank}})
        return extra

    def _log_wandb(self, trainer: pl.Trainer, report: dict[str, Any], png_path: Path) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        rows = [
            [e["step"], src["label"], e["kind"], e["reason"]]
            for src in report["sources"].values()
            for e in src["events"]
        ]
        rows.sort(key=lambda r: r[0])
        for logger in loggers:
            try:
                logger.log_image("stability_report/figure", [str(png_path)], step=report["global_step"])
                if rows:
                    logger.log_table("stability_report/events", columns=["step", "source", "kind", "reason"], data=rows)
            except Exception as err:  # the files on disk are the report; W&B is a copy
                rank_zero_warn(f"StabilityReport: logging to W&B failed ({err!r}); the report is in {png_path.parent}")

    # ----------------------------------------------------------------------------------------------- analysis
    def _summarise(self, trainer: pl.Trainer, report: dict[str, Any]) -> dict[str, Any]:
        skipped, amp_steps, rollbacks, clipped = [], [], [], 0
        causes: list[tuple[int, Any]] = []  # (step, data["cause"]) of every skip, read instead of the reason text
        replays: dict[str, int] = {}  # the guard's replays after a rollback, by data["cause"]: "data", "state"...
        for src in report["sources"].values():
            counts = src["num_events"]
            clipped += int(counts.get("clip", 0))
            for e in src["events"]:
                if e["kind"] in _SKIP_KINDS:
                    skipped.append({"step": e["step"], "reason": e["reason"], "source": src["label"]})
                    causes.append((e["step"], (e.get("data") or {}).get("cause")))
                elif e["kind"] == "amp_overflow":
                    amp_steps.append(e["step"])
                elif e["kind"] == "rollback":
                    rollbacks.append(e["step"])
                elif e["kind"] == "replay":
                    cause = str((e.get("data") or {}).get("cause"))
                    replays[cause] = replays.get(cause, 0) + 1
        num_skipped = sum(int(s["num_events"].get("skip", 0)) for s in report["sources"].values())
        num_amp = sum(int(s["num_events"].get("amp_overflow", 0)) for s in report["sources"].values())
        num_rollbacks = sum(int(s["num_events"].get("rollback", 0)) for s in report["sources"].values())
        # attribute counters some callbacks keep (exact even when their event list was bounded or aggregated)
        for cb in self._sources(trainer):
            num_skipped = max(num_skipped, int(getattr(cb, "num_skipped", 0) or 0))
            num_amp = max(num_amp, int(getattr(cb, "num_amp_overflows", 0) or 0))
            num_rollbacks = max(num_rollbacks, int(getattr(cb, "num_rollbacks", 0) or 0))
        skipped.sort(key=lambda s: s["step"])

        weight_changes = {}
        for src in report["sources"].values():
            series = _finite_values(src["traces"].get("weight", []))
            if series:
                changes = sum(1 for a, b in zip(series, series[1:]) if a != b)
                weight_changes[src["label"]] = {
                    "first": series[0],
                    "last": series[-1],
                    "changes": changes,
                    "min": min(series),
                    "max": max(series),
                }
        final_metrics = {}
        for key, value in sorted(trainer.callback_metrics.items()):
            if (isinstance(value, Tensor) and value.numel() == 1) or isinstance(value, (int, float)):
                final_metrics[key] = float(value)
        other_events = {}
        for src in report["sources"].values():
            others = {k: int(v) for k, v in src["num_events"].items() if k not in ("skip", "amp_overflow", "rollback")}
            if others:
                other_events[src["label"]] = others
        summary = {
            "skipped_steps": skipped,
            "skip_reasons": dict(Counter(_cause_class(c) for _, c in causes)),
            "num_skipped": num_skipped,
            "num_amp_overflows": num_amp,
            "num_rollbacks": num_rollbacks,
            "replays": replays,
            "num_clipped": clipped,
            "weight_changes": weight_changes,
            "other_events": other_events,
            "final_metrics": final_metrics,
        }
        summary["recommendations"] = self._recommend(trainer, report, summary, amp_steps, rollbacks, causes)
        return summary

    def _recommend(
        self,
        trainer: pl.Trainer,
        report: dict[str, Any],
        summary: dict[str, Any],
        amp_steps: list[int],
        rollbacks: list[int],
        causes: list[tuple[int, Any]],
    ) -> list[str]:
        recs: list[str] = []
        steps = max(int(report["global_step"]), 1)
        warm = self.warmup_steps
        late_amp = [s for s in amp_steps if s >= warm]
        late_span = max(steps - warm, 1)
        fp16 = str(report["precision"]).startswith("16")
        if fp16 and len(late_amp) >= 5 and len(late_amp) / late_span > 0.05:
            recs.append(
                f"{len(late_amp)} fp16 overflows after step {warm} ({len(late_amp) / late_span:.0%} of those "
                "steps): the loss scale keeps collapsing; train with precision='bf16-mixed' (or fp32 if the "
                "hardware has no bf16)."
            )
        early_nonfinite = [
            step for step, cause in causes if step < warm and cause == "nonfinite"
        ]
        if len(early_nonfinite) >= 3:
            recs.append(
                f"{len(early_nonfinite)} non-finite gradient skips in the first {warm} steps: lower the learning "
                "rate or add warm-up, and use a smaller initialisation (e.g. std 0.001 / scaled residual init)."
            )
        if summary["num_skipped"] > max(1, 0.05 * steps):
            recs.append(
                f"{summary['num_skipped']} of {steps} steps were skipped (> 5 %): look for bad batches (NaN inputs) "
                "near the skipped steps, or lower the learning rate."
            )
        if rollbacks:
            recs.append(
                f"{len(rollbacks)} rollback(s) (first at step {min(rollbacks)}): training hit persistent trouble; "
                "inspect the data and learning rate around that step."
            )
        recs.extend(_replay_advice(report))
        for src in report["sources"].values():
            bounds = (src.get("min_scale"), src.get("max_scale"))
            for name, points in src["traces"].items():
                if not _is_scale_trace(src, name):
                    continue
                tail = _finite_values(points[-max(1, len(points) // 4) :])
                if len(points) < 4 or not tail:
                    continue
                low, high = bounds
                if high is not None and all(v >= high * 0.99 for v in tail):
                    recs.append(
                        f"scale factor '{name}' is pinned at its upper bound {high:g} over the last quarter of the "
                        "run: the output is much quieter than its reference (in a residual stack: the residual path is "
                        "collapsing); strengthen the residual weight, check the initialisation, or add an RMS loss."
                    )
                elif low is not None and all(v <= low * 1.01 for v in tail):
                    recs.append(
                        f"scale factor '{name}' is pinned at its lower bound {low:g}: the model amplifies its output; "
                        "check learnable gains and the output layer's initialisation."
                    )
        for label, info in summary["weight_changes"].items():
            src = next(s for s in report["sources"].values() if s["label"] == label)
            ceiling = src.get("max_weight")
            if ceiling is not None and info["last"] >= ceiling * 0.999:
                recs.append(
                    f"loss weight '{label}' ended at its ceiling {ceiling:g}: it is compensating for a term that does "
                    "not improve; check that term rather than raising the ceiling."
                )
        for src in report["sources"].values():
            norms = _finite_values(src["traces"].get("grad_norm", []))
            if len(norms) >= 8:
                q = len(norms) // 4
                first, last = statistics.median(norms[:q]), statistics.median(norms[-q:])
                if first > 0 and last / first > 5:
                    recs.append(
                        f"gradient norm grew {last / first:.1f}x from the first to the last quarter of the run "
                        f"({first:.3g} -> {last:.3g}): add clipping (GradientGuard(max_norm=...)), spectral norm on "
                        "output projections, or lower the learning rate."
                    )
        # one piece of advice per finding and validation loader, naming every key that shows it (SignalMonitor's
        # signal/val/rms_ratio and a module's own val/rms_ratio measure the same thing)
        found: dict[tuple[str, str], list[str]] = {}
        for key, value in summary["final_metrics"].items():
            name = _metric_name(key)
            if not math.isfinite(value):
                continue
            if name.endswith("val/rms_ratio") and not 0.5 <= value <= 2.0:
                found.setdefault(("rms", key[len(name) :]), []).append(f"{key} = {value:.3g}")
            if name.endswith("val/dc_offset") and abs(value) > 0.1:
                found.setdefault(("dc", key[len(name) :]), []).append(f"{key} = {value:.3g}")
        for (kind, _), shown in found.items():
            if kind == "rms":
                recs.append(
                    f"final {', '.join(shown)}: the output loudness does not match the target; add an RMS-matching "
                    "loss or normalise amplitudes (EnCodec-style scale, or -16 LUFS data)."
                )
            else:
                recs.append(f"final {', '.join(shown)}: the output has a DC offset; check output biases/activations.")
        loss = self.event_log.traces.get("loss", [])
        if loss and not math.isfinite(loss[-1][1]):
            recs.append("the last recorded training loss is not finite: the run diverged (see the skipped steps).")
        recs.extend(_advice(report))
        return recs

    @staticmethod
    def format_summary(report: dict[str, Any], json_path: Path | None = None, png_path: Path | None = None) -> str:
        """The end-of-run text (what ``print_summary`` prints)."""
        s = report["summary"]
        lines = [f"Stability report ({report['status']}, step {report['global_step']}, {report['precision']}):"]
        if json_path is not None:
            lines.append(f"  files: {json_path} and {png_path}")
        reasons = ", ".join(f"{k}: {v}" for k, v in s["skip_reasons"].items())
        skipped_at = ", ".join(str(x["step"]) for x in s["skipped_steps"][:10])
        more = " ..." if len(s["skipped_steps"]) > 10 else ""
        lines.append(
            f"  skipped steps: {s['num_skipped']}" + (f" ({reasons}) at steps {skipped_at}{more}" if reasons else "")
        )
        replays = ", ".join(f"{cause}: {n}" for cause, n in s.get("replays", {}).items())
        lines.append(
            f"  rollbacks: {s['num_rollbacks']}"
            + (f" (replayed: {replays})" if replays else "")
            + f"; fp16 overflows: {s['num_amp_overflows']}; clipped: {s['num_clipped']}"
        )
        for label, info in s["weight_changes"].items():
            lines.append(
                f"  weight '{label}': {info['first']:.4g} -> {info['last']:.4g} ({info['changes']} changes, "
                f"range [{info['min']:.4g}, {info['max']:.4g}])"
            )
        for label, counts in s["other_events"].items():
            lines.append(f"  {label} events: " + ", ".join(f"{kind} x{n}" for kind, n in counts.items()))
        if report["loss"]:
            first, last = report["loss"][0], report["loss"][-1]
            lines.append(f"  loss: {_fmt(first[1])} (step {first[0]}) -> {_fmt(last[1])} (step {last[0]})")
        if s["final_metrics"]:
            # losses and validation signal metrics first, then the rest (alphabetical within each group)
            order = sorted(
                s["final_metrics"].items(),
                key=lambda kv: (0 if "loss" in kv[0] else 1 if "val/" in kv[0] else 2, kv[0]),
            )
            shown = order[:16]
            more = f" (+{len(order) - len(shown)} more in the JSON)" if len(order) > len(shown) else ""
            lines.append("  final metrics: " + ", ".join(f"{k}={_fmt(v)}" for k, v in shown) + more)
        if s["recommendations"]:
            lines.append("  recommendations:")
            lines.extend(f"   - {r}" for r in s["recommendations"])
        else:
            lines.append("  recommendations: none (no evidence of instability)")
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------------------- figure
    def _panels(self, trainer: pl.Trainer, report: dict[str, Any]) -> list[Panel]:
        from lightning_stability.callbacks._report_plot import Panel, Series

        marks: dict[str, list[int]] = {}
        for src in report["sources"].values():
            for e in src["events"]:
                if e["kind"] in ("skip", "rollback", "amp_overflow"):
                    marks.setdefault(e["kind"], []).append(e["step"])
        marks = {f"{k} ({len(v)})": sorted(v) for k, v in marks.items()}

        def series(src: dict, name: str, label: str) -> Series:
            pts = src["traces"][name]
            return Series(label, [p[0] for p in pts], [_as_float(p[1]) for p in pts])

        grad = Panel("Gradient norm (marked: skipped steps, rollbacks, fp16 overflows)", "total norm", log_y=True)
        loss = Panel("Training loss", "loss", log_y=True)
        weights = Panel("Loss weights", "weight")
        scales = Panel("Scale factors", "factor")
        sigmas = Panel("Spectral norm: largest singular value of the original weight", "sigma")
        snr = Panel("SNR / SI-SNR", "dB")
        rms = Panel("RMS ratio (output / target)", "ratio", hlines={"matched (1.0)": 1.0})
        for src in report["sources"].values():
            label = src["label"]
            for name in src["traces"]:
                if name == "grad_norm":
                    grad.series.append(series(src, name, label))
                elif name == "weight":
                    weights.series.append(series(src, name, label))
                elif name.endswith("sigma"):
                    sigmas.series.append(series(src, name, name.removesuffix("/sigma")))
                elif _metric_name(name).endswith("snr"):
                    snr.series.append(series(src, name, name))
                elif _metric_name(name).endswith("rms_ratio"):
                    rms.series.append(series(src, name, name))
                elif _is_scale_trace(src, name):
                    scales.series.append(series(src, name, name))
                    for bound in ("min_scale", "max_scale"):
                        if src.get(bound) is not None:
                            scales.hlines[f"{bound} {src[bound]:g}"] = float(src[bound])
        if report["loss"]:
            pts = report["loss"]
            loss.series.append(Series("loss (rank 0)", [p[0] for p in pts], [_as_float(p[1]) for p in pts]))
        if grad.series:
            grad.marks = marks
        elif loss.series:
            loss.marks = marks
        return [p for p in (grad, loss, weights, scales, sigmas, snr, rms) if p.series]


# ---------------------------------------------------------------------------------------------------- helpers
def _advice(report: dict[str, Any]) -> list[str]:
    """One recommendation per (source, kind) of the events that carry ``data["advice"]`` (any callback's findings,
    e.g. ``CodebookMonitor``'s "codebook_collapse"): the first such event's reason, how often it happened, the
    advice."""
    recs, seen = [], set()
    for src in report["sources"].values():
        for e in src["events"]:
            advice = (e.get("data") or {}).get("advice")
            if not isinstance(advice, str) or (src["label"], e["kind"]) in seen:
                continue
            seen.add((src["label"], e["kind"]))
            count = int(src["num_events"].get(e["kind"], 1))
            times = f"; {count} such events" if count > 1 else ""
            recs.append(f"{src['label']}: {e['reason']} (step {e['step']}{times}): {advice}.")
    return recs


def _replay_advice(report: dict[str, Any]) -> list[str]:
    """One recommendation per cause of the guard's replays after a rollback (``"data"``: the batch brought the trouble
    back from the restored state; ``"state"``: it did not)."""
    first: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    for src in report["sources"].values():
        for e in src["events"]:
            if e["kind"] != "replay":
                continue
            cause = (e.get("data") or {}).get("cause")
            counts[cause] = counts.get(cause, 0) + 1
            first.setdefault(cause, e)
    recs = []
    if "data" in first:
        e = first["data"]
        where = _position((e.get("data") or {}).get("position"))
        recs.append(
            f"{counts['data']} rollback(s) came back when the batch was replayed from the restored state (first: step "
            f"{e['step']}{where}): a data problem. Those batches are quarantined (skipped when they come back, after a"
            " resume too); inspect their samples (NaN or inf values, wrong scale, corrupt files) and fix or drop them."
        )
    if "state" in first:
        e = first["state"]
        recs.append(
            f"{counts['state']} rollback(s) did not come back when the batch was replayed from the restored state "
            f"(first: step {e['step']}): the state at that point was the problem, not the data; lower the learning "
            "rate or lengthen its warm-up around that step, and look for weights or optimizer moments that grew."
        )
    return recs


def _position(position: Any) -> str:
    if isinstance(position, (list, tuple)) and len(position) == 2:
        return f", epoch {position[0]} batch {position[1]}"
    return ""


def _label(cb: Callback) -> str:
    loss = getattr(cb, "loss", None)
    if isinstance(loss, str):
        return loss
    names = {
        "GradientGuard": "guard",
        "ScaleFactorClamp": "scale",
        "SpectralNormInjection": "specnorm",
        "SignalMonitor": "signal",
        "CodebookMonitor": "codebook",
        "AdversarialBalanceMonitor": "adversarial",
    }
    return names.get(type(cb).__name__, type(cb).__name__)


def _metric_name(key: str) -> str:
    """``key`` without Lightning's ``/dataloader_idx_<i>`` suffix (a metric of one of several evaluation loaders)."""
    return re.sub(r"/dataloader_idx_\d+$", "", key)


def _is_scale_trace(src: dict, name: str) -> bool:
    if "clamped_fraction" in name or "fraction" in name:
        return False
    return src.get("callback") == "ScaleFactorClamp" or "scale" in name.split("/")[-1]


def _as_float(value: Any) -> float:
    return float(value)  # also parses the JSON view's "nan"/"inf" strings back


def _finite_values(points: list) -> list[float]:
    values = [_as_float(p[1]) for p in points]
    return [v for v in values if math.isfinite(v)]


#: how the summary counts the guard's skips, by the structured cause of the event (``data["cause"]``, the
#: guard's action name): "non-finite: 3, spike: 1"
_CAUSE_CLASSES = {
    "nonfinite": "non-finite",
    "spike": "spike",
    "moment_spike": "spike",
    "over_max": "norm above bound",
    "forced": "after rollback",
    "quarantined": "quarantined batch",
}


def _cause_class(cause: str | None) -> str:
    """A short class for a skip's cause (an event of a user's callback may name its own cause, or none)."""
    if cause is None:
        return "unspecified"
    return _CAUSE_CLASSES.get(str(cause), str(cause))


def _fmt(value: Any) -> str:
    value = _as_float(value)
    return f"{value:.4g}"


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, Tensor):
        return _json_safe(x.tolist())
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if hasattr(x, "tolist"):  # numpy scalars and arrays
        return _json_safe(x.tolist())
    return repr(x)  # anything else a callback put into an event's data


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
