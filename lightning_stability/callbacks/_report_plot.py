"""Plotting helpers for ``SignalMonitor`` (log-mel spectrogram images) and ``StabilityReport`` (the report figure).

Figures are drawn with matplotlib's object API on an Agg canvas (no ``pyplot`` global state, no display needed), so
they work in headless training jobs and in DDP worker processes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


# ------------------------------------------------------------------------------------------------------ log-mel
def _hz_to_mel(f: Tensor) -> Tensor:
    return 2595.0 * torch.log10(1.0 + f / 700.0)  # HTK mel scale


def _mel_to_hz(m: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> Tensor:
    """Triangular HTK mel filters ``[n_mels, n_fft // 2 + 1]`` from 0 Hz to Nyquist (unnormalised).

    A low filter narrower than the FFT bin spacing would contain no bin at all (an all-zero row, drawn as a dark
    stripe); such a filter takes the FFT bin nearest its centre instead.
    """
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mel_points = torch.linspace(0.0, float(_hz_to_mel(torch.tensor(sample_rate / 2.0))), n_mels + 2)
    hz = _mel_to_hz(mel_points.double())
    lower, center, upper = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    rising = (freqs[None] - lower) / (center - lower).clamp_min(1e-9)
    falling = (upper - freqs[None]) / (upper - center).clamp_min(1e-9)
    bank = torch.clamp(torch.minimum(rising, falling), min=0.0)
    empty = bank.sum(dim=1) == 0
    if empty.any():
        nearest = (freqs[None] - center[empty]).abs().argmin(dim=1)
        bank[empty.nonzero().squeeze(1), nearest] = 1.0
    return bank.float()


def log_mel_db(signal: Tensor, sample_rate: int, n_mels: int = 80, *, floor_db: float = -100.0) -> Tensor:
    """Log-mel power spectrogram in dB, ``[n_mels, frames]``, of a mono signal ``[T]``.

    Window about 46 ms (a power of two: 1024 at 22-24 kHz), hop a quarter window, Hann window; power floored at
    ``10 ** (floor_db / 10)`` so silence gives ``floor_db`` rather than ``-inf``. Non-finite samples are zeroed first.
    """
    x = torch.nan_to_num(signal.detach().float().cpu().reshape(-1), nan=0.0, posinf=0.0, neginf=0.0)
    n_fft = 2 ** max(6, round(math.log2(max(sample_rate, 1) * 0.046)))
    n_fft = min(n_fft, 2 ** max(2, int(math.log2(max(x.numel(), 4)))))  # short clips: a window that fits
    hop = max(1, n_fft // 4)
    spec = torch.stft(x, n_fft, hop_length=hop, window=torch.hann_window(n_fft), center=False, return_complex=True)
    power = spec.abs().square()  # [F, frames]
    n_mels = max(1, min(n_mels, n_fft // 2 + 1))
    mel = mel_filterbank(sample_rate, n_fft, n_mels) @ power
    return 10.0 * torch.log10(mel.clamp_min(10.0 ** (floor_db / 10.0)))


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _to_rgb(fig) -> np.ndarray:
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])


def render_mel_pair(
    target: Tensor, preds: Tensor, sample_rate: int, *, title: str = "", n_mels: int = 80
) -> np.ndarray:
    """Target and reconstruction log-mel spectrograms, stacked, on one colour scale: ``uint8 [H, W, 3]``."""
    mels = [log_mel_db(target, sample_rate, n_mels), log_mel_db(preds, sample_rate, n_mels)]
    vmax = float(max(m.max() for m in mels))
    vmin = vmax - 80.0
    hop_seconds = (target.numel() / max(mels[0].shape[1], 1)) / sample_rate
    fig = _figure(6.0, 4.2)
    axes = fig.subplots(2, 1, sharex=True)
    for ax, mel, name in zip(axes, mels, ("target", "reconstruction")):
        extent = (0.0, mel.shape[1] * hop_seconds, 0, mel.shape[0])
        image = ax.imshow(mel.numpy(), origin="lower", aspect="auto", vmin=vmin, vmax=vmax, extent=extent, cmap="magma")
        ax.set_ylabel(f"{name}\nmel bin")
    axes[-1].set_xlabel("time (s)")
    fig.colorbar(image, ax=list(axes), label="dB")
    if title:
        fig.suptitle(title)
    return _to_rgb(fig)


# ------------------------------------------------------------------------------------------------- report figure
@dataclass
class Series:
    """One line on a panel; ``marks`` are steps drawn as vertical lines (e.g. skipped steps)."""

    label: str
    steps: Sequence[int]
    values: Sequence[float]


@dataclass
class Panel:
    title: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    log_y: bool = False
    marks: dict[str, Sequence[int]] = field(default_factory=dict)  # label -> steps (vertical lines)
    hlines: dict[str, float] = field(default_factory=dict)  # label -> y value (bounds)


_MARK_COLORS = {"skip": "tab:red", "rollback": "tab:purple", "amp_overflow": "tab:orange"}


def render_report(panels: Sequence[Panel], path: str | Path, *, title: str = "") -> Path:
    """Draw ``panels`` one above the other and save a PNG to ``path``; returns the path.

    Non-finite points are dropped from lines and shown as red crosses at the panel's top edge, so a NaN/inf step is
    visible rather than silently missing. A log-scale panel with non-positive values falls back to a symlog axis.
    """
    path = Path(path)
    n = max(len(panels), 1)
    fig = _figure(10.0, 2.6 * n + 0.6)
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    if not panels:
        axes[0].text(0.5, 0.5, "no data recorded", ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
    for ax, panel in zip(axes, panels):
        positive_only = True
        for series in panel.series:
            steps = np.asarray(series.steps, dtype=float)
            values = np.asarray(series.values, dtype=float)
            finite = np.isfinite(values)
            positive_only &= bool(np.all(values[finite] > 0))
            # NaN breaks the line, so a non-finite step shows as a gap (plus a cross) rather than a bridged segment
            # sparse series (e.g. a sigma logged every 50 steps in a short run) get markers, or one point is invisible
            marker = "o" if len(steps) <= 30 else None
            ax.plot(
                steps, np.where(finite, values, np.nan), label=series.label, linewidth=1.2, marker=marker, markersize=3
            )
            if (~finite).any():
                ax.plot(
                    steps[~finite],
                    np.ones(int((~finite).sum())),
                    "x",
                    color="red",
                    transform=ax.get_xaxis_transform(),
                    clip_on=False,
                    label=f"{series.label}: non-finite",
                )
        for label, value in panel.hlines.items():
            ax.axhline(value, color="grey", linestyle=":", linewidth=1.0, label=label)
        for kind, steps in panel.marks.items():
            color = _MARK_COLORS.get(kind.split(" ")[0], "tab:red")
            for i, step in enumerate(steps):
                ax.axvline(step, color=color, alpha=0.5, linewidth=1.0, label=kind if i == 0 else None)
        if panel.log_y:
            ax.set_yscale("log" if positive_only else "symlog")
        ax.set_title(panel.title, fontsize=10, loc="left")
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=8, loc="best", ncol=min(3, len(handles)))
    axes[-1].set_xlabel("optimizer step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
