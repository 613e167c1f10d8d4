"""The whole callback stack on small configs of the two reference modules, plus fault injection and bookkeeping.

Used by every file of the reliability suite (issue 9):

- ``make_module(kind, faults)``: ``CodecModule`` / ``CascadeTransformerModule`` small enough for a CPU test (a few ms
  per step), with their data (``codec_loader()``, ``cascade_loader()``: map-style, not shuffled; ``resumable=True``
  gives the package's ``ResumableDataLoader``, which Lightning resumes mid-epoch);
- ``full_stack(kind, ...)``: ``GradientGuard``, ``AdaptiveLossWeight``, ``ScaleFactorClamp``, ``SignalMonitor``,
  ``StabilityReport`` and, on the cascade, ``SpectralNormInjection`` on the three output projections (the codec's
  convolutions carry weight norm, so spectral norm does not apply there);
- ``Faulty``: a mixin that corrupts a real module at chosen global steps, *from outside the module's own code*
  (the batch, the loss, the gradient, or a parameter overwritten with NaN), the places the package's own tests, which
  use a toy ``FaultyModule``, did not look;
- ``record_fault()``: the session tally of faults injected / survived / lost that ``conftest.py`` writes to
  ``benchmarks/results/reliability.json`` (the numbers ``docs/reliability.md`` quotes).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_stability.callbacks import (
    AdaptiveLossWeight,
    GradientGuard,
    ScaleFactorClamp,
    SignalMonitor,
    SpectralNormInjection,
    StabilityReport,
)
from lightning_stability.reference.cascade import CascadeTransformerModule
from lightning_stability.reference.codec import CodecModule
from lightning_stability.reference.data._audio import ResumableDataLoader
from tests._helpers_codec import OBJECTIVE_0_1
from tests.helpers import scale_grad

SR = 8000
LENGTH = 512
CODEC = {
    "sample_rate": SR,
    "n_filters": 4,
    "ratios": (4, 4),
    "dimension": 8,
    "lstm": 0,
    "n_q": 2,
    "codebook_size": 16,
    "kmeans_iters": 2,
    "mel_window_lengths": (64, 128),
    "mel_n_mels": (10, 20),
    "lr": 3e-3,
    # the objective these fault tests were written against (log-mel, no gates: the healthy gradient norms of 17-35
    # that their max_norm bounds assume), not CodecModule's later defaults; the mel weight starts inside
    # AdaptiveLossWeight's default bounds [1, 5]
    **OBJECTIVE_0_1,
    "loss_weights": {"mel": 2.5, "l1": 0.1, "rms": 1.0, "vq": 1.0},
    "output_rms_clamp": (0.7, 1.5),
}
# the cascade's own spectral norm is off: SpectralNormInjection puts it on the output projections instead
CASCADE = {"latent_dim": 8, "widths": [16, 16, 16], "n_layers": 1, "n_heads": 2, "spectral_norm_output": False}
CASCADE_KW = {"lr": 2e-3, "warmup_steps": 2, "total_steps": 200}


# ------------------------------------------------------------------------------------------------------------ data
def chirps(n: int, length: int = LENGTH, sr: int = SR, seed: int = 0) -> torch.Tensor:
    """``[n, 1, length]`` speech-like AM chirps (RMS about 0.1-0.2)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length) / sr
    out = []
    for _ in range(n):
        f0 = 100 + 400 * torch.rand(1, generator=g)
        f1 = f0 + 600 * torch.rand(1, generator=g)
        phase = 2 * math.pi * (f0 * t + (f1 - f0) * t**2 / (2 * t[-1]))
        am = 0.5 + 0.5 * torch.sin(2 * math.pi * (3 + 5 * torch.rand(1, generator=g)) * t)
        out.append(0.3 * am * torch.sin(phase))
    return torch.stack(out)[:, None]


class AudioClips(Dataset):
    def __init__(self, n: int = 16, seed: int = 0) -> None:
        self.audio = chirps(n, seed=seed)

    def __len__(self) -> int:
        return len(self.audio)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.audio[i]


class Latents(Dataset):
    """Enhancement in miniature: target = smooth latents (RMS 5.7), source = target + noise."""

    def __init__(self, n: int = 16, d: int = 8, t: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(n, d, t, generator=g).cumsum(-1)
        self.target = 5.7 * base / base.pow(2).mean().sqrt()
        self.source = self.target + 2.0 * torch.randn(n, d, t, generator=g)
        self.cond = self.target.roll(1, dims=0)

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"source": self.source[i], "target": self.target[i], "conditioning": self.cond[i]}


def codec_loader(n: int = 16, batch_size: int = 4, seed: int = 0, resumable: bool = False) -> DataLoader:
    return (ResumableDataLoader if resumable else DataLoader)(AudioClips(n, seed), batch_size=batch_size, shuffle=False)


def cascade_loader(n: int = 16, batch_size: int = 4, seed: int = 0, resumable: bool = False) -> DataLoader:
    return (ResumableDataLoader if resumable else DataLoader)(
        Latents(n, seed=seed), batch_size=batch_size, shuffle=False
    )


def loader(kind: str, **kw: Any) -> DataLoader:
    return codec_loader(**kw) if kind == "codec" else cascade_loader(**kw)


# ------------------------------------------------------------------------------------------------------- modules
class Faulty:
    """Mixin: corrupt a real module at chosen global steps (``faults = {kind: steps}``; ``fault_ranks``: only there).

    Kinds: ``"nan_batch"`` (the input batch is NaN), ``"inf_grad"`` (finite loss, inf gradient into every parameter
    upstream of the output), ``"spike"`` (loss x ``spike_factor``), ``"nan_loss"`` (the loss is NaN),
    ``"nan_param"`` (a weight is overwritten with NaN before the forward pass, as a bad optimizer step or a stray
    in-place write would; the weight stays NaN until someone restores it).
    """

    faults: dict[str, set[int]]
    fault_ranks: set[int] | None
    spike_factor: float = 1000.0
    injected: list[tuple[int, str]]

    def setup_faults(self, faults: dict[str, Iterable[int]] | None, fault_ranks: Iterable[int] | None) -> None:
        self.faults = {k: set(v) for k, v in (faults or {}).items()}
        self.fault_ranks = None if fault_ranks is None else set(fault_ranks)
        self.injected = []

    def _due(self, kind: str) -> bool:
        if self.global_step not in self.faults.get(kind, ()):
            return False
        return self.fault_ranks is None or self.global_rank in self.fault_ranks

    def _corrupt_batch(self, batch: Any) -> Any:
        if self._due("nan_param"):
            with torch.no_grad():
                first = next(p for p in self.parameters() if p.requires_grad)
                first.view(-1)[0] = float("nan")
            self.injected.append((self.global_step, "nan_param"))
        if not self._due("nan_batch"):
            return batch
        self.injected.append((self.global_step, "nan_batch"))
        if isinstance(batch, dict):
            return {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in batch.items()}
        return torch.full_like(batch, float("nan"))

    def _corrupt_output(self, out: dict[str, Any]) -> dict[str, Any]:
        loss = out["loss"]
        if self._due("inf_grad"):
            loss = scale_grad(loss, float("inf"))
            self.injected.append((self.global_step, "inf_grad"))
        if self._due("spike"):
            loss = loss * self.spike_factor
            out["losses"] = {k: v * self.spike_factor for k, v in out["losses"].items()}
            self.injected.append((self.global_step, "spike"))
        if self._due("nan_loss"):
            loss = loss * float("nan")
            self.injected.append((self.global_step, "nan_loss"))
        out["loss"] = loss
        return out


class FaultyCodec(Faulty, CodecModule):
    def __init__(self, faults=None, fault_ranks=None, **kw: Any) -> None:
        super().__init__(**{**CODEC, **kw})
        self.setup_faults(faults, fault_ranks)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._corrupt_output(super().training_step(self._corrupt_batch(batch), batch_idx))


class FaultyCascade(Faulty, CascadeTransformerModule):
    def __init__(self, faults=None, fault_ranks=None, config=None, **kw: Any) -> None:
        super().__init__(config or dict(CASCADE), **{**CASCADE_KW, **kw})
        self.setup_faults(faults, fault_ranks)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._corrupt_output(super().training_step(self._corrupt_batch(batch), batch_idx))


def make_module(kind: str, faults=None, fault_ranks=None, **kw: Any) -> pl.LightningModule:
    if kind == "codec":
        return FaultyCodec(faults, fault_ranks, **kw)
    if kind == "cascade":
        return FaultyCascade(faults, fault_ranks, **kw)
    raise ValueError(kind)


# -------------------------------------------------------------------------------------------------- the stack
ADAPTIVE_LOSS = {"codec": "mel", "cascade": "stage3"}


def full_stack(
    kind: str,
    report_dir: str | os.PathLike,
    *,
    guard: dict[str, Any] | None = None,
    adaptive: dict[str, Any] | None = None,
    spectral: bool = True,
) -> list[pl.Callback]:
    """Every callback of the package, configured for a short run (warm-ups of a few steps)."""
    guard_kw = {
        "max_norm": 1e4,
        "max_consecutive_skips": 5,
        "on_persistent": "rollback",
        "snapshot_every": 2,
        "max_rollbacks": 3,
        "log_every_n_steps": 1,
        "warn_every_n_steps": 1000,
        **(guard or {}),
    }
    adaptive_kw = {
        "base_weight": 2.5 if kind == "codec" else 1.0,
        "min_weight": 0.5,
        "max_weight": 5.0,
        "warmup_steps": 3,
        "cooling_steps": 2,
        "variance_window": 4,
        **(adaptive or {}),
    }
    callbacks: list[pl.Callback] = [
        GradientGuard(**guard_kw),
        AdaptiveLossWeight(ADAPTIVE_LOSS[kind], **adaptive_kw),
        ScaleFactorClamp(warn_after_steps=2, log_every_n_steps=1),
        SignalMonitor(train_every_n_steps=2, log_media=False),
        StabilityReport(dirpath=report_dir, log_to_wandb=False, print_summary=False, flush_every_n_steps=4),
    ]
    if spectral and kind == "cascade":  # the codec's convolutions carry weight norm: spectral norm does not apply
        callbacks.append(SpectralNormInjection("*.output_proj", log_every_n_steps=2))
    return callbacks


def stack_state(callbacks: Iterable[pl.Callback]) -> dict[str, Any]:
    """Every callback's ``state_dict`` keyed by its ``state_key`` (what a checkpoint stores)."""
    return {cb.state_key: cb.state_dict() for cb in callbacks if hasattr(cb, "event_log")}


def finite_module(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values() if t.is_floating_point())


def finite_checkpoint(path: str | os.PathLike) -> bool:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return all(bool(torch.isfinite(t).all()) for t in ckpt["state_dict"].values() if t.is_floating_point())


# ------------------------------------------------------------------------------------------------ bookkeeping
_TALLY: list[dict[str, Any]] = []


def record_fault(test: str, module: str, fault: str, action: str, injected: int, survived: bool, **extra: Any) -> None:
    """One fault scenario for the session summary: ``injected`` faults, and whether the run survived them."""
    _TALLY.append(
        {"test": test, "module": module, "fault": fault, "action": action, "injected": injected,
         "survived": bool(survived), **extra}
    )  # fmt: skip


def tally() -> list[dict[str, Any]]:
    return list(_TALLY)


def write_summary(path: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    rows = tally()
    summary = {
        "scenarios": len(rows),
        "faults_injected": sum(r["injected"] for r in rows),
        "scenarios_survived": sum(r["survived"] for r in rows),
        "faults_survived": sum(r["injected"] for r in rows if r["survived"]),
        "faults_lost": sum(r["injected"] for r in rows if not r["survived"]),
        "rows": rows,
        **(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, path)
    return summary
