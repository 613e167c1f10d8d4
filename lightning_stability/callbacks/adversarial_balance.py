"""``AdversarialBalanceMonitor``: the state of a GAN's two-player game, from its loss dict, and what goes wrong."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_stability._checks import check_choice, check_fraction, check_int, check_number, check_positive, check_str
from lightning_stability.callbacks._events import EventLog
from lightning_stability.callbacks._logging import log_scalars, logger_step
from lightning_stability.callbacks._state_key import cached_state_key

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch.optim import Optimizer

__all__ = ["AdversarialBalanceMonitor"]

# the discriminator loss of a discriminator that outputs a constant (learns nothing), and the threshold between
# "real" and "generated" for its accuracy, per loss type
_CHANCE = {"hinge": 2.0, "ls": 0.5, "bce": 2 * math.log(2)}
_THRESHOLD = {"hinge": 0.0, "ls": 0.5, "bce": 0.0}
# the slots of the device accumulator: sums over the window, and how many batches contributed to each
_SLOTS = ("disc", "adv", "feat", "acc_real", "acc_fake", "gnorm_g", "gnorm_d")

ADVICE = {
    "disc_winning": (
        "lower the discriminator's learning rate (or raise the generator's), start the discriminator later (after "
        "the reconstruction losses have converged), or add a gradient penalty / spectral norm to the discriminator"
    ),
    "disc_learning_nothing": (
        "the discriminator is not learning: check that its optimizer steps (manual optimization: opt_d.step() is "
        "called, its parameters are not frozen by a toggle), raise its learning rate, check its input (real and "
        "generated audio at the same scale, not detached real)"
    ),
    "feature_matching_collapse": (
        "feature-matching (or the generator's adversarial) term fell to 0: the generator's loss is probably "
        "training the discriminator too: check `zero_grad` placement and `toggle_optimizer`, so the discriminator "
        "is only stepped on its own loss and its gradients are cleared before the generator's backward"
    ),
    "grad_ratio_drift": (
        "the generator/discriminator gradient-norm ratio drifted far from its start: one player dominates; balance "
        "the learning rates, clip both players' gradients, or add a gradient penalty to the discriminator"
    ),
}


class AdversarialBalanceMonitor(Callback):
    r"""Watch the generator/discriminator game of a GAN-trained model (a neural codec, a vocoder).

    Reads, after every training batch, the step's output (with manual optimization Lightning hands callbacks what
    ``training_step`` returned): each name is looked up in ``outputs["losses"]`` first, then in ``outputs`` itself:

    - ``disc_loss`` (default ``"disc_loss"``): the discriminator's loss of the step;
    - ``adversarial_loss`` (default ``"adv"``): the generator's adversarial term;
    - ``feature_loss`` (default ``"feat"``): the feature-matching term;
    - optional ``real_scores`` / ``fake_scores`` (defaults ``"disc_real"`` / ``"disc_fake"``): the discriminator's
      outputs (logits, any shape) on real and generated audio; with them the discriminator's accuracy is logged
      (real above, generated below the loss type's threshold: 0 for hinge and BCE logits, 0.5 for least squares).

    The defaults are the names :class:`~lightning_stability.modules.CodecModule` returns with ``adversarial=True``. A
    term that is missing is not monitored. Gradient norms of both players are read in ``on_before_optimizer_step``
    on the batches that end a window: the optimizer at ``disc_optimizer_index`` in ``trainer.optimizers`` is the
    discriminator's, the others the generator's (manual optimization with two optimizers; with one optimizer there
    is no ratio).

    The values are summed on the device (no host sync per step) and read every ``every_n_steps`` training batches
    (summed over ranks: every rank takes the same decision). Logged (``prefix`` default ``"adversarial/"``):
    ``disc_loss``, ``adv_loss``, ``feat_loss`` (window means), ``disc_accuracy``, ``balance`` (discriminator loss /
    its chance value: 1 is a discriminator at chance, 0 one that wins outright) and ``grad_ratio`` (generator /
    discriminator gradient norm). Each is traced into ``self.event_log``.

    Findings (``rank_zero_warn``, an event with ``data["advice"]`` that
    :class:`~lightning_stability.callbacks.StabilityReport` lists as a recommendation; each once per episode):

    - ``"disc_winning"``: the discriminator loss below ``win_fraction`` x its chance value for ``window`` checks
      while the generator's adversarial loss did not fall over those checks;
    - ``"disc_learning_nothing"``: the discriminator loss within ``chance_tolerance`` (relative) of its chance value
      for ``window`` checks after ``warmup_steps`` batches;
    - ``"feature_matching_collapse"``: the feature-matching term (or the adversarial term) below
      ``collapse_fraction`` x its first window's value for ``window`` checks;
    - ``"grad_ratio_drift"``: the gradient-norm ratio more than ``drift_factor`` times away (either way) from its
      first value after warm-up for ``drift_window`` checks.

    Args:
        disc_loss, adversarial_loss, feature_loss, real_scores, fake_scores: the names (see above; None: unused).
        loss_type: ``"hinge"``, ``"ls"`` or ``"bce"``: sets the chance value of the discriminator loss (2, 0.5,
            2 ln 2) and the accuracy threshold.
        chance_value: override the chance value of the discriminator loss.
        disc_optimizer_index: the discriminator's optimizer in ``trainer.optimizers`` (None: no gradient ratio).
        every_n_steps: training batches per check.
        window, drift_window: consecutive checks a finding needs.
        warmup_steps: batches before ``disc_learning_nothing`` and the ratio's reference are considered.
        win_fraction, chance_tolerance, collapse_fraction, drift_factor: thresholds (see above).
        prefix: key prefix of the logged scalars.

    Raises:
        TypeError, ValueError: bad arguments; at a step, a named term that is not a tensor or number.
    """

    def __init__(
        self,
        *,
        disc_loss: str | None = "disc_loss",
        adversarial_loss: str | None = "adv",
        feature_loss: str | None = "feat",
        real_scores: str | None = "disc_real",
        fake_scores: str | None = "disc_fake",
        loss_type: str = "hinge",
        chance_value: float | None = None,
        disc_optimizer_index: int | None = 1,
        every_n_steps: int = 25,
        window: int = 4,
        drift_window: int = 8,
        warmup_steps: int = 200,
        win_fraction: float = 0.1,
        chance_tolerance: float = 0.02,
        collapse_fraction: float = 0.05,
        drift_factor: float = 100.0,
        prefix: str = "adversarial/",
    ) -> None:
        for name, key in (
            ("disc_loss", disc_loss),
            ("adversarial_loss", adversarial_loss),
            ("feature_loss", feature_loss),
            ("real_scores", real_scores),
            ("fake_scores", fake_scores),
        ):
            check_str(name, key, allow_none=True)
        check_choice("loss_type", loss_type, sorted(_CHANCE))
        if chance_value is not None:
            check_positive("chance_value", chance_value)
        if disc_optimizer_index is not None:
            check_int("disc_optimizer_index", disc_optimizer_index, 0)
        for name, value, low in (
            ("every_n_steps", every_n_steps, 1),
            ("window", window, 1),
            ("drift_window", drift_window, 1),
            ("warmup_steps", warmup_steps, 0),
        ):
            check_int(name, value, low)
        for name, value in (
            ("win_fraction", win_fraction),
            ("chance_tolerance", chance_tolerance),
            ("collapse_fraction", collapse_fraction),
        ):
            check_fraction(name, value)
        check_number("drift_factor", drift_factor, minimum=1, exclusive=True)
        if not isinstance(prefix, str):
            raise TypeError(f"`prefix` must be a string, got {prefix!r}")
        self.keys = {
            "disc": disc_loss,
            "adv": adversarial_loss,
            "feat": feature_loss,
            "real": real_scores,
            "fake": fake_scores,
        }
        self.loss_type = loss_type
        self.chance_value = float(chance_value) if chance_value is not None else _CHANCE[loss_type]
        self.threshold = _THRESHOLD[loss_type]
        self.disc_optimizer_index = disc_optimizer_index
        self.every_n_steps = every_n_steps
        self.window = window
        self.drift_window = drift_window
        self.warmup_steps = warmup_steps
        self.win_fraction = float(win_fraction)
        self.chance_tolerance = float(chance_tolerance)
        self.collapse_fraction = float(collapse_fraction)
        self.drift_factor = float(drift_factor)
        self.prefix = prefix
        self.event_log = EventLog(source=self.state_key)
        self.last_values: dict[str, float] = {}
        self._sums: Tensor | None = None  # [2, len(_SLOTS)]: sums and counts
        self._batches = 0
        self._history: list[dict[str, float]] = []  # the last checks' window means (host)
        self._reference: dict[str, float] = {}  # first-window values of feat/adv and the ratio after warm-up
        self._streaks: dict[str, int] = {}
        self._flagged: dict[str, bool] = {}

    @property
    @override
    def state_key(self) -> str:
        return cached_state_key(self, prefix=self.prefix)

    # ---------------------------------------------------------------------------------------------- training
    def _slot(self, name: str) -> int:
        return _SLOTS.index(name)

    def _add(self, name: str, value: Tensor) -> None:
        if self._sums is None:
            self._sums = torch.zeros(2, len(_SLOTS), dtype=torch.float64, device=value.device)
        elif self._sums.device != value.device:  # a window restored from a checkpoint (on the CPU)
            self._sums = self._sums.to(value.device)
        i = self._slot(name)
        self._sums[0, i] += value.detach().double().reshape(())
        self._sums[1, i] += 1

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer):
        if self.disc_optimizer_index is None or (self._batches + 1) % self.every_n_steps:
            return  # norms only on the batch that ends a window
        optimizers = [getattr(o, "_optimizer", o) for o in trainer.optimizers]
        if len(optimizers) < 2:
            return
        index = next((i for i, o in enumerate(optimizers) if o is getattr(optimizer, "_optimizer", optimizer)), None)
        if index is None:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
        self._add("gnorm_d" if index == self.disc_optimizer_index else "gnorm_g", norm)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.sanity_checking:
            return
        if isinstance(outputs, Mapping):
            losses = outputs.get("losses")
            losses = losses if isinstance(losses, Mapping) else {}
            for slot in ("disc", "adv", "feat"):
                value = self._lookup(outputs, losses, self.keys[slot])
                if value is not None:
                    self._add(slot, value.float().mean())
            real = self._lookup(outputs, losses, self.keys["real"])
            fake = self._lookup(outputs, losses, self.keys["fake"])
            if real is not None and fake is not None:
                self._add("acc_real", (real.float() > self.threshold).float().mean())
                self._add("acc_fake", (fake.float() < self.threshold).float().mean())
        self._batches += 1
        if self._batches % self.every_n_steps == 0:
            self.check(trainer)

    def _lookup(self, outputs: Mapping, losses: Mapping, key: str | None) -> Tensor | None:
        if key is None:
            return None
        value = losses.get(key, outputs.get(key))
        if value is None:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return torch.tensor(float(value))
        if not isinstance(value, Tensor) or value.numel() == 0:
            raise TypeError(
                f"AdversarialBalanceMonitor: the step output {key!r} must be a non-empty tensor or a number, got "
                f"{type(value).__name__}"
            )
        return value.detach()

    # ------------------------------------------------------------------------------------------------ checks
    def check(self, trainer: pl.Trainer | None = None) -> dict[str, float]:
        """Read the window's sums (over ranks), log, decide, reset. Collective under DDP."""
        if self._sums is None:
            return {}
        sums = self._sums
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        host = sums.cpu().tolist()  # the one host read of the window
        sums.zero_()
        means = {
            name: (host[0][i] / host[1][i]) for i, name in enumerate(_SLOTS) if host[1][i] > 0
        }  # norms under DDP: the ranks' equal norms averaged
        step = logger_step(trainer) if trainer is not None else self._batches
        values: dict[str, float] = {}
        if "disc" in means:
            values["disc_loss"] = means["disc"]
            values["balance"] = means["disc"] / self.chance_value
        if "adv" in means:
            values["adv_loss"] = means["adv"]
        if "feat" in means:
            values["feat_loss"] = means["feat"]
        if "acc_real" in means and "acc_fake" in means:
            values["disc_accuracy"] = 0.5 * (means["acc_real"] + means["acc_fake"])
        if "gnorm_g" in means and "gnorm_d" in means and means["gnorm_d"] > 0:
            values["grad_ratio"] = means["gnorm_g"] / means["gnorm_d"]
        for key, value in values.items():
            self.event_log.trace(key, step, value)
        self._history = [*self._history, values][-max(self.window, 2) :]
        self._decide(step, values)
        self.last_values = {f"{self.prefix}{k}": v for k, v in values.items()}
        if trainer is not None:
            log_scalars(trainer, self.last_values, step=step)
        return self.last_values

    def _streak(self, name: str, condition: bool, needed: int) -> bool:
        """Count consecutive checks where ``condition`` holds; True once per episode when ``needed`` is reached."""
        if not condition:
            self._streaks[name] = 0
            self._flagged[name] = False
            return False
        self._streaks[name] = self._streaks.get(name, 0) + 1
        if self._streaks[name] >= needed and not self._flagged.get(name, False):
            self._flagged[name] = True
            return True
        return False

    def _decide(self, step: int, v: dict[str, float]) -> None:
        past_warmup = self._batches >= self.warmup_steps
        for name in ("feat", "adv"):
            key = f"{name}_loss"
            if key in v and math.isfinite(v[key]) and name not in self._reference and v[key] > 0:
                self._reference[name] = v[key]
        if "grad_ratio" in v and past_warmup and "ratio" not in self._reference and v["grad_ratio"] > 0:
            self._reference["ratio"] = v["grad_ratio"]

        disc = v.get("disc_loss")
        if disc is not None:
            history = [h["adv_loss"] for h in self._history[-self.window :] if "adv_loss" in h]
            not_falling = len(history) < 2 or history[-1] >= history[0]
            if self._streak("disc_winning", disc < self.win_fraction * self.chance_value and not_falling, self.window):
                self._event(
                    step,
                    "disc_winning",
                    f"the discriminator is winning: its loss is {disc:.3g} (chance {self.chance_value:g}) for "
                    f"{self.window} checks while the generator's adversarial loss "
                    + (f"went {history[0]:.3g} -> {history[-1]:.3g}" if len(history) >= 2 else "is not monitored"),
                    disc_loss=disc,
                )
            near = abs(disc - self.chance_value) <= self.chance_tolerance * self.chance_value
            if self._streak("disc_learning_nothing", near and past_warmup, self.window):
                acc = v.get("disc_accuracy")
                self._event(
                    step,
                    "disc_learning_nothing",
                    f"the discriminator learns nothing: its {self.loss_type} loss stayed at its chance value "
                    f"{self.chance_value:g} ({disc:.4g}) for {self.window} checks"
                    + (f", accuracy {acc:.2f}" if acc is not None else ""),
                    disc_loss=disc,
                )
        for name in ("feat", "adv"):
            key, ref = f"{name}_loss", self._reference.get(name)
            if key not in v or ref is None:
                continue
            term = {"feat": "feature-matching", "adv": "adversarial"}[name]
            if self._streak(f"collapse_{name}", v[key] < self.collapse_fraction * ref, self.window):
                self._event(
                    step,
                    "feature_matching_collapse",
                    f"the generator's {term} term fell to {v[key]:.3g} (from {ref:.3g}) for {self.window} checks",
                    term=name,
                    value=v[key],
                    reference=ref,
                )
        ratio, ref = v.get("grad_ratio"), self._reference.get("ratio")
        if ratio is not None and ref is not None:
            far = ratio <= 0 or not math.isfinite(ratio) or abs(math.log(ratio / ref)) > math.log(self.drift_factor)
            if self._streak("grad_ratio_drift", far, self.drift_window):
                self._event(
                    step,
                    "grad_ratio_drift",
                    f"the generator/discriminator gradient-norm ratio is {ratio:.3g}, more than "
                    f"{self.drift_factor:g}x away from its value after warm-up ({ref:.3g}) for {self.drift_window} "
                    "checks",
                    ratio=ratio,
                    reference=ref,
                )

    def _event(self, step: int, kind: str, reason: str, **data: Any) -> None:
        self.event_log.add(step, kind, reason, advice=ADVICE[kind], **data)
        rank_zero_warn(f"AdversarialBalanceMonitor: {reason}; {ADVICE[kind]}.")

    # ---------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "event_log": self.event_log.state_dict(),
            "batches": self._batches,
            "history": [dict(h) for h in self._history],
            "reference": dict(self._reference),
            "streaks": dict(self._streaks),
            "flagged": dict(self._flagged),
            # the window in progress (sums and counts, this process's): a checkpoint between two checks resumes it
            "partial_window": None if self._sums is None else self._sums.cpu().tolist(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.event_log.load_state_dict(state_dict["event_log"])
        self._batches = int(state_dict["batches"])
        self._history = [dict(h) for h in state_dict["history"]]
        self._reference = dict(state_dict["reference"])
        self._streaks = dict(state_dict["streaks"])
        self._flagged = dict(state_dict["flagged"])
        window = state_dict.get("partial_window")
        # a checkpoint holds rank 0's part of the window: every rank restoring it would count it world-size times
        self._sums = torch.tensor(window, dtype=torch.float64) if window is not None and _rank() == 0 else None


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
