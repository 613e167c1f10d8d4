"""The ``lightning-stability demo`` main job (placeholder until the codec module lands)."""

from __future__ import annotations

import sys


def run_demo_cli(argv: list[str]) -> int:
    print(
        "lightning-stability demo: the demo trains the reference codec, which has not landed yet. "
        "Run the tests with `bash scripts/setup.sh && .venv/bin/python -m pytest -q`.",
        file=sys.stderr,
    )
    return 3
