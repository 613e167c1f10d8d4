"""The ``lightning-stability`` command: ``fit`` (LightningCLI) and ``demo`` (the main job on built-in data)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print("usage: lightning-stability {fit,validate,demo} [options]")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from lightning_stability.demo import run_demo_cli

        return run_demo_cli(rest)
    if command in {"fit", "validate"}:
        from lightning.pytorch.cli import LightningCLI

        LightningCLI(args=[command, *rest], save_config_kwargs={"overwrite": True})
        return 0
    print(f"lightning-stability: unknown command {command!r}; expected one of fit, validate, demo", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
