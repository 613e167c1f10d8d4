"""Overhead of the stability callbacks: median training-step time and peak memory with callbacks / bare Trainer.

Each configuration in ``CONFIGS`` is a named list of callbacks. Repetitions are interleaved (A B B A A B ...: the order
flips every repetition so slow drift of a shared machine hits every configuration alike); every repetition is a fresh
Trainer and a freshly seeded model, and a tiny timing callback records the wall time between consecutive
``on_train_batch_start`` calls (everything a step costs: data, forward, backward, hooks, optimizer). The first
``--warmup`` steps of every run are dropped. The result is the median step time per configuration and its ratio to
``bare``; the JSON schema is documented in ``benchmarks/README.md``.

The ``stack`` configuration is the full kit a user adds to a codec run: ``GradientGuard()``,
``AdaptiveLossWeight("l1")``, ``ScaleFactorClamp()`` (on the model's ``ClampedRMSScale`` output layer),
``SignalMonitor()``, ``CodebookMonitor()`` and ``AdversarialBalanceMonitor()`` at their default interval (every 50
training steps) and ``StabilityReport()`` (its JSON/PNG are written at fit end, outside the timed steps). The monitors'
own share is broken out in ``summary.monitor_costs``: their mean time per step over a run long enough to include two of
their periodic checks, with the forward hooks they register (``CodebookMonitor`` counts codes in the quantizer's
forward); ``--model codec_gan`` trains the demo codec against its discriminator so that ``AdversarialBalanceMonitor``
has a game to read.

Peak memory: every configuration also runs ``--mem-reps`` times in a fresh child process (the same steps, one
process per run, so one run's allocator state cannot leak into another's) that reports its peak resident set size
(``VmHWM``) and its resident size right before ``fit``; the ratios to ``bare`` are in the summary. On a CUDA machine
the in-process peak of ``torch.cuda.max_memory_allocated`` is recorded as well.

On a CUDA machine the script also counts host synchronisations made by ``GradientGuard(sync_free=True)`` with a fused
Adam (``torch.cuda.set_sync_debug_mode``), per step, inside the guard's hooks only. On CPU that check is skipped and the
JSON says so.

    python benchmarks/overhead.py            # full: about 3 minutes on one CPU thread
    python benchmarks/overhead.py --quick    # CI smoke run, well under a minute
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common  # noqa: E402  (benchmarks/ is on sys.path when a script in it runs)

from lightning_stability.callbacks import (  # noqa: E402
    AdaptiveLossWeight,
    AdversarialBalanceMonitor,
    CodebookMonitor,
    GradientGuard,
    ScaleFactorClamp,
    SignalMonitor,
    StabilityReport,
)
from lightning_stability.losses import LossWeights  # noqa: E402
from lightning_stability.nn import ClampedRMSScale  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "overhead.json"
TARGET_RATIO = 1.03
TARGET_MEMORY_RATIO = 1.05


# ----------------------------------------------------------------------------------------------------------------------
# the fixed model: a small SEANet-like 1-D conv autoencoder (25k parameters) on batches of 4 x 93 ms of 22.05 kHz
# audio, with BatchNorm (buffers for the guard to protect), following the package's protocols so every callback of the
# stack has something to work on: a `LossWeights` over its loss terms, a `ClampedRMSScale` output layer, a
# `sample_rate`, and the loss-dict / signal-pair step outputs. Every configuration (bare included) runs this same model.


class ConvAudioModel(pl.LightningModule):
    def __init__(self, channels: int = 16, fused: bool = False) -> None:
        super().__init__()
        c = channels
        self.fused = fused
        self.sample_rate = 22050
        self.loss_weights = LossWeights({"l1": 1.0, "rms": 0.1})
        self.output_scale = ClampedRMSScale(0.7, 1.5)  # output RMS pulled towards the input's, factor clamped
        self.encoder = nn.Sequential(
            nn.Conv1d(1, c, 7, padding=3),
            nn.BatchNorm1d(c),
            nn.ELU(),
            nn.Conv1d(c, 2 * c, 8, stride=4, padding=2),
            nn.BatchNorm1d(2 * c),
            nn.ELU(),
            nn.Conv1d(2 * c, 2 * c, 8, stride=4, padding=2),
            nn.ELU(),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose1d(2 * c, 2 * c, 8, stride=4, padding=2),
            nn.BatchNorm1d(2 * c),
            nn.ELU(),
            nn.ConvTranspose1d(2 * c, c, 8, stride=4, padding=2),
            nn.ELU(),
            nn.Conv1d(c, 1, 7, padding=3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_scale(self.decoder(self.encoder(x)), x)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        y = self(x)
        rms = lambda a: a.pow(2).mean(dim=(1, 2)).add(1e-8).sqrt()  # noqa: E731
        losses = {"l1": nn.functional.l1_loss(y, x), "rms": (rms(y).log() - rms(x).log()).abs().mean()}
        total = self.loss_weights.weighted_sum(losses)
        return {"loss": total, "losses": {k: v.detach() for k, v in losses.items()}, "preds": y.detach(), "target": x}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=self.fused or None)


def audio_loader(n_batches: int, batch_size: int = 4, samples: int = 2048) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    t = torch.arange(samples) / 22050
    freqs = 100 + 900 * torch.rand(n_batches * batch_size, 1, 1, generator=g)
    x = torch.sin(2 * torch.pi * freqs * t) * 0.5 + 0.05 * torch.randn(n_batches * batch_size, 1, samples, generator=g)
    return DataLoader(TensorDataset(x), batch_size=batch_size, shuffle=False)


def demo_codec() -> pl.LightningModule:
    """The demo's ``CodecModule`` (``lightning-stability demo``: SEANet width 8, one LSTM layer, 8 x 1024-code RVQ at
    24 kHz, the demo's loss mix), the package's main model: about 0.3 s per step on one CPU thread."""
    from lightning_stability.reference.codec import recipe

    return recipe.demo_codec()


def demo_codec_gan() -> pl.LightningModule:
    """The demo's ``CodecModule`` trained against its multi-scale STFT discriminator (``adversarial=True``: manual
    optimization, two optimizers), so that ``AdversarialBalanceMonitor`` has a game to watch."""
    from lightning_stability.reference.codec import recipe

    return recipe.demo_codec(adversarial=True)


def codec_loader(n_batches: int) -> DataLoader:
    """Batches of the demo's shape (8 x 0.5 s at 24 kHz): tones plus noise, so no speech synthesis is needed."""
    from lightning_stability.reference.codec.demo import DemoConfig

    cfg = DemoConfig()
    samples = int(cfg.segment_seconds * cfg.sample_rate)
    g = torch.Generator().manual_seed(0)
    t = torch.arange(samples) / cfg.sample_rate
    n = n_batches * cfg.batch_size
    freqs = 100 + 900 * torch.rand(n, 1, 1, generator=g)
    x = torch.sin(2 * torch.pi * freqs * t) * 0.1 + 0.01 * torch.randn(n, 1, samples, generator=g)
    return DataLoader(TensorDataset(x), batch_size=cfg.batch_size, shuffle=False)


# name -> (model factory, loader factory, the loss term AdaptiveLossWeight controls, batch shape, description)
MODELS: dict[str, tuple[Callable[[], pl.LightningModule], Callable[[int], DataLoader], str, list[int], str]] = {
    "conv": (ConvAudioModel, audio_loader, "l1", [4, 1, 2048], "ConvAudioModel: 25k-parameter conv autoencoder"),
    "codec": (demo_codec, codec_loader, "mel", [8, 1, 12000], "the demo CodecModule (lightning-stability demo)"),
    "codec_gan": (demo_codec_gan, codec_loader, "mel", [8, 1, 12000], "the demo CodecModule with its discriminator"),
}
MODEL = "conv"  # set by main() from --model (and passed on to the memory child processes)


def make_model() -> pl.LightningModule:
    return MODELS[MODEL][0]()


def make_loader(n_batches: int) -> DataLoader:
    return MODELS[MODEL][1](n_batches)


# ----------------------------------------------------------------------------------------------------------------------
# configurations (name -> factory of a callback list)


def full_stack() -> list[pl.Callback]:
    """The whole kit at its defaults; the report writes into a fresh temporary folder (at fit end, not timed)."""
    return [
        GradientGuard(),
        AdaptiveLossWeight(MODELS[MODEL][2], base_weight=None),
        ScaleFactorClamp(),
        SignalMonitor(),  # default interval: every 50 training steps
        CodebookMonitor(),  # every 50 training batches (hooks only the models that have a known quantizer)
        AdversarialBalanceMonitor(),  # reads the step output's GAN terms when present
        StabilityReport(dirpath=tempfile.mkdtemp(prefix="overhead_report_"), log_to_wandb=False, print_summary=False),
    ]


CONFIGS: dict[str, Callable[[], list[pl.Callback]]] = {
    "bare": lambda: [],
    "guard": lambda: [GradientGuard()],  # default settings, buffer protection included
    "stack": full_stack,
}


def _fit(device: str, steps: int, callbacks: list[pl.Callback], model: pl.LightningModule, loader: DataLoader) -> None:
    """One quiet training run of ``steps`` batches: no logger, checkpointing, progress bar, summary, sanity check or
    validation (batches, not optimizer steps: a GAN steps two optimizers per batch)."""
    trainer = pl.Trainer(
        accelerator=device,
        devices=1,
        max_epochs=1,
        limit_train_batches=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader)


class StepTimer(pl.Callback):
    """Wall time between consecutive ``on_train_batch_start`` calls (first in the callback list)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def _proc_status_mb(key: str) -> float | None:
    """``VmHWM`` (peak resident set) or ``VmRSS`` of this process in MiB, from ``/proc/self/status`` (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


class RSSBeforeFit(pl.Callback):
    """Resident set size when training starts (model, data, optimizer and callbacks set up)."""

    def __init__(self) -> None:
        self.mb: float | None = None

    def on_train_start(self, trainer, pl_module):
        self.mb = _proc_status_mb("VmRSS")


def memory_child(name: str, steps: int) -> dict:
    """One run of configuration ``name`` in this (fresh) process: its peak and pre-training resident set."""
    torch.manual_seed(0)
    before = RSSBeforeFit()
    _fit("cpu", steps, [before, *CONFIGS[name]()], make_model(), make_loader(steps))
    return {"peak_rss_mb": _proc_status_mb("VmHWM"), "rss_at_train_start_mb": before.mb}


def measure_memory(names: list[str], steps: int, reps: int, threads: int) -> dict:
    """Peak RSS of each configuration, one fresh child process per run, interleaved like the timing runs."""
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            cmd = [sys.executable, __file__, "--memory-child", name, "--steps", str(steps), "--threads", str(threads)]
            cmd += ["--model", MODEL]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
            if out.returncode != 0:
                raise RuntimeError(f"memory run of {name!r} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    if any(r["peak_rss_mb"] is None for rs in runs.values() for r in rs):
        return {"checked": False, "reason": "/proc/self/status has no VmHWM (not Linux)"}
    peak = {n: statistics.median(r["peak_rss_mb"] for r in rs) for n, rs in runs.items()}
    start = {n: statistics.median(r["rss_at_train_start_mb"] for r in rs) for n, rs in runs.items()}
    growth = {n: peak[n] - start[n] for n in names}
    return {
        "checked": True,
        "reps": reps,
        "steps": steps,
        "peak_rss_mb": peak,
        "rss_at_train_start_mb": start,
        "training_growth_mb": growth,
        "peak_rss_ratio_vs_bare": {n: peak[n] / peak["bare"] for n in names if n != "bare"},
        "extra_peak_mb_vs_bare": {n: peak[n] - peak["bare"] for n in names if n != "bare"},
        "runs": runs,
    }


def run_once(name: str, steps: int, device: str) -> list[float]:
    torch.manual_seed(0)
    model = make_model()
    timer = StepTimer()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _fit(device, steps + 1, [timer, *CONFIGS[name]()], model, make_loader(steps + 1))
    if device == "cuda":
        CUDA_PEAK_MB.setdefault(name, []).append(torch.cuda.max_memory_allocated() / 2**20)
    return timer.times


CUDA_PEAK_MB: dict[str, list[float]] = {}


_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)


#: The monitors of the stack; ``monitor_costs`` in the summary breaks their share out.
MONITORS = ("SignalMonitor", "CodebookMonitor", "AdversarialBalanceMonitor")
#: Their periodic work (a check, a logged point) comes every this many training steps at their defaults.
MONITOR_INTERVAL = 50
#: The monitors together may take at most this fraction of a bare step (a third of the stack's 3 % time budget).
TARGET_MONITOR_FRACTION = 0.01
_ONCE_HOOKS = ("setup", "on_fit_start", "on_train_start")


def _timed(fn: Callable, sink: dict[int, float], step: list[int]) -> Callable:
    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sink[step[0]] = sink.get(step[0], 0.0) + time.perf_counter() - t0

    return timed


def _capturing(fn: Callable, sink: dict[int, float], step: list[int]) -> Callable:
    """``fn`` (a once-per-fit hook) with every module forward hook and optimizer step hook it registers timed into
    ``sink``: a callback's work inside the model's forward or the optimizer's step is its cost too."""
    patched = [
        (nn.Module, "register_forward_hook"),
        (nn.Module, "register_forward_pre_hook"),
        (torch.optim.Optimizer, "register_step_pre_hook"),
        (torch.optim.Optimizer, "register_step_post_hook"),
    ]

    def capturing(*args, **kwargs):
        originals = [(cls, attr, getattr(cls, attr)) for cls, attr in patched]
        for cls, attr, original in originals:

            def register(obj, hook, *a, _original=original, **k):
                return _original(obj, _timed(hook, sink, step), *a, **k)

            setattr(cls, attr, register)
        try:
            return fn(*args, **kwargs)
        finally:
            for cls, attr, original in originals:
                setattr(cls, attr, original)

    return capturing


def hook_times(callbacks: list[pl.Callback], steps: int, warmup: int, device: str) -> tuple[dict, dict]:
    """Time per step spent in each callback: ``({name: {"median_us", "mean_us", "max_us", "steps"}}, {name: mean us
    in the forward/step hooks it registered})``.

    Each callback's per-step hook methods are wrapped on the instance (Lightning looks hooks up with ``getattr``), and
    the module forward hooks and optimizer step hooks a callback registers in ``setup`` / ``on_fit_start`` /
    ``on_train_start`` are wrapped as they are registered (``CodebookMonitor`` counts codes in the quantizer's
    forward, ``GradientGuard`` may act in the optimizer's step), so the callbacks run unchanged; a counter callback,
    first in the list, numbers the steps.
    """
    torch.manual_seed(0)
    per_step: dict[str, dict[int, float]] = {type(cb).__name__: {} for cb in callbacks}
    inside: dict[str, dict[int, float]] = {type(cb).__name__: {} for cb in callbacks}
    step = [0]

    class Counter(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            step[0] = batch_idx

    for cb in callbacks:
        name = type(cb).__name__
        for hook in _HOOKS:
            setattr(cb, hook, _timed(getattr(cb, hook), per_step[name], step))
        for hook in _ONCE_HOOKS:
            setattr(cb, hook, _capturing(getattr(cb, hook), inside[name], step))
    _fit(device, steps, [Counter(), *callbacks], make_model(), make_loader(steps))
    out, hooks_only = {}, {}
    for name, d in per_step.items():
        values = [d.get(s, 0.0) + inside[name].get(s, 0.0) for s in range(warmup, steps)]
        out[name] = {
            "median_us": 1e6 * statistics.median(values),
            "mean_us": 1e6 * statistics.fmean(values),
            "max_us": 1e6 * max(values),
            "steps": len(values),
        }
        hooks_only[name] = 1e6 * statistics.fmean(inside[name].get(s, 0.0) for s in range(warmup, steps))
    return out, hooks_only


def guard_hook_time(steps: int, warmup: int, device: str) -> dict:
    """Median time per step spent inside ``GradientGuard()``'s hooks, alone in the Trainer (less sensitive to machine
    load than the ratio)."""
    times = hook_times([GradientGuard()], steps, warmup, device)[0]["GradientGuard"]
    return {"median_us": times["median_us"], "n": times["steps"]}


def stack_hook_times(steps: int, warmup: int, device: str) -> tuple[dict, dict]:
    """:func:`hook_times` of the ``stack`` configuration, over at least ``warmup + 2 * MONITOR_INTERVAL + 1`` steps,
    so the mean per step includes two of every monitor's periodic checks (the median shows a typical step without
    one)."""
    return hook_times(full_stack(), max(steps, warmup + 2 * MONITOR_INTERVAL + 1), warmup, device)


def monitor_costs(stack_hooks: dict, inside_us: dict, bare_s: float) -> dict:
    """The monitors' share of a step: their mean time per step (periodic checks and forward hooks included) against
    the bare step, with the target ``TARGET_MONITOR_FRACTION``."""
    per = {
        name: {
            "mean_us": stack_hooks[name]["mean_us"],
            "forward_hook_mean_us": inside_us.get(name, 0.0),
            "max_step_us": stack_hooks[name]["max_us"],
            "fraction_of_bare_step": stack_hooks[name]["mean_us"] / (1e6 * bare_s),
        }
        for name in MONITORS
        if name in stack_hooks
    }
    total = sum(v["fraction_of_bare_step"] for v in per.values())
    return {
        "target": f"the monitors' mean time per step (checks every {MONITOR_INTERVAL} steps and forward hooks "
        f"included) <= {TARGET_MONITOR_FRACTION:.0%} of a bare step",
        "target_met": bool(per) and total <= TARGET_MONITOR_FRACTION,
        "fraction_of_bare_step": total,
        "monitors": per,
        "steps": next(iter(stack_hooks.values()))["steps"] if stack_hooks else 0,
    }


# ----------------------------------------------------------------------------------------------------------------------
# GPU only: host syncs from the guard in sync-free mode


class SyncCountingGuard(GradientGuard):
    """Counts CUDA host synchronisations inside the guard's per-step hooks (``set_sync_debug_mode("warn")``)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.syncs_per_step: dict[int, int] = {}

    def _counted(self, trainer, fn, *args) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn(*args)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        n = sum("synchroniz" in str(w.message) for w in caught)
        self.syncs_per_step[trainer.global_step] = self.syncs_per_step.get(trainer.global_step, 0) + n

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._counted(trainer, super().on_train_batch_start, trainer, pl_module, batch, batch_idx)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._counted(trainer, super().on_before_optimizer_step, trainer, pl_module, optimizer)


def count_guard_syncs(steps: int, log_every: int) -> dict:
    torch.manual_seed(0)
    model = ConvAudioModel(fused=True)
    guard = SyncCountingGuard(sync_free=True, log_every_n_steps=log_every)
    _fit("cuda", steps, [guard], model, audio_loader(steps))
    read_steps = {s for s in guard.syncs_per_step if (s + 1) % log_every == 0}
    other = {s: n for s, n in guard.syncs_per_step.items() if s not in read_steps and s != 0}
    return {
        "checked": True,
        "log_every_n_steps": log_every,
        "steps": steps,
        "syncs_on_ordinary_steps": sum(other.values()),
        "ordinary_steps": len(other),
        "syncs_on_first_step": guard.syncs_per_step.get(0, 0),
        "syncs_on_read_steps": {str(s): guard.syncs_per_step[s] for s in sorted(read_steps)},
    }


# ----------------------------------------------------------------------------------------------------------------------


def _describe_model() -> dict:
    model = make_model()
    return {
        "key": MODEL,
        "name": type(model).__name__,
        "description": MODELS[MODEL][4],
        "parameters": sum(p.numel() for p in model.parameters()),
        "buffers": sum(b.numel() for b in model.buffers()),
        "batch": MODELS[MODEL][3],
        "adaptive_loss_term": MODELS[MODEL][2],
    }


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(prog="benchmarks/overhead.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few short repetitions (CI smoke run)")
    parser.add_argument(
        "--model",
        default="conv",
        choices=list(MODELS),
        help="conv: the 25k-parameter model; codec: the demo codec; codec_gan: the demo codec with its discriminator",
    )
    parser.add_argument("--reps", type=int, default=None, help="repetitions per configuration")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=None, help="steps dropped at the start of every run")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/overhead[_quick].json")
    parser.add_argument("--mem-reps", type=int, default=None, help="child-process runs per configuration for memory")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # internal: one memory run
    args = parser.parse_args(argv)
    global MODEL
    MODEL = args.model
    if args.memory_child is not None:
        torch.set_num_threads(args.threads)
        print(json.dumps(memory_child(args.memory_child, args.steps or 60)))
        return {}
    reps = args.reps or (2 if args.quick else 8)
    mem_reps = args.mem_reps if args.mem_reps is not None else (1 if args.quick else 3)
    steps = args.steps or (25 if args.quick else 60)
    warmup = args.warmup if args.warmup is not None else (5 if args.quick else 10)
    if "bare" not in args.configs:
        parser.error("`--configs` must include 'bare' (the reference)")
    if args.threads < 1:
        parser.error(f"`--threads` must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = _common.machine_info()

    times: dict[str, list[float]] = {name: [] for name in args.configs}
    per_rep: dict[str, list[float]] = {name: [] for name in args.configs}
    for rep in range(reps):
        order = args.configs if rep % 2 == 0 else args.configs[::-1]
        for name in order:
            t = run_once(name, steps, device)[warmup:]
            times[name].extend(t)
            per_rep[name].append(statistics.median(t))

    bare = statistics.median(times["bare"])
    cases = []
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10)
        cases.append(
            {
                "name": name,
                "median_step_ms": 1e3 * statistics.median(ts),
                "p10_step_ms": 1e3 * q[0],
                "p90_step_ms": 1e3 * q[-1],
                "n_steps": len(ts),
                "per_rep_median_ms": [1e3 * m for m in per_rep[name]],
                "ratio_vs_bare": statistics.median(ts) / bare,
                "median_of_per_rep_ratios": statistics.median(a / b for a, b in zip(per_rep[name], per_rep["bare"])),
            }
        )
    hooks = guard_hook_time(steps, warmup, device)
    stack_hooks, inside_us = stack_hook_times(steps, warmup, device) if "stack" in args.configs else ({}, {})
    monitors = monitor_costs(stack_hooks, inside_us, bare) if stack_hooks else {"checked": False}
    if device == "cuda":
        sync = count_guard_syncs(steps=40, log_every=10)
    else:
        sync = {"checked": False, "reason": "CUDA not available: torch.cuda.set_sync_debug_mode needs a GPU"}
    memory = (
        measure_memory(list(args.configs), steps, mem_reps, args.threads)
        if mem_reps > 0
        else {"checked": False, "reason": "--mem-reps 0"}
    )
    if device == "cuda":
        memory["cuda_peak_allocated_mb"] = {n: statistics.median(v) for n, v in CUDA_PEAK_MB.items()}
        memory["cuda_peak_ratio_vs_bare"] = {
            n: statistics.median(v) / statistics.median(CUDA_PEAK_MB["bare"]) for n, v in CUDA_PEAK_MB.items()
        }
    mem_ratios = memory.get("peak_rss_ratio_vs_bare", {})
    ratios = {c["name"]: c["ratio_vs_bare"] for c in cases if c["name"] != "bare"}
    doc = {
        "benchmark": "overhead",
        "schema_version": 1,
        "mode": "quick" if args.quick else "full",
        "command": " ".join(["python", "benchmarks/overhead.py", *(argv if argv is not None else sys.argv[1:])]),
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wall_time_s": None,
        "machine": machine,
        "config": {
            "device": device,
            "model": _describe_model(),
            "configs": list(args.configs),
            "reps": reps,
            "memory_reps": mem_reps,
            "steps_per_run": steps,
            "warmup_steps_dropped": warmup,
            "order": "interleaved, flipped every repetition (A B, B A, ...); fresh Trainer and model per run",
        },
        "cases": cases,
        "summary": {
            "target": f"median step time with callbacks / bare <= {TARGET_RATIO} and peak memory / bare <= "
            f"{TARGET_MEMORY_RATIO} on CPU, for every configuration",
            "target_met": all(r <= TARGET_RATIO for r in ratios.values())
            and bool(memory["checked"])
            and all(r <= TARGET_MEMORY_RATIO for r in mem_ratios.values()),
            "time_target_met": all(r <= TARGET_RATIO for r in ratios.values()),
            "memory_target_met": bool(memory["checked"]) and all(r <= TARGET_MEMORY_RATIO for r in mem_ratios.values()),
            "ratio_vs_bare": ratios,
            "memory_ratio_vs_bare": mem_ratios,
            "memory": memory,
            "guard_hook_time_us": hooks["median_us"],
            "guard_hook_fraction_of_bare_step": hooks["median_us"] / (1e6 * bare),
            "guard_host_syncs": sync,
            "stack_hook_time_us": stack_hooks,
            "stack_hook_fraction_of_bare_step": sum(v["mean_us"] for v in stack_hooks.values()) / (1e6 * bare),
            "monitor_costs": monitors,
        },
    }
    doc["wall_time_s"] = round(time.perf_counter() - started, 2)
    stem = "overhead" if MODEL == "conv" else f"overhead_{MODEL}"
    out = args.out or RESULTS.with_name(f"{stem}_quick.json" if args.quick else f"{stem}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    line = ", ".join(f"{n} {r:.3f}x" for n, r in ratios.items())
    mem_line = ", ".join(f"{n} {r:.3f}x" for n, r in mem_ratios.items()) or "not measured"
    rep_line = ", ".join(f"{c['name']} {c['median_of_per_rep_ratios']:.3f}x" for c in cases if c["name"] != "bare")
    print(
        f"overhead ({MODEL} model, {device}, {reps} reps x {steps} steps): bare {1e3 * bare:.2f} ms/step; {line}"
        f" (<= {TARGET_RATIO}: {'met' if doc['summary']['time_target_met'] else 'NOT met'}); peak RSS {mem_line}"
        f" (<= {TARGET_MEMORY_RATIO}: {'met' if doc['summary']['memory_target_met'] else 'NOT met'});"
        f" per-rep median ratio {rep_line}; guard hooks {hooks['median_us']:.0f} us/step"
        f" ({100 * hooks['median_us'] / (1e6 * bare):.1f}% of a bare step);"
        f" monitors {100 * monitors.get('fraction_of_bare_step', float('nan')):.2f}% of a bare step"
        f" (<= {TARGET_MONITOR_FRACTION:.0%}: {'met' if monitors.get('target_met') else 'NOT met'});"
        f" guard host syncs: {'checked' if sync['checked'] else 'skipped (no GPU)'} -> {out}"
    )
    return doc


if __name__ == "__main__":
    main()
