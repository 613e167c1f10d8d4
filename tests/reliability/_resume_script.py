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

``--sharded distributed|full``: the same run on 2 CPU processes under ``ModelParallelStrategy`` (the module shards
itself with FSDP2 in ``configure_model``), launched the way a user launches it (Lightning re-runs this script for
rank 1), saving sharded (``save_distributed_checkpoint=True``: a folder of per-rank shards) or full (one file,
gathered on rank 0) checkpoints. Every rank writes ``<name>.rank<r>.pt`` with the gathered parameters, its own shard
of the optimizer state and every callback's ``state_dict``; the process group is shut down before exit.
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

from tests._helpers_fsdp import full_state
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


def _local(obj):
    """Optimizer state with DTensors replaced by this rank's local shard (comparable, saveable without a mesh)."""
    if hasattr(obj, "to_local"):
        return obj.to_local().detach().clone()
    if isinstance(obj, dict):
        return {k: _local(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_local(v) for v in obj)
    return obj


def run(args, out: Path, *, ckpt: str | None = None, callbacks=()) -> dict:
    pl.seed_everything(0, verbose=False)
    module = make_module(args.kind, parse_faults(args.faults))
    stack = full_stack(args.kind, out / "report", guard={"zscore": 6.0, "zscore_warmup": 3})
    saver = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=args.every, save_top_k=-1)
    sharded = {}
    if args.sharded != "none":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=args.sharded == "distributed"
        )
        sharded = {"accelerator": "cpu", "devices": 2, "strategy": strategy}
    trainer = make_trainer(
        out,
        [*stack, saver, *callbacks],
        max_steps=args.max_steps,
        enable_checkpointing=True,
        log_every_n_steps=1,
        **sharded,
    )
    trainer.fit(module, loader(args.kind, n=args.n, resumable=not args.plain_loader), ckpt_path=ckpt)
    return {
        "global_step": trainer.global_step,
        "module": full_state(module),
        "optim": _local(trainer.optimizers[0].state_dict()),
        "callbacks": stack_state(stack),
        "loss_weights": module.loss_weights.as_dict(),
        "rank": trainer.global_rank,
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
    parser.add_argument("--sharded", choices=["none", "distributed", "full"], default="none")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out = Path(args.out)
    if args.mode == "killable":
        run(args, out, callbacks=[HangAt(args.hang_at, out / "ready")])
        return
    full = run(args, out / "full")
    suffix = f".rank{full['rank']}" if args.sharded != "none" else ""
    torch.save(full, out / f"full{suffix}.pt")
    torch.save(run(args, out / "resumed", ckpt=args.ckpt), out / f"resumed{suffix}.pt")
    if torch.distributed.is_initialized():  # see tests.helpers._ShutdownLauncher: gloo workers may abort at exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    main()
