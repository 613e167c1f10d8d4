"""A small training run for the kill-and-resume tests, run as its own process (``python -m ...``).

Modes:

- ``killable``: train ``kind`` with the whole callback stack and ``ModelCheckpoint(every_n_train_steps=...)``; at the
  start of step ``--hang-at`` (the checkpoint of that step is on disk) write ``<out>/ready`` and sleep, so the parent
  can ``SIGKILL`` the process mid-epoch;
- ``reference``: the uninterrupted run to ``--max-steps``, then the run resumed from ``--ckpt`` to ``--max-steps``, in
  this one process (same threads, same kernels), each dumped to ``<out>/<name>.pt``: parameters, optimizer state and
  every callback's ``state_dict``.

Faults (``--faults kind:step,step;kind:step``) are injected as in the fault matrix, so the guard's statistics, the
adaptive weight's history and the report's traces are not trivial.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.helpers import make_trainer
from tests.reliability._stack import full_stack, loader, make_module, stack_state


class HangAt(pl.Callback):
    def __init__(self, step: int, marker: Path) -> None:
        self.step = step
        self.marker = marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.marker.write_text(f"{trainer.global_step} {batch_idx}")
            time.sleep(600)  # the parent kills us here


def parse_faults(text: str) -> dict[str, set[int]]:
    faults: dict[str, set[int]] = {}
    for part in filter(None, text.split(";")):
        kind, steps = part.split(":")
        faults[kind] = {int(s) for s in steps.split(",")}
    return faults


def run(args, out: Path, *, ckpt: str | None = None, callbacks=()) -> dict:
    pl.seed_everything(0, verbose=False)
    module = make_module(args.kind, parse_faults(args.faults))
    stack = full_stack(args.kind, out / "report", guard={"zscore": 6.0, "zscore_warmup": 3})
    saver = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=args.every, save_top_k=-1)
    trainer = make_trainer(
        out, [*stack, saver, *callbacks], max_steps=args.max_steps, enable_checkpointing=True, log_every_n_steps=1
    )
    trainer.fit(module, loader(args.kind, n=args.n, resumable=not args.plain_loader), ckpt_path=ckpt)
    return {
        "global_step": trainer.global_step,
        "module": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "optim": trainer.optimizers[0].state_dict(),
        "callbacks": stack_state(stack),
        "loss_weights": module.loss_weights.as_dict(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["killable", "reference"])
    parser.add_argument("--kind", default="codec")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=14)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--hang-at", type=int, default=7)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--faults", default="")
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--plain-loader", action="store_true", help="a plain DataLoader (not resumable mid-epoch)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out = Path(args.out)
    if args.mode == "killable":
        run(args, out, callbacks=[HangAt(args.hang_at, out / "ready")])
        return
    torch.save(run(args, out / "full"), out / "full.pt")
    torch.save(run(args, out / "resumed", ckpt=args.ckpt), out / "resumed.pt")


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    main()
