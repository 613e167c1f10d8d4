"""Cost of the speech-quality metrics (wide-band PESQ, STOI, BS.1770 loudness error) on a CPU, per second of audio.

What it measures: ``lightning_stability.metrics.perceptual.wideband_pesq`` (``pesq`` after resampling 24 kHz -> 16 kHz),
``stoi`` (``pystoi``, which resamples to 10 kHz) and ``loudness_error`` (``pyloudnorm``) on one speech-like 24 kHz
signal pair (a gliding harmonic voice with 4 Hz syllables, and the same plus noise at about 20 dB SNR) of each length
in ``durations``; each call timed ``reps`` times (wall clock and this process's CPU time, one torch thread), median
kept. This is what ``CodecModule(quality_metrics="auto")`` adds to a validation, and what the demo's held-out
evaluation costs per second of audio.

JSON (``benchmarks/results/quality_cost.json``; common layout in ``benchmarks/_common.py``)::

    cases: [{"metric": "pesq"|"stoi"|"loudness", "seconds": float, "value": float,
             "wall_ms": float, "cpu_ms": float, "cpu_ms_per_audio_s": float}]
    summary: {"cpu_ms_per_audio_s": {metric: median over durations}, "demo_validation_cpu_s": float,
              "target", "target_met"}

Target: the three metrics on the demo's validation set (24 held-out one-second clips) cost under 5 s of CPU per
validation (four validations in a 1000-step, ~6-minute run).

Usage::

    python benchmarks/quality_cost.py            # durations 1, 3, 10 s; 5 repetitions
    python benchmarks/quality_cost.py --quick    # CI: 1 s, 1 repetition
"""

from __future__ import annotations

import math
import time
from typing import Any

import _common
import numpy as np
import torch

RATE = 24000
DEMO_VALIDATION_AUDIO_S = 24.0  # the demo's held-out voices: 24 utterances, one 1 s crop each


def speech_like(seconds: float, rate: int = RATE, seed: int = 0) -> torch.Tensor:
    g = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(k * phase + g.uniform(0, 2 * np.pi)) / k for k in range(1, 30))
    x = x * np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 0.5
    return torch.from_numpy((0.1 * x / np.sqrt(np.mean(x**2))).astype(np.float32))


def measure(fn, reps: int) -> tuple[float, float, float]:
    """``(value, median wall ms, median CPU ms)`` of ``fn()`` over ``reps`` calls (after one warm-up call)."""
    value = float(fn())
    walls, cpus = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(1000 * (time.perf_counter() - w0))
        cpus.append(1000 * (time.process_time() - c0))
    return value, _common.median(walls), _common.median(cpus)


def main() -> int:
    p = _common.parser("quality_cost", __doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=None, help="timed calls per case (default 5, quick 1)")
    args = p.parse_args()
    _common.setup_run(args)
    started = time.perf_counter()
    machine = _common.machine_info()
    from lightning_stability.metrics.perceptual import loudness_error, stoi, wideband_pesq

    durations = [1.0] if args.quick else [1.0, 3.0, 10.0]
    reps = args.reps or (1 if args.quick else 5)
    fns = {
        "pesq": lambda p, t: wideband_pesq(p, t, RATE),
        "stoi": lambda p, t: stoi(p, t, RATE),
        "loudness": lambda p, t: loudness_error(p, t, RATE),
    }
    cases: list[dict[str, Any]] = []
    for seconds in durations:
        target = speech_like(seconds, seed=args.seed)
        noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(args.seed + 1))
        preds = target + 0.01 * noise
        for name, fn in fns.items():
            value, wall, cpu = measure(lambda fn=fn: fn(preds, target), reps)
            cases.append(
                {
                    "metric": name,
                    "seconds": seconds,
                    "value": value,
                    "wall_ms": round(wall, 2),
                    "cpu_ms": round(cpu, 2),
                    "cpu_ms_per_audio_s": round(cpu / seconds, 2),
                }
            )
            print(f"[quality_cost] {name} {seconds:g} s: {cpu:.1f} ms CPU ({wall:.1f} ms wall), value {value:.3f}")
    per_s = {
        name: _common.median([c["cpu_ms_per_audio_s"] for c in cases if c["metric"] == name]) for name in fns
    }
    demo_s = sum(per_s.values()) * DEMO_VALIDATION_AUDIO_S / 1000
    summary = {
        "target": "PESQ + STOI + loudness on the demo's 24 x 1 s validation clips < 5 s of CPU per validation",
        "target_met": bool(math.isfinite(demo_s) and demo_s < 5.0),
        "cpu_ms_per_audio_s": per_s,
        "demo_validation_cpu_s": round(demo_s, 2),
    }
    config = {"quick": args.quick, "durations_s": durations, "reps": reps, "sample_rate": RATE, "seed": args.seed}
    out = _common.write_result(
        "quality_cost", args, config=config, cases=cases, summary=summary, started=started, machine=machine
    )
    print(
        "quality_cost: CPU ms per second of audio "
        + ", ".join(f"{k} {v:.1f}" for k, v in per_s.items())
        + f"; demo validation {demo_s:.2f} s -> {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
