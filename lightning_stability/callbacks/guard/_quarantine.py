"""Quarantine for ``GradientGuard``: the batches that led to a rollback, remembered and skipped when they come back.

A batch is known by its position, ``(epoch, batch_idx)`` as Lightning numbers them (``trainer.current_epoch`` and the
``batch_idx`` of ``on_train_batch_start``). With automatic optimization and gradient accumulation, a step's position is
that of the batch the optimizer steps in (the last one of the accumulation window).

What is quarantined (``GradientGuard(quarantine=...)``):

- ``"rollback"`` (default): at a rollback, the batch of the step that triggered it and those of the steps skipped in
  the streak of trouble before it (guard skips since the last step taken; the forced skips of the window after an
  earlier rollback and fp16 overflows are not trouble and not recorded), unless the replay of the triggering batch
  (``guard._replay``) found the trouble did not come back with it (the cause was the state, not the data);
- ``"skipped"``: also every batch whose step the guard skipped as trouble (non-finite, spike, over ``max_norm``);
- ``"off"``: nothing.

A quarantined position that comes back (a run resumed from a checkpoint saved before it, with the same sampler order)
has its optimizer steps forced-skipped, as the window after a rollback does. The positions are in the guard's
``state_dict``; loading one adds its positions to those the guard already holds, so a guard that learned of a bad batch
does not forget it when it resumes from an older checkpoint that did not know it.

Sync-free mode: the decisions of the steps since the last host read are kept as device codes and read with it
(:meth:`Quarantine.settle`), so the streak is the same as on the host path.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from lightning_stability.callbacks.guard._policy import STEPPED, TROUBLE, Action

#: ``(epoch, batch_idx)``
Position = tuple[int, int]

MODES = ("rollback", "skipped", "off")


class Quarantine:
    """The quarantined positions, the streak of trouble since the last step taken, and the batch in flight."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.positions: set[Position] = set()
        self.streak: list[Position] = []  # positions of the trouble skips since the last step taken, in order
        self.current: Position | None = None
        self.hit = False  # the batch in flight is quarantined: its steps are forced-skipped
        self.batch: Any = None  # the batch in flight (a reference, for the replay after a rollback)
        self.batch_idx: int | None = None
        self._pending: list[tuple[Position | None, Tensor, bool]] = []  # sync-free: codes not read yet

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def sorted(self) -> list[Position]:
        return sorted(self.positions)

    def add(self, positions: Iterable[Iterable[int]]) -> list[Position]:
        """Quarantine ``positions``; returns those that were new."""
        new = []
        for pos in positions:
            epoch, batch_idx = (int(v) for v in pos)
            if (epoch, batch_idx) not in self.positions:
                self.positions.add((epoch, batch_idx))
                new.append((epoch, batch_idx))
        return new

    # ------------------------------------------------------------------------------------------------------------------
    # the training loop

    def batch_start(self, epoch: int, batch_idx: int, batch: Any) -> None:
        self.current = (int(epoch), int(batch_idx))
        self.batch, self.batch_idx = batch, batch_idx
        self.hit = self.enabled and self.current in self.positions

    def batch_end(self) -> None:
        self.batch = None
        self.hit = False

    def note(self, action: Action, forced: bool) -> None:
        """A decision taken on the host for the batch in flight."""
        if not self.enabled or self.current is None:
            return
        if action in STEPPED:
            self.streak.clear()
        elif action in TROUBLE and not forced:
            if self.current not in self.streak:  # manual optimization: several optimizers in one batch
                self.streak.append(self.current)
            if self.mode == "skipped":
                self.positions.add(self.current)

    def note_on_device(self, code: Tensor, forced: bool) -> None:
        """Sync-free mode: a decision still on the device, read at the next host read (:meth:`settle`)."""
        if self.enabled:
            self._pending.append((self.current, code.reshape(()), forced))

    def pending_codes(self) -> list[Tensor]:
        return [code for _, code, _ in self._pending]

    def settle(self, codes: list[float]) -> None:
        """The host read of the pending decisions (``codes``, in the order of :meth:`pending_codes`)."""
        pending, self._pending = self._pending, []
        current = self.current
        for (pos, _, forced), code in zip(pending, codes):
            self.current = pos
            self.note(Action(int(code)), forced)
        self.current = current

    def take_streak(self) -> list[Position]:
        """At a rollback: the positions of the streak that led to it (the batch in flight included); the streak
        starts again."""
        streak = list(self.streak)
        if self.current is not None and self.current not in streak:
            streak.append(self.current)
        self.streak.clear()
        return streak

    def reset(self) -> None:
        """A new fit: no streak, no batch in flight (the positions are kept: they describe the data)."""
        self.streak.clear()
        self._pending.clear()
        self.current = None
        self.batch = None
        self.hit = False

    # ------------------------------------------------------------------------------------------------------------------
    # checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "quarantine": [list(p) for p in self.sorted()],
            "quarantine_streak": [list(p) for p in self.streak],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Add the checkpoint's positions (versions 1-3 have none) and take its streak."""
        self.add(state.get("quarantine", ()))
        self.streak = [(int(e), int(b)) for e, b in state.get("quarantine_streak", ())]
