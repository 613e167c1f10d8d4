"""Hygiene for every test: seeded, no leaked environment variables, nothing written outside ``tmp_path``."""

from __future__ import annotations

import os
import random
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
_ARTIFACTS = ("lightning_logs", "wandb", "checkpoints", "stability_report.json", "stability_report.png")


def pytest_configure(config: pytest.Config) -> None:
    # W&B never reaches the network from tests, even where a test forgets to ask for offline mode.
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_DISABLE_GIT", "true")
    os.environ.setdefault("WANDB_DISABLE_CODE", "true")
    config._ls_preexisting = {name for name in _ARTIFACTS if (REPO_ROOT / name).exists()}  # type: ignore[attr-defined]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = getattr(session.config, "_ls_preexisting", set())
    leaked = [name for name in _ARTIFACTS if (REPO_ROOT / name).exists() and name not in before]
    if leaked:
        session.exitstatus = 1
        print(f"\nERROR: tests left artifacts in the repository root: {leaked}")


@pytest.fixture(autouse=True)
def _hygiene(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Seed every RNG, run inside ``tmp_path``, point W&B/caches there, and restore the environment afterwards."""
    env_before = dict(os.environ)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PL_DISABLE_FORK", "0")
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])  # pytest's own arguments are not a CLI test's command line
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    deterministic = torch.are_deterministic_algorithms_enabled()
    with warnings.catch_warnings():
        yield
    torch.set_default_dtype(dtype)
    torch.use_deterministic_algorithms(deterministic)
    leaked = {k for k in os.environ if k not in env_before} - {"PYTEST_CURRENT_TEST"}
    for key in leaked:  # a test (or a library it ran) set a variable monkeypatch does not know about
        os.environ.pop(key, None)
    for key, value in env_before.items():
        if os.environ.get(key) != value:
            os.environ[key] = value
