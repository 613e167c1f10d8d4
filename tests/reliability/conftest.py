"""Session summary of the reliability suite: faults injected, survived and lost, counted by the tests themselves.

Every scenario calls ``_stack.record_fault(...)``; at the end of the session the tally is printed (one line) and, when
``LS_RELIABILITY_SUMMARY`` names a file (relative paths are taken from the repository root), written there as JSON,
e.g. ``LS_RELIABILITY_SUMMARY=benchmarks/results/reliability.json pytest -m "" tests/reliability``.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from tests.reliability import _stack

REPO = Path(__file__).resolve().parents[2]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = _stack.tally()
    if not rows:
        return
    injected = sum(r["injected"] for r in rows)
    lost = sum(r["injected"] for r in rows if not r["survived"])
    terminalreporter.write_line(
        f"reliability: {len(rows)} fault scenarios, {injected} faults injected, {injected - lost} survived, {lost} lost"
    )
    target = os.environ.get("LS_RELIABILITY_SUMMARY")
    if target:
        path = Path(target) if Path(target).is_absolute() else REPO / target
        stats = terminalreporter.stats
        extra = {
            "tests_passed": len(stats.get("passed", [])),
            "tests_failed": len(stats.get("failed", [])) + len(stats.get("error", [])),
            "tests_skipped": len(stats.get("skipped", [])),
            "markexpr": config.getoption("markexpr"),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        }
        _stack.write_summary(path, extra)
        terminalreporter.write_line(f"reliability: summary written to {path}")
