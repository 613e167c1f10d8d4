"""The ``lightning-stability`` command: ``fit`` and ``validate`` (a LightningCLI) and ``demo`` (the main job on
built-in data).

The package's callbacks, modules and datamodules are imported before the LightningCLI parser is built, so they are
known by their short names on the command line and in YAML (``--trainer.callbacks+=GradientGuard``,
``class_path: GradientGuard``, ``--model CodecModule``, ``--data SpeechCorpusDataModule``) and listed among the known
subclasses by ``fit --help``.
"""

from __future__ import annotations

import sys
from typing import Any

PROG = "lightning-stability"

#: The subcommands, each with the line ``lightning-stability --help`` prints for it.
COMMANDS: dict[str, str] = {
    "fit": "train a model (LightningCLI): --config configs/codec.yaml, or --model, --data, --trainer.*",
    "validate": "one validation pass of a model (LightningCLI: the options of fit, --ckpt_path CKPT)",
    "demo": "train a small speech codec on generated speech (or --data DIR) and report its quality",
}

#: The Trainer methods the LightningCLI part runs. ``test`` and ``predict`` are left out: the package's datamodules
#: define no test or predict split, so those subcommands would be offered and then fail.
LIGHTNING_COMMANDS: tuple[str, ...] = ("fit", "validate")

DOCS = (
    "Documentation: docs/getting-started.md (this command line) and docs/guides/ (one page per callback) in the\n"
    "source repository; `mkdocs serve` there builds and serves the site."
)


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        f"usage: {PROG} {{{','.join(COMMANDS)}}} [options]",
        "",
        "Numerically stable training of audio models with PyTorch Lightning.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += [
        "",
        f"`{PROG} COMMAND --help` shows the options of one command; `fit --help` lists the known callbacks, models",
        "and datamodules, which take their short names: --trainer.callbacks+=GradientGuard, --model CodecModule,",
        "class_path: SignalMonitor in YAML.",
        "",
        DOCS,
    ]
    return "\n".join(lines)


def _import_package_classes() -> None:
    """Import every public class of the callbacks, modules and data packages (they are lazy), so that jsonargparse,
    which finds subclasses among the imported ones, resolves their short names and lists them in ``--help``."""
    import lightning_stability.callbacks as callbacks
    import lightning_stability.modules as modules
    import lightning_stability.reference.data as data

    for package in (callbacks, modules, data):
        for name in package.__all__:
            getattr(package, name)


def _cli_class() -> type:
    from lightning.pytorch.cli import LightningCLI

    class StabilityCLI(LightningCLI):
        """LightningCLI with the subcommands this package supports, parsing the arguments ``main`` was given."""

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {name: skip for name, skip in LightningCLI.subcommands().items() if name in LIGHTNING_COMMANDS}

        def parse_arguments(self, parser: Any, args: Any) -> None:
            # LightningCLI warns when it is given `args` while `sys.argv` is not empty; `main` always passes the
            # arguments it was called with (its own command line, or a list from Python), so there is no mix-up
            self.config = parser.parse_args(args)

    return StabilityCLI


def main(argv: list[str] | None = None) -> int:
    """Run ``lightning-stability`` with ``argv`` (default: the command line). Returns the exit status; the LightningCLI
    subcommands exit through ``SystemExit`` on ``--help`` and on configuration errors, as LightningCLI does."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from lightning_stability.reference.codec.demo import run_demo_cli

        return run_demo_cli(rest)
    if command in LIGHTNING_COMMANDS:
        _import_package_classes()
        _cli_class()(
            args=[command, *rest],
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": PROG},
        )
        return 0
    print(
        f"{PROG}: unknown command {command!r}; expected one of {', '.join(COMMANDS)} (`{PROG} --help` describes them)",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
