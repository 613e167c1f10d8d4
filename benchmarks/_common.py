"""Helpers shared by the benchmark scripts: command line, machine description, JSON output, quiet trainers, timing.

Every benchmark writes one JSON document with the same top-level layout (``schema_version`` 1)::

    {
      "benchmark": "rescue",                 # script name
      "schema_version": 1,
      "mode": "quick" | "full",
      "command": "python benchmarks/rescue.py --quick",
      "created_utc": "2026-11-21T13:45:00Z",
      "wall_time_s": 123.4,                  # the whole script
      "machine": {...},                      # machine_info(): CPU model, cores, threads, torch/lightning versions, GPU
      "config": {...},                       # everything that defines the measurement
      "cases": [...],                        # per-case results (layout documented in each script's module docstring)
      "summary": {"target": "...", "target_met": true | false, ...}
    }

Non-finite floats are written as the strings ``"nan"``, ``"inf"``, ``"-inf"`` so the file stays strict JSON.
A script exits 0 when it ran to the end (whether or not the target was met: ``summary.target_met`` records that) and
non-zero only when it crashed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


# ---------------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------------
def parser(name: str, description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--quick``, ``--out``, ``--seed``, ``--threads``."""
    p = argparse.ArgumentParser(prog=f"benchmarks/{name}.py", description=description)
    p.add_argument("--quick", action="store_true", help="CI mode: a few seconds to a couple of minutes")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"JSON output path (default: benchmarks/results/{name}.json, or {name}_quick.json with --quick)",
    )
    p.add_argument("--seed", type=int, default=0, help="base seed of every run (default 0)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: these models are too small to gain from more, a shared machine loses "
        "badly from oversubscription, and the numbers do not depend on the core count)",
    )
    return p


def default_out(name: str, quick: bool) -> Path:
    return RESULTS_DIR / (f"{name}_quick.json" if quick else f"{name}.json")


def setup_run(args: argparse.Namespace) -> None:
    """Apply ``--threads`` and silence Lightning's chatter."""
    if args.threads < 1:
        raise SystemExit(f"`--threads` must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    quiet()


def quiet() -> None:
    """Lightning's info lines and the warnings that are expected in small benchmark runs go away."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (
        ".*does not have many workers.*",
        ".*The number of training batches.*",
        ".*GPU available but not used.*",
        ".*Checkpoint directory.*",
        ".*`training_step` returned.*",
        ".*weight_norm.*",
        ".*LeafSpec.*",
        ".*exists and is not empty.*",
        ".*You defined a `validation_step`.*",
        ".*smaller than the logging interval.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning)


# ---------------------------------------------------------------------------------------------------------------------
# machine and output
# ---------------------------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import lightning

    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": _git_commit(),
    }
    try:
        info["load_average_1min_at_start"] = os.getloadavg()[0]
    except OSError:
        info["load_average_1min_at_start"] = None
    return info


def json_safe(x: Any) -> Any:
    """Recursively turn tensors into numbers/lists and non-finite floats into strings."""
    if torch.is_tensor(x):
        x = x.detach().cpu().tolist()
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)  # paths, enums, anything else: its text


def command_line() -> str:
    argv = [Path(sys.argv[0]).as_posix()] + sys.argv[1:]
    with contextlib.suppress(ValueError):  # a script outside the repository keeps its path
        argv[0] = str(Path(argv[0]).resolve().relative_to(REPO_ROOT))
    return "python " + " ".join(argv)


def write_result(
    name: str,
    args: argparse.Namespace,
    *,
    config: dict[str, Any],
    cases: list[dict[str, Any]],
    summary: dict[str, Any],
    started: float,
    machine: dict[str, Any],
) -> Path:
    """Write the benchmark's JSON document atomically and return its path."""
    out = args.out if args.out is not None else default_out(name, args.quick)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "schema_version": SCHEMA_VERSION,
        "mode": "quick" if args.quick else "full",
        "command": command_line(),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "machine": machine,
        "config": config,
        "cases": cases,
        "summary": summary,
    }
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(json_safe(doc), f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# training helpers
# ---------------------------------------------------------------------------------------------------------------------
def make_trainer(root: str | os.PathLike, callbacks: Sequence[Any] = (), **kwargs: Any):
    """A quiet CPU ``Trainer`` (no logger, checkpoints, progress bar or validation unless asked for)."""
    import lightning.pytorch as pl

    defaults: dict[str, Any] = {
        "default_root_dir": os.fspath(root),
        "accelerator": "cpu",
        "devices": 1,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        "max_epochs": -1,
    }
    defaults.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **defaults)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def finite(x: float | None) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def fmt(x: float | None, spec: str = ".3g") -> str:
    """Number for a summary line (``n/a`` for None, ``nan``/``inf`` as is)."""
    if x is None:
        return "n/a"
    return format(x, spec)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0
