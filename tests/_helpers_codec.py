"""Synthetic audio for the codec tests: amplitude-modulated linear chirps (speech-like pitch glides and syllables)."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader

SR = 8000
LENGTH = 1024


def chirps(n: int = 16, length: int = LENGTH, sr: int = SR, seed: int = 0) -> torch.Tensor:
    """``[n, 1, length]`` sums of two AM chirps at random pitches, RMS about 0.1-0.2."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length) / sr
    out = []
    for _ in range(n):
        x = torch.zeros(length)
        for _ in range(2):
            f0 = 100 + 400 * torch.rand(1, generator=g)
            f1 = f0 + 600 * torch.rand(1, generator=g)
            phase = 2 * math.pi * (f0 * t + (f1 - f0) * t**2 / (2 * t[-1]))
            am = 0.5 + 0.5 * torch.sin(2 * math.pi * (3 + 5 * torch.rand(1, generator=g)) * t)
            x = x + 0.2 * am * torch.sin(phase)
        out.append(x)
    return torch.stack(out)[:, None]


def loader(n: int = 16, batch_size: int = 4, seed: int = 0, shuffle: bool = False) -> DataLoader:
    return DataLoader(chirps(n, seed=seed), batch_size=batch_size, shuffle=shuffle)


TINY = {
    "sample_rate": SR,
    "n_filters": 4,
    "ratios": (4, 4),
    "dimension": 16,
    "lstm": 0,
    "n_q": 3,
    "codebook_size": 32,
    "kmeans_iters": 3,
    "mel_window_lengths": (64, 128, 256),
    "mel_n_mels": (10, 20, 40),
    "lr": 3e-3,
}

#: ``CodecModule``'s objective before 0.2.0 made the demo's recipe its default: the tests that measure training
#: mechanics on these 8 kHz chirps (a falling loss in 24 steps) pin it, so they keep measuring what they measured.
OBJECTIVE_0_1 = {
    "loss_weights": {"mel": 15.0, "l1": 0.1, "rms": 1.0, "vq": 1.0},
    "mel_log_weight": 1.0,
    "mel_mag_weight": 0.0,
    "rms_correlation_gate": None,
    "l1_gain_gate": None,
    "remove_dc": False,
}
