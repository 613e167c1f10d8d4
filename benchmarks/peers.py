"""Peers benchmark: `GradientGuard` against the spike guards a user would pick instead, same cases, same run.

Every method trains every case through the same data, seeds, steps and evaluation (``rescue.Probe``: a fixed held-out
batch, model in eval mode, mean over the last ``eval_tail`` steps), the methods interleaved within each case (their
order rotates from case to case, so a slow phase of a shared machine does not always hit the same method).

Methods (each peer from its own package, as its authors ship it; the versions are in ``config.packages``):

- ``plain``: plain Lightning; ``clip``: ``Trainer(gradient_clip_val=1.0)`` (the module's own clipping argument for
  manual-optimization modules, where Lightning's cannot apply);
- ``spike_detection``: Lightning's ``SpikeDetection()`` (defaults: loss against a 10-step running mean, rtol 2); on a
  spike it raises ``TrainingSpikeException``, which ends the run: recorded as ``stopped_at``;
- ``zclip``: ``zclip.ZClipLightningCallback()`` with its defaults (alpha 0.97, z 2.5, warm-up 25, and its default
  ``max_grad_norm=1.0``, so it also clips every norm above 1); ``zclip_skip``: the same with
  ``skip_update_on_spike=True`` (ZClip's "skip" option: a spike's norm is kept out of its EMA; the update itself is
  still taken, clipped);
- ``olmo_skip_step``: ``olmo_core.optim.SkipStepAdamW`` in place of the module's Adam/AdamW; the loss and the total
  gradient norm are handed to it before each step (what OLMo-core's train module does), device tensors, no host read;
- ``spam``, ``stable_spam``, ``adagc``: ``pytorch_optimizer.SPAM`` / ``StableSPAM`` / ``AdaGC`` in place of Adam;
- ``guard``: ``GradientGuard()`` (the default rule: a norm above 3x its running mean confirmed by the loss is skipped,
  above 10x clipped); ``guard_z``: ``GradientGuard(zscore=2.5)``;
  ``guard_zr``: ``GradientGuard(zscore=2.5, zscore_min_ratio=3.0)`` (a spike must also be 3x the running mean);
  ``guard_z_strict``: ``GradientGuard(zscore=2.5, zscore_rebase_after=None)``, the 0.1.0 rule (spikes never enter
  the statistics), to show what the level-shift rule changes.

A replaced optimizer keeps the case's learning rate, betas and weight decay (they define the training problem) and
its learning-rate schedule; every other argument is the package default.

Cases: the seven of ``benchmarks/rescue.py`` (its ``make_cases``; each method runs on the *faulty* configuration,
rescue's ``plain`` way, so only the spike handling differs; the reference is rescue's ``clean`` run), four healthy runs
that must not be disturbed, and a slow divergence:

- ``healthy_clean``: an MLP regression (Adam 3e-3, batch 128) with nothing wrong;
- ``healthy_loss_switch``: the same with the loss weight switched from 1 to 4 at step ``switch_step`` (a curriculum
  switch: the gradient norm is 4x from then on, Adam's update is not);
- ``healthy_warmup_end``: the same with a linear learning-rate warm-up to a high peak (3e-2) that ends at
  ``switch_step``: the gradient norm rises several-fold and stays;
- ``healthy_codec_gan``: the package's ``CodecModule`` with adversarial training (manual optimization, two
  optimizers; GAN gradients are noisy);
- ``slow_divergence``: the MLP on a Gaussian negative log-likelihood (it predicts a log-variance) with a learning
  rate that starts growing 5 % per step at step 200 (the onset): the loss climbs, then ``exp`` overflows and the plain
  run's loss is huge or non-finite. Reference: the same model at a constant lr. Lead time = the plain run's failure
  step (its first non-finite training loss or, if it stays finite, the first evaluation whose held-out loss is above
  10x its value at the onset: ``lead_reference``) minus a method's first warning (skip, clip or detection) at or
  after the onset; warnings before it are counted as ``false_alarms_before_onset``.

Per run: ``finished_finite``, ``failure_step``/``stopped_at``, ``final_eval_loss``, ``relative_to_clean`` (healthy
cases: relative to their ``plain`` run), ``skipped_steps`` (optimizer updates not taken), ``interventions`` (steps the
method flagged: skips, z-score clips, detections; ``None`` where the method exposes no such signal), ``first_warning``,
``lead_time`` (slow divergence), ``recovery_steps`` (switch cases: steps after the switch until the last
intervention of the following ``recovery_window`` steps, 0 when none), ``median_step_ms`` and ``step_time_ratio``
(against ``plain`` of the same case: indicative on a shared machine), ``host_reads_per_step`` (``Tensor.item`` /
``tolist`` / ``__bool__`` / ``__float__`` / ``__int__`` calls per step outside the measuring callbacks, minus the plain
run's: torch's non-capturable Adam itself reads every step count, so an optimizer peer can come out negative;
``host_reads_total_per_step`` has the raw count). Cost: the full mode is 12 cases x 12 methods of small CPU runs
(tens of minutes on 2 cores); ``--quick`` runs five short cases.

JSON (``benchmarks/results/peers.json``; common layout in ``benchmarks/_common.py``)::

    config: {"methods": {name: description}, "packages": {dist: version | "not installed: ..."}, ...}
    cases: [{"name", "kind": "failure" | "healthy" | "divergence", "description", "max_steps", "fault_step",
             "switch_step", "onset_step", "clean_final_eval_loss", "runs": {method: {...per-run fields above...}}}]
    summary: {"target", "target_met", "guard_best_or_tied": {case: bool}, "false_positive_skips": {method: n},
              "peer_wins": [...], ...}

Usage::

    python benchmarks/peers.py                 # full mode
    python benchmarks/peers.py --quick         # CI mode (~2-3 min on 2 cores)
    python benchmarks/peers.py --cases healthy_loss_switch --methods plain,guard_z,olmo_skip_step
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common
import lightning.pytorch as pl
import rescue
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.nn import functional as F

# ---------------------------------------------------------------------------------------------------------------------
# peers: packages and versions
# ---------------------------------------------------------------------------------------------------------------------
PACKAGES = {"zclip": "zclip", "ai2-olmo-core": "olmo_core.optim", "pytorch-optimizer": "pytorch_optimizer"}


def package_versions() -> dict[str, str]:
    """Version of every peer package, or why it is not usable (never imitated: its methods are then skipped)."""
    out = {"lightning": importlib.metadata.version("lightning")}
    for dist, module in PACKAGES.items():
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed (pip install 'lightning-stability[bench]')"
            continue
        try:
            __import__(module)
        except Exception as err:  # noqa: BLE001 - any import failure is a result to record
            out[dist] = f"{version}, import failed: {type(err).__name__}: {err}"
            continue
        out[dist] = version
    return out


def usable(dist: str | None, versions: dict[str, str]) -> bool:
    return dist is None or versions.get(dist, "").split(",")[0].replace(".", "").isdigit()


# ---------------------------------------------------------------------------------------------------------------------
# host-read counting
# ---------------------------------------------------------------------------------------------------------------------
class HostReads:
    """Counts calls that read a tensor value back to the host (``item``, ``tolist``, ``bool``/``float``/``int``) while
    ``active`` and not ``paused`` (the measuring callbacks pause it around their own reads)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self) -> None:
        self.count = 0
        self.active = False
        self.paused = 0
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> HostReads:
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def wrapper(t, *args, _original=original, **kwargs):
                if self.active and not self.paused:
                    self.count += 1
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, wrapper)
        self.active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self.active = False
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


READS = HostReads()


class MeasuringProbe(rescue.Probe):
    """``rescue.Probe`` whose own host reads are not counted."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with READS.pause():
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class StepTimer(Callback):
    """Wall time of each training batch (first hook to after the methods' ``on_train_batch_end``): ``start`` goes
    first in the callback list, ``end`` after the method's callbacks and before the probe."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0: float | None = None
        timer = self

        class _End(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                if timer._t0 is not None:
                    timer.times.append(time.perf_counter() - timer._t0)
                    timer._t0 = None

        self.end = _End()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()


# ---------------------------------------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------------------------------------
class Observer(Callback):
    """What a method flagged, per optimizer step: ``interventions`` (steps) and ``skipped`` (steps not taken)."""

    exposes_interventions = True

    def __init__(self) -> None:
        self.interventions: list[int] = []
        self.skipped: list[int] = []


class GuardObserver(Observer):
    def __init__(self, guard: Callback) -> None:
        super().__init__()
        self.guard = guard

    def finish(self) -> None:
        with READS.pause():
            events = list(self.guard.event_log.events)
            self.interventions = sorted({e.step for e in events if e.kind in ("skip", "clip", "rebase")})
            self.skipped = sorted({e.step for e in events if e.kind == "skip"})
            self.num_skipped = int(self.guard.num_skipped)


class ZClipObserver(Observer):
    """Records the steps at which ZClip's own rule fired (``_compute_clip_val`` returned a threshold)."""

    def __init__(self, callback: Callback) -> None:
        super().__init__()
        self.zclip = callback.zclip
        self.step = 0
        original = self.zclip._compute_clip_val

        def observed(grad_norm, _original=original):
            value = _original(grad_norm)
            if value is not None:
                self.interventions.append(self.step)
            return value

        self.zclip._compute_clip_val = observed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step = trainer.global_step


class OlmoGlue(Observer):
    """Hands every ``SkipStepOptimizer`` the loss and the total gradient norm before its step (as OLMo-core's train
    module does; device tensors), and records the steps it skipped (read after the step, not counted as the method's
    host reads)."""

    def __init__(self) -> None:
        super().__init__()
        self._loss: Tensor | None = None

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        from olmo_core.optim import SkipStepOptimizer

        opt = getattr(optimizer, "optimizer", optimizer)
        if not isinstance(opt, SkipStepOptimizer) or self._loss is None:
            return
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        opt.latest_loss = self._loss.float()
        opt.latest_grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from olmo_core.optim import SkipStepOptimizer

        with READS.pause():
            step = trainer.global_step - 1
            for opt in trainer.optimizers:
                if isinstance(opt, SkipStepOptimizer) and float(opt.step_skipped) > 0:
                    self.interventions.append(step)
                    self.skipped.append(step)
                    break


class SilentObserver(Observer):
    exposes_interventions = False


def _replace_optimizers(module: pl.LightningModule, factory: Callable[[torch.optim.Optimizer], Any]) -> None:
    """Wrap ``module.configure_optimizers`` so every torch optimizer it returns is replaced by ``factory(old)`` (same
    parameter groups, lr, betas, weight decay) and every LR scheduler is rebound to the replacement."""
    original = module.configure_optimizers

    def configure():
        out = original()
        mapping: dict[int, Any] = {}
        schedulers: list[Any] = []

        def walk(x):
            if isinstance(x, torch.optim.Optimizer):
                new = factory(x)
                for ng, og in zip(new.param_groups, x.param_groups):
                    if "initial_lr" in og:
                        ng["initial_lr"] = og["initial_lr"]
                mapping[id(x)] = new
                return new
            if isinstance(x, torch.optim.lr_scheduler.LRScheduler):
                schedulers.append(x)
                return x
            if isinstance(x, dict):
                return {k: walk(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return type(x)(walk(v) for v in x)
            return x

        out = walk(out)
        for s in schedulers:
            s.optimizer = mapping.get(id(s.optimizer), s.optimizer)
        return out

    module.configure_optimizers = configure


def _groups(old: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [
        {
            "params": g["params"],
            "lr": g["lr"],
            "betas": tuple(g.get("betas", (0.9, 0.999)))[:2],
            "weight_decay": g.get("weight_decay", 0.0),
        }
        for g in old.param_groups
    ]


def _olmo(old):
    from olmo_core.optim import SkipStepAdamW

    return SkipStepAdamW(_groups(old), lr=old.defaults["lr"], weight_decay=old.defaults.get("weight_decay", 0.0))


def _pytorch_optimizer(name: str):
    def make(old):
        import pytorch_optimizer

        cls = getattr(pytorch_optimizer, name)
        return cls(_groups(old), lr=old.defaults["lr"], weight_decay=old.defaults.get("weight_decay", 0.0))

    return make


@dataclass
class Setup:
    callbacks: list[Callback]
    observer: Observer
    optimizer: Callable[[torch.optim.Optimizer], Any] | None = None
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    module_clip: float | None = None  # manual-optimization modules: the module's own clipping argument


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    package: str | None
    make: Callable[[], Setup]


def _guard(**kwargs: Any) -> Setup:
    from lightning_stability.callbacks import GradientGuard

    g = GradientGuard(**kwargs)
    return Setup([g], GuardObserver(g))


def _zclip(**kwargs: Any) -> Setup:
    from zclip import ZClipLightningCallback

    cb = ZClipLightningCallback(**kwargs)
    return Setup([cb], ZClipObserver(cb))


def _spike_detection() -> Setup:
    from lightning.pytorch.callbacks.spike import SpikeDetection

    return Setup([SpikeDetection()], SilentObserver())


METHODS: tuple[Method, ...] = (
    Method("plain", "plain Lightning", None, lambda: Setup([], SilentObserver())),
    Method(
        "clip",
        "gradient_clip_val=1.0",
        None,
        lambda: Setup([], SilentObserver(), trainer_kwargs={"gradient_clip_val": 1.0}, module_clip=1.0),
    ),
    Method("spike_detection", "lightning SpikeDetection() (stops the run on a spike)", None, _spike_detection),
    Method("zclip", "zclip.ZClipLightningCallback() (defaults, max_grad_norm=1.0)", "zclip", lambda: _zclip()),
    Method(
        "zclip_skip",
        "zclip.ZClipLightningCallback(skip_update_on_spike=True)",
        "zclip",
        lambda: _zclip(skip_update_on_spike=True),
    ),
    Method(
        "olmo_skip_step",
        "olmo_core.optim.SkipStepAdamW (defaults: 6 sigma, 128-value window)",
        "ai2-olmo-core",
        lambda: Setup([], OlmoGlue(), optimizer=_olmo),
    ),
    Method(
        "spam", "pytorch_optimizer.SPAM (defaults)", "pytorch-optimizer",
        lambda: Setup([], SilentObserver(), optimizer=_pytorch_optimizer("SPAM")),
    ),  # fmt: skip
    Method(
        "stable_spam", "pytorch_optimizer.StableSPAM (defaults)", "pytorch-optimizer",
        lambda: Setup([], SilentObserver(), optimizer=_pytorch_optimizer("StableSPAM")),
    ),  # fmt: skip
    Method(
        "adagc", "pytorch_optimizer.AdaGC (defaults)", "pytorch-optimizer",
        lambda: Setup([], SilentObserver(), optimizer=_pytorch_optimizer("AdaGC")),
    ),  # fmt: skip
    Method("guard", "GradientGuard() (defaults: spikes confirmed by the loss)", None, lambda: _guard()),
    Method("guard_z", "GradientGuard(zscore=2.5)", None, lambda: _guard(zscore=2.5)),
    Method(
        "guard_zr",
        "GradientGuard(zscore=2.5, zscore_min_ratio=3.0) (a spike must also exceed 3x the running mean)",
        None,
        lambda: _guard(zscore=2.5, zscore_min_ratio=3.0),
    ),
    Method(
        "guard_z_strict",
        "GradientGuard(zscore=2.5, zscore_rebase_after=None) (the 0.1.0 rule: spikes never enter its statistics)",
        None,
        lambda: _guard(zscore=2.5, zscore_rebase_after=None),
    ),
)


# ---------------------------------------------------------------------------------------------------------------------
# healthy and divergence cases
# ---------------------------------------------------------------------------------------------------------------------
class ScheduledMLP(rescue.FaultMLP):
    """``rescue.FaultMLP`` on more data in larger batches (so the gradient norm is a steady signal), with a loss weight
    and a learning-rate factor per optimizer step."""

    def __init__(
        self,
        *,
        weight_at: Callable[[int], float] | None = None,
        lr_at: Callable[[int], float] | None = None,
        n: int = 2048,
        batch_size: int = 128,
        **kwargs: Any,
    ) -> None:
        super().__init__(n=n, batch_size=batch_size, **kwargs)
        self.weight_at = weight_at
        self.lr_at = lr_at

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if self.weight_at is not None:
            out["loss"] = out["loss"] * self.weight_at(self.global_step)
        return out

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.lr_at is None:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_at)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class GaussianMLP(ScheduledMLP):
    """The MLP predicting a mean and a log-variance per output, trained on the Gaussian negative log-likelihood
    ``0.5 * ((y - mu)^2 * exp(-log_var) + log_var)`` (a loss with an exponential in it, as in models that predict a
    scale); its eval loss is the MSE of the mean. A learning rate that keeps growing drives the log-variance down
    until ``exp`` overflows: a divergence that shows in the loss long before it is non-finite."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.net[-1] = torch.nn.Linear(self.net[-1].in_features, 8)

    def training_step(self, batch, batch_idx):
        x, y = batch
        mu, log_var = self(x).chunk(2, dim=1)
        loss = 0.5 * ((y - mu) ** 2 * torch.exp(-log_var) + log_var).mean()
        return {"loss": loss, "losses": {"nll": loss.detach()}}

    def eval_loss(self, batch) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x).chunk(2, dim=1)[0], y)


def _switch(step: int, factor: float) -> Callable[[int], float]:
    return lambda s: factor if s >= step else 1.0


def _warmup(end: int, start_factor: float) -> Callable[[int], float]:
    return lambda s: start_factor + (1.0 - start_factor) * min(s / end, 1.0)


def _growth(rate: float, start: int = 0) -> Callable[[int], float]:
    """Constant until ``start``, then ``rate`` times larger every step."""
    return lambda s: rate ** max(s - start, 0)


class GanCodec:
    """The package's adversarial ``CodecModule`` (tiny SEANet, 3-stage RVQ, STFT discriminator, hinge loss) on
    speech-like audio, with an eval loss (mel + L1 at the base weights)."""

    @staticmethod
    def build(seed: int, data: tuple[int, int, int]):
        from lightning_stability.reference.codec import CodecModule

        class BenchGanCodec(CodecModule):
            def eval_loss(self, batch) -> Tensor:
                (x,) = batch
                y = self(x).audio
                return self.mel_loss(y, x) + F.l1_loss(y, x)

            def train_dataloader(self):
                n, length, batch_size = data
                return rescue.audio_loader(n, length, batch_size, seed)

        torch.manual_seed(seed)
        return BenchGanCodec(
            sample_rate=rescue.SAMPLE_RATE,
            n_filters=4,
            ratios=(4, 4),
            dimension=16,
            lstm=0,
            n_q=3,
            codebook_size=32,
            kmeans_iters=3,
            mel_window_lengths=(64, 256),
            mel_n_mels=(16, 40),
            loss_weights={"mel": 1.0, "l1": 1.0, "vq": 1.0, "adv": 1.0, "feat": 1.0},
            lr=1e-3,
            adversarial=True,
            disc_filters=4,
            disc_n_ffts=(128, 256),
            seed=seed,
        )


@dataclass
class PeerCase:
    name: str
    kind: str  # "failure" | "healthy" | "divergence"
    description: str
    max_steps: int
    build: Callable[[str], pl.LightningModule]  # "clean" | "faulty" -> module
    extra_callbacks: Callable[[str], list[Callback]]  # part of the case (rescue's old weight controller), by way
    eval_batch: Any
    fault_step: int | None = None
    switch_step: int | None = None
    onset_step: int | None = None  # divergence: the step from which the lr grows (earlier warnings are false alarms)
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)


def make_cases(quick: bool, seed: int) -> list[PeerCase]:
    cases: list[PeerCase] = []
    for rc in rescue.make_cases(quick, seed):
        cases.append(
            PeerCase(
                rc.name,
                "failure",
                f"{rc.description}; fault: {rc.fault}",
                rc.max_steps,
                lambda way, rc=rc: rc.build("clean" if way == "clean" else "plain"),
                lambda way, rc=rc: rc.callbacks("clean" if way == "clean" else "plain"),
                rc.eval_batch,
                fault_step=rc.fault_step,
                trainer_kwargs=dict(rc.trainer_kwargs),
            )
        )
    steps = 150 if quick else 400
    switch = 50 if quick else 100
    eval_mlp = rescue.mlp_data(64, seed + 1000).tensors

    def mlp(cls: type = ScheduledMLP, **kw: Any) -> Callable[[str], pl.LightningModule]:
        """``way="clean"`` drops the schedules (the divergence case's reference: the same model at a constant lr)."""

        def build(way: str) -> pl.LightningModule:
            torch.manual_seed(seed)
            args = {k: v for k, v in kw.items() if not (way == "clean" and k == "lr_at")}
            return cls(seed=seed, **args)

        return build

    healthy = [
        ("healthy_clean", "MLP regression (16-64-64-4, BatchNorm), Adam 3e-3, batch 128: nothing wrong", mlp(), None),
        (
            "healthy_loss_switch",
            f"the same MLP, loss weight 1 -> 4 at step {switch} (a curriculum switch)",
            mlp(weight_at=_switch(switch, 4.0)),
            switch,
        ),
        (
            "healthy_warmup_end",
            f"the same MLP, linear lr warm-up 3e-4 -> 3e-2 ending at step {switch}, then constant",
            mlp(lr=3e-2, lr_at=_warmup(switch, 0.01)),
            switch,
        ),
    ]
    for name, text, build, sw in healthy:
        cases.append(PeerCase(name, "healthy", text, steps, build, _none, eval_mlp, switch_step=sw))
    gan_steps = 40 if quick else 150
    cases.append(
        PeerCase(
            "healthy_codec_gan",
            "healthy",
            "adversarial CodecModule (tiny SEANet, 3 x 32-code RVQ, STFT discriminator, hinge), Adam 1e-3, batch 8",
            gan_steps,
            lambda way: GanCodec.build(seed, (64, 1024, 8)),
            _none,
            (rescue.speechlike(8, 1024, seed + 1000),),
        )
    )
    div_steps = 300 if quick else 600
    rate, grow_from = (1.05, 100) if quick else (1.05, 200)
    cases.append(
        PeerCase(
            "slow_divergence",
            "divergence",
            f"the MLP on a Gaussian NLL (predicted log-variance), Adam 3e-3, the lr growing x{rate} per step from step "
            f"{grow_from} (clean: constant lr)",
            div_steps,
            mlp(GaussianMLP, lr_at=_growth(rate, grow_from)),
            _none,
            eval_mlp,
            onset_step=grow_from,
        )
    )
    return cases


def _none(way: str) -> list[Callback]:
    return []


QUICK_CASES = ("fault_nan_batch", "fault_loss_spike", "healthy_clean", "healthy_loss_switch", "slow_divergence")


# ---------------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------------
def run_one(
    case: PeerCase,
    method: Method,
    *,
    tail: int,
    eval_every: int,
    way: str = "faulty",
    probe_cls: type[MeasuringProbe] | None = None,
) -> dict[str, Any]:
    """One training run of ``method`` on ``case``; ``probe_cls`` replaces :class:`MeasuringProbe` (the fault zoo's
    probe measures once per optimizer step under gradient accumulation)."""
    pl.seed_everything(0, workers=True, verbose=False)
    module = case.build(way)
    setup = method.make()
    if setup.optimizer is not None:
        _replace_optimizers(module, setup.optimizer)
    if setup.module_clip is not None and not module.automatic_optimization and hasattr(module, "hparams"):
        module.hparams.gradient_clip_val = setup.module_clip
    kwargs = dict(case.trainer_kwargs)
    trainer_kwargs = dict(setup.trainer_kwargs)
    if not module.automatic_optimization:
        trainer_kwargs.pop("gradient_clip_val", None)  # Lightning cannot clip for a manual-optimization module
    kwargs.update(trainer_kwargs)
    probe = (probe_cls or MeasuringProbe)(case.eval_batch, case.max_steps, tail=tail, eval_every=eval_every)
    timer = StepTimer()
    callbacks = [timer, *case.extra_callbacks(way), *setup.callbacks, setup.observer, timer.end, probe]
    stopped_at, stop_reason = None, None
    losses: list[float] = []

    class LossTrace(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            with READS.pause():
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                losses.append(float(loss.detach()) if loss is not None else math.nan)

    callbacks.append(LossTrace())
    t0 = time.perf_counter()
    reads_before = READS.count
    with tempfile.TemporaryDirectory(prefix=f"peers_{case.name}_{method.name}_") as root:
        trainer = _common.make_trainer(root, callbacks, max_steps=case.max_steps, **kwargs)
        try:
            trainer.fit(module)
        except Exception as err:  # SpikeDetection's TrainingSpikeException, or a peer that crashed
            stopped_at = trainer.global_step
            stop_reason = f"{type(err).__name__}: {str(err)[:200]}"
    wall = time.perf_counter() - t0
    reads = READS.count - reads_before
    if isinstance(setup.observer, GuardObserver):
        setup.observer.finish()
    with READS.pause():
        final = sum(probe.tail_losses) / len(probe.tail_losses) if probe.tail_losses else math.nan
        state_finite = probe.state_finite(module)
    finished = (
        stopped_at is None
        and probe.failure_step is None
        and state_finite
        and math.isfinite(final)
        and probe.steps_run >= case.max_steps
    )
    if stopped_at is None and probe.failure_step is None and probe.steps_run < case.max_steps:
        stopped_at, stop_reason = probe.steps_run, "trainer.should_stop (the method stopped the run)"
    first_nonfinite = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    obs = setup.observer
    steps_run = max(probe.steps_run, 1)
    skipped = getattr(obs, "num_skipped", len(obs.skipped))
    return {
        "finished_finite": finished,
        "failure_step": probe.failure_step,
        "stopped_at": stopped_at,
        "stop_reason": stop_reason,
        "steps_run": probe.steps_run,
        "final_eval_loss": final if finished else math.nan,
        "relative_to_clean": None,
        "skipped_steps": skipped,
        "interventions": len(obs.interventions) if obs.exposes_interventions else None,
        "intervention_steps": list(obs.interventions) if obs.exposes_interventions else None,
        "first_warning": (obs.interventions[0] if obs.interventions else None) if obs.exposes_interventions else None,
        "first_nonfinite_loss_step": first_nonfinite,
        "median_step_ms": 1e3 * _common.median(timer.times[5:] or timer.times),
        "step_time_ratio": None,
        "host_reads_total_per_step": reads / steps_run,  # torch's non-capturable Adam reads its step counts too
        "host_reads_per_step": None,  # beyond plain (analyse); negative: fewer than plain's optimizer
        "wall_s": round(wall, 2),
        "eval_curve": [[s, v] for s, v in probe.eval_curve],
    }


def divergence_step(plain: dict[str, Any], onset: int | None) -> tuple[int | None, str]:
    """The plain run's failure step that lead times count to: its first non-finite training loss or, when it never
    went non-finite (a divergence can also end in a huge finite loss), the first held-out evaluation after the onset
    whose loss is non-finite or above 10x the last evaluation before the onset (evaluations every ``eval_every``
    steps)."""
    if plain["first_nonfinite_loss_step"] is not None:
        return plain["first_nonfinite_loss_step"], "first non-finite training loss of the plain run"
    if plain["failure_step"] is not None:
        return plain["failure_step"], "failure step of the plain run"
    onset = onset or 0
    curve = plain.get("eval_curve") or []
    before = [v for s, v in curve if s <= onset and _common.finite(v)]
    if not before:
        return None, "no evaluation before the onset"
    base = before[-1]
    step = next((s for s, v in curve if s > onset and (not _common.finite(v) or v > 10 * base)), None)
    return step, "first held-out loss of the plain run above 10x its value at the onset"


def analyse(case: PeerCase, runs: dict[str, dict[str, Any]], clean: float, recovery_window: int) -> None:
    """Fill in the fields that compare runs: relative loss, step-time ratio, host reads beyond plain, lead time,
    recovery after a switch."""
    plain = runs.get("plain")
    base_reads = plain["host_reads_total_per_step"] if plain is not None else 0.0
    for r in runs.values():
        if r["finished_finite"] and _common.finite(clean) and clean > 0:
            r["relative_to_clean"] = r["final_eval_loss"] / clean - 1
        if plain is not None:
            if plain["median_step_ms"] > 0:
                r["step_time_ratio"] = r["median_step_ms"] / plain["median_step_ms"]
            r["host_reads_per_step"] = r["host_reads_total_per_step"] - base_reads
        if case.kind == "divergence" and plain is not None:
            reference, r["lead_reference"] = divergence_step(plain, case.onset_step)
            r["lead_reference_step"] = reference
            onset = case.onset_step or 0
            steps = r["intervention_steps"]
            if steps is None:  # no signal exposed; SpikeDetection: the run stops at its detection
                warn = r["stopped_at"] if r["stopped_at"] is not None and r["stopped_at"] >= onset else None
                r["false_alarms_before_onset"] = None
            else:
                warn = next((s for s in steps if s >= onset), None)
                r["false_alarms_before_onset"] = sum(s < onset for s in steps)
            r["first_warning_after_onset"] = warn
            r["lead_time"] = reference - warn if reference is not None and warn is not None else None
        if case.switch_step is not None:
            steps = r["intervention_steps"]
            if steps is None and r["stopped_at"] is None:
                r["recovery_steps"] = None
            elif r["stopped_at"] is not None:
                r["recovery_steps"] = f"stopped at step {r['stopped_at']}"
            else:
                after = [s for s in steps if case.switch_step <= s < case.switch_step + recovery_window]
                r["recovery_steps"] = (max(after) - case.switch_step + 1) if after else 0


def main() -> int:
    p = _common.parser("peers", __doc__.splitlines()[0])
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all; --quick: a subset)")
    p.add_argument("--methods", default=None, help="comma-separated method names (default: all)")
    p.add_argument("--tolerance", type=float, default=0.10, help="finished within this of clean counts as rescued")
    p.add_argument(
        "--reanalyse",
        type=Path,
        default=None,
        help="recompute the derived fields (relative losses, ratios, lead times, recovery, summary) of a results JSON "
        "from its recorded runs, in place; trains nothing",
    )
    args = p.parse_args()
    if args.reanalyse is not None:
        return reanalyse(args.reanalyse, args.tolerance)
    _common.setup_run(args)
    started = time.perf_counter()
    machine = _common.machine_info()
    versions = package_versions()
    cases = make_cases(args.quick, args.seed)
    known = [c.name for c in cases]
    wanted = [c.strip() for c in args.cases.split(",")] if args.cases else (list(QUICK_CASES) if args.quick else known)
    unknown = [w for w in wanted if w not in known]
    if unknown:
        p.error(f"unknown case(s) {unknown}; the cases are {known}")
    cases = [c for c in cases if c.name in wanted]
    names = [m.name for m in METHODS]
    chosen = [m.strip() for m in args.methods.split(",")] if args.methods else names
    if [m for m in chosen if m not in names]:
        p.error(f"unknown method(s) {[m for m in chosen if m not in names]}; the methods are {names}")
    if "plain" not in chosen:
        chosen.insert(0, "plain")
    methods = [m for m in METHODS if m.name in chosen]
    unavailable = {m.name: versions[m.package] for m in methods if not usable(m.package, versions)}
    methods = [m for m in methods if m.name not in unavailable]
    tail = 5 if args.quick else 10
    eval_every = 10
    recovery_window = 50 if args.quick else 100

    results = []
    with READS:
        for i, case in enumerate(cases):
            clean_run = None
            if case.kind in ("failure", "divergence"):
                clean_run = run_one(case, METHODS[0], tail=tail, eval_every=eval_every, way="clean")
            order = methods[i % len(methods) :] + methods[: i % len(methods)]  # rotate: interleaved across cases
            runs = {m.name: run_one(case, m, tail=tail, eval_every=eval_every) for m in order}
            runs = {m.name: runs[m.name] for m in methods}
            reference = clean_run if clean_run is not None else runs["plain"]
            clean = reference["final_eval_loss"]
            analyse(case, runs, clean, recovery_window)
            results.append(
                {
                    "name": case.name,
                    "kind": case.kind,
                    "description": case.description,
                    "max_steps": case.max_steps,
                    "fault_step": case.fault_step,
                    "switch_step": case.switch_step,
                    "onset_step": case.onset_step,
                    "clean_final_eval_loss": clean,
                    "clean_reference": "rescue clean run" if clean_run is not None else "this case's plain run",
                    "runs": runs,
                }
            )
            line = "  ".join(
                f"{m}={'ok' if r['finished_finite'] else 'FAIL'}"
                + (f"({r['relative_to_clean']:+.1%})" if r["relative_to_clean"] is not None else "")
                + (f"[skip {r['skipped_steps']}]" if r["skipped_steps"] else "")
                for m, r in runs.items()
            )
            print(f"[peers] {case.name}: {line}", flush=True)

    summary = summarise(results, [m.name for m in methods], args.tolerance)
    config = {
        "quick": args.quick,
        "seed": args.seed,
        "tolerance": args.tolerance,
        "eval_tail_steps": tail,
        "eval_every": eval_every,
        "recovery_window": recovery_window,
        "cases_not_run": [n for n in known if n not in wanted],
        "methods": {m.name: m.description for m in METHODS},
        "methods_run": [m.name for m in methods],
        "methods_unavailable": unavailable,
        "packages": versions,
        "optimizer_replacement": "the case's lr, betas, weight decay and lr schedule; other arguments the defaults",
    }
    out = _common.write_result(
        "peers", args, config=config, cases=results, summary=summary, started=started, machine=machine
    )
    print(
        f"peers: guard_z best or tied on {summary['guard_z_best_or_tied']} failure cases, false-positive skips on "
        f"healthy runs {summary['false_positive_skips'].get('guard_z')} (guard_z) -> {out}"
    )
    return 0


def reanalyse(path: Path, tolerance: float) -> int:
    """``--reanalyse``: :func:`analyse` and :func:`summarise` again over the runs recorded in ``path`` (after a change
    to the analysis only; the runs, their command and their machine stay as measured)."""
    doc = json.loads(path.read_text())
    recovery_window = doc["config"]["recovery_window"]
    for c in doc["cases"]:
        case = PeerCase(c["name"], c["kind"], c["description"], c["max_steps"], _no_build, _none, None,
                        fault_step=c.get("fault_step"), switch_step=c.get("switch_step"),
                        onset_step=c.get("onset_step"))  # fmt: skip
        clean = c["clean_final_eval_loss"]
        analyse(case, c["runs"], clean if _common.finite(clean) else math.nan, recovery_window)
    doc["summary"] = summarise(doc["cases"], doc["config"]["methods_run"], tolerance)
    doc["reanalysed"] = {"command": _common.command_line(),
                         "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    path.write_text(json.dumps(_common.json_safe(doc), indent=2, allow_nan=False) + "\n")
    print(f"peers: reanalysed {path}")
    return 0


def _no_build(way: str) -> pl.LightningModule:
    raise RuntimeError("a reanalysed case trains nothing")


def _score(r: dict[str, Any]) -> float:
    """Lower is better: the relative final loss of a finished run, inf for a failed one."""
    return r["relative_to_clean"] if r["finished_finite"] and r["relative_to_clean"] is not None else math.inf


def _best_peer_score(case: dict[str, Any]) -> float:
    """The best (lowest) relative final loss of a non-guard method on a case."""
    return min((_score(r) for m, r in case["runs"].items() if not m.startswith("guard")), default=math.inf)


def _guard_best_or_tied(case: dict[str, Any], guard: str, tolerance: float) -> bool:
    """The guard configuration ends at least as well as every peer (1 % slack), or both within the tolerance."""
    score, best = _score(case["runs"].get(guard, {"finished_finite": False})), _best_peer_score(case)
    return bool(score <= best + 0.01 or (score <= tolerance and best <= tolerance))


def summarise(results: list[dict[str, Any]], methods: list[str], tolerance: float) -> dict[str, Any]:
    failures = [r for r in results if r["kind"] == "failure"]
    healthy = [r for r in results if r["kind"] == "healthy"]
    rescued = {m: sum(_score(c["runs"][m]) <= tolerance for c in failures) for m in methods}
    best_or_tied = {c["name"]: _guard_best_or_tied(c, "guard_z", tolerance) for c in failures}
    peer_wins: list[str] = []
    for c in failures:
        if best_or_tied[c["name"]]:
            continue
        guard = _score(c["runs"].get("guard_z", {"finished_finite": False}))
        for m, r in c["runs"].items():
            if not m.startswith("guard") and _score(r) < guard - 0.01:
                peer_wins.append(f"{c['name']}: {m} {_score(r):+.1%} vs guard_z {guard:+.1%}")
    false_positives = {m: sum(c["runs"][m]["skipped_steps"] for c in healthy) for m in methods}
    disturbed = {
        m: [c["name"] for c in healthy if not c["runs"][m]["finished_finite"] or _score(c["runs"][m]) > tolerance]
        for m in methods
    }
    clean = next((c for c in healthy if c["name"] == "healthy_clean"), None)
    by_guard = {}  # the target, per guard configuration: best or tied on every failure case, no skip on the clean run
    for g in (m for m in methods if m.startswith("guard")):
        wins = {c["name"]: _guard_best_or_tied(c, g, tolerance) for c in failures}
        clean_skips = clean["runs"][g]["skipped_steps"] if clean is not None and g in clean["runs"] else None
        by_guard[g] = {
            "best_or_tied": f"{sum(wins.values())}/{len(wins)}",
            "not_best": [n for n, ok in wins.items() if not ok],
            "clean_run_skips": clean_skips,
            "target_met": bool(failures and all(wins.values()) and clean_skips == 0),
        }
    return {
        "target": "a GradientGuard configuration best or tied (within the tolerance of clean) on every failure case, "
        "with zero false-positive skips on the clean run",
        "target_met": any(v["target_met"] for v in by_guard.values()),
        "by_guard": by_guard,
        "guard_z_best_or_tied": f"{sum(best_or_tied.values())}/{len(best_or_tied)}",
        "best_or_tied": best_or_tied,
        "rescued_within_tolerance": {m: f"{n}/{len(failures)}" for m, n in rescued.items()},
        "false_positive_skips": false_positives,
        "healthy_runs_disturbed": disturbed,
        "peer_wins": peer_wins,
    }


if __name__ == "__main__":
    raise SystemExit(main())
