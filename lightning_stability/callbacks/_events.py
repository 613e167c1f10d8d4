"""The record every callback keeps of what it did, read by ``StabilityReport`` (public: ``EventLog`` and
``StabilityEvent`` are exported from ``lightning_stability.callbacks``).

A callback that wants to appear in the report exposes ``self.event_log: EventLog``. The log holds

- ``events``: a bounded list of :class:`StabilityEvent` (a skip, a rollback, a weight change, a clamp warning...),
- ``traces``: named series of ``(step, value)`` points (gradient norm, loss weight, scale factor, SNR...), bounded by
  keeping every other point once a series is full, so a long run keeps its whole shape at a fixed memory cost.

Consumers read an event's ``kind`` and ``data["cause"]``, never its ``reason`` (a sentence for a person, which may be
reworded). The kinds per source:

- ``GradientGuard``: ``"skip"``, ``"clip"``, ``"rebase"``, ``"amp_overflow"`` (``cause``: the decision, one of
  ``"nonfinite"``, ``"over_max"``, ``"spike"``, ``"moment_spike"``, ``"forced"`` (inside the window after a rollback),
  ``"quarantined"`` (a quarantined batch came back), ``"clip"``, ``"rebase"``, ``"amp_overflow"``); ``"rollback"``,
  ``"stop"``, ``"raise"`` (``cause``: ``"consecutive_skips"``, ``"consecutive_amp_overflows"``, ``"corrupted"``);
  ``"replay"`` after every rollback (``cause``: ``"data"``, the replayed batch brought the trouble back; ``"state"``,
  it did not; ``"unavailable"``, no replay, ``data["why"]``); ``"snapshot_refused"`` (``"nonfinite_state"``).
- the other callbacks write their own kinds (``AdaptiveLossWeight``'s weight changes, ``ScaleFactorClamp``'s
  ``"scale_high"``, ``CodebookMonitor``'s ``"codebook_collapse"``...); the report counts every kind it does not know
  under its source and shows the first such event's reason.
- a user's callback: any kind and cause; ``"skip"`` events are counted as skipped steps by their ``data["cause"]``.

Both are plain Python data so ``state_dict()`` round-trips through a checkpoint and a resumed run's report continues
where the interrupted one stopped.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_stability._checks import check_int


@dataclass
class StabilityEvent:
    """One decision a callback made. ``kind`` is a short machine-readable word (see the module docstring for the
    kinds of each callback), ``reason`` a sentence for a person, ``data`` the numbers, with ``data["cause"]`` a short
    machine-readable word when the kind has causes."""

    step: int
    source: str
    kind: str
    reason: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EventLog:
    """Bounded events and traces of one callback (give your own callback one to appear in ``StabilityReport``).

    Example::

        from lightning.pytorch.callbacks import Callback
        from lightning_stability.callbacks import EventLog

        class LossWatch(Callback):
            def __init__(self):
                self.event_log = EventLog(source="LossWatch")

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                loss = float(outputs["loss"])
                self.event_log.trace("loss", trainer.global_step, loss)
                if loss > 10:
                    self.event_log.add(trainer.global_step, "loss_high", f"loss {loss:.3g} > 10", cause="threshold")

    Args:
        source: name written into every event (usually the callback's ``state_key``).
        max_events: the oldest events are dropped beyond this count (the counts in ``num_events`` keep growing).
        max_trace_points: a trace that reaches this length is thinned to every other point (and so keeps the
            whole run at half the resolution).
    """

    def __init__(self, source: str, max_events: int = 1000, max_trace_points: int = 4096) -> None:
        if not isinstance(source, str):
            raise TypeError(f"`source` must be a string, got {source!r}")
        check_int("max_events", max_events, 1)
        check_int("max_trace_points", max_trace_points, 2)
        self.source = source
        self.max_events = max_events
        self.max_trace_points = max_trace_points
        self.events: deque[StabilityEvent] = deque(maxlen=max_events)
        self.num_events: dict[str, int] = {}
        self.traces: dict[str, list[tuple[int, float]]] = {}
        self._stride: dict[str, int] = {}
        self._seen: dict[str, int] = {}

    def __iter__(self) -> Iterator[StabilityEvent]:
        """The kept events, oldest first (``for event in guard.event_log``)."""
        return iter(list(self.events))

    def __len__(self) -> int:
        """The number of kept events (``num_events`` counts every event ever added, by kind)."""
        return len(self.events)

    def reset(self) -> None:
        """Forget every event and trace (a callback reused in a new fit)."""
        self.events.clear()
        self.num_events = {}
        self.traces = {}
        self._stride = {}
        self._seen = {}

    def add(self, step: int, kind: str, reason: str, **data: Any) -> StabilityEvent:
        event = StabilityEvent(int(step), self.source, kind, reason, dict(data))
        self.events.append(event)
        self.num_events[kind] = self.num_events.get(kind, 0) + 1
        return event

    def trace(self, name: str, step: int, value: float) -> None:
        """Append ``(step, value)`` to trace ``name`` (non-finite values are kept as ``nan``/``inf``)."""
        stride = self._stride.setdefault(name, 1)
        seen = self._seen.get(name, 0)
        self._seen[name] = seen + 1
        if seen % stride:
            return
        series = self.traces.setdefault(name, [])
        series.append((int(step), float(value)))
        if len(series) >= self.max_trace_points:
            del series[1::2]
            self._stride[name] = stride * 2

    def state_dict(self) -> dict[str, Any]:
        return {
            "events": [e.to_dict() for e in self.events],
            "num_events": dict(self.num_events),
            "traces": {k: [list(p) for p in v] for k, v in self.traces.items()},
            "stride": dict(self._stride),
            "seen": dict(self._seen),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events = deque((StabilityEvent(**e) for e in state["events"]), maxlen=self.max_events)
        self.num_events = dict(state["num_events"])
        self.traces = {k: [(int(s), float(v)) for s, v in pts] for k, pts in state["traces"].items()}
        self._stride = dict(state["stride"])
        self._seen = dict(state["seen"])

    def to_json(self) -> dict[str, Any]:
        """JSON-safe view (non-finite floats become strings ``"nan"``, ``"inf"``, ``"-inf"``)."""

        def safe(x: Any) -> Any:
            if isinstance(x, float) and not math.isfinite(x):
                return str(x)
            if isinstance(x, dict):
                return {k: safe(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [safe(v) for v in x]
            return x

        return safe(
            {
                "source": self.source,
                "events": [e.to_dict() for e in self.events],
                "num_events": self.num_events,
                "traces": {k: [list(p) for p in v] for k, v in self.traces.items()},
            }
        )
