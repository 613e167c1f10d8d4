"""Train the cascade transformer sharded with FSDP2 on several processes, with every callback of the kit.

    python examples/train_sharded.py                          # 2 CPU processes (gloo), sharded checkpoints
    python examples/train_sharded.py --fault-step 10          # inf in rank 1's gradient shard at step 10: skipped
    python examples/train_sharded.py --full-checkpoint        # one gathered checkpoint file instead of a folder
    python examples/train_sharded.py --ckpt-path sharded_run/checkpoints/last.ckpt --max-steps 60   # resume
    python examples/train_sharded.py --accelerator gpu --devices 4

Lightning's ``ModelParallelStrategy`` starts the other processes by running this script again (``torchrun`` works
too). ``CascadeTransformerModule.configure_model`` shards every transformer block and every stage over the
data-parallel mesh (``lightning_stability.sharding.shard_module``); ``tensor_parallel_size=1`` because the module
shards data-parallel only. The data are synthetic latent pairs (smooth random walks at the post-mortem's RMS of 5.7,
plus noise), generated in memory, so the script needs nothing else. Rank 0 writes ``<out>/results.json`` and the
stability report.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, Dataset

from lightning_stability.callbacks import (
    AdaptiveLossWeight,
    GradientGuard,
    ScaleFactorClamp,
    SignalMonitor,
    SpectralNormInjection,
    StabilityReport,
)
from lightning_stability.reference.cascade import CascadeTransformerModule


class LatentPairs(Dataset):
    """Enhancement in miniature: target = smooth latents (RMS 5.7), source = target + noise."""

    def __init__(self, n: int = 256, dim: int = 16, frames: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        walk = torch.randn(n, dim, frames, generator=g).cumsum(-1)
        self.target = 5.7 * walk / walk.pow(2).mean().sqrt()
        self.source = self.target + 2.0 * torch.randn(n, dim, frames, generator=g)
        self.conditioning = self.target.roll(1, dims=0)

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"source": self.source[i], "target": self.target[i], "conditioning": self.conditioning[i]}


class GradientShardFault(pl.Callback):
    """Writes inf into rank 1's local shard of one gradient at one step (before the guard looks at it)."""

    def __init__(self, step: int, param: str = "model.stages.0.in_proj.weight") -> None:
        self.step, self.param = step, param

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step and trainer.global_rank == min(1, trainer.world_size - 1):
            grad = pl_module.get_parameter(self.param).grad
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            with torch.no_grad():
                local.view(-1)[0] = float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("sharded_run"))
    parser.add_argument("--full-checkpoint", action="store_true", help="gather a single checkpoint file on rank 0")
    parser.add_argument("--ckpt-path", default=None, help="resume from this checkpoint (file or sharded folder)")
    parser.add_argument("--fault-step", type=int, default=None, help="inject inf into rank 1's gradient shard")
    args = parser.parse_args()

    pl.seed_everything(0)  # every process builds the same model and draws the same spectral-norm start
    config = {"latent_dim": 16, "widths": [64, 64, 64], "n_layers": 2, "n_heads": 4, "spectral_norm_output": False}
    model = CascadeTransformerModule(config, lr=1e-3, warmup_steps=5, total_steps=args.max_steps)
    strategy = ModelParallelStrategy(
        data_parallel_size=args.devices, tensor_parallel_size=1, save_distributed_checkpoint=not args.full_checkpoint
    )
    guard = GradientGuard(on_persistent="rollback", snapshot_every=10)
    callbacks = [
        *([GradientShardFault(args.fault_step)] if args.fault_step is not None else []),  # before the guard
        guard,
        AdaptiveLossWeight("stage3", base_weight=None, min_weight=0.5, max_weight=2.0, warmup_steps=10),
        ScaleFactorClamp(min_scale=0.7, max_scale=1.5, warn_above=1.3),
        SignalMonitor(train_every_n_steps=10, signal_type="latent"),
        SpectralNormInjection("*.output_proj"),  # applied in setup, before configure_model shards the model
        StabilityReport(dirpath=args.out),
        ModelCheckpoint(dirpath=args.out / "checkpoints", every_n_train_steps=10, save_last=True),
    ]
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=strategy,
        max_steps=args.max_steps,
        default_root_dir=args.out,
        log_every_n_steps=5,
        enable_progress_bar=False,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(model, DataLoader(LatentPairs(), batch_size=8), ckpt_path=args.ckpt_path)
    seconds = time.perf_counter() - start
    skips = [e.step for e in guard.event_log.events if e.kind == "skip"]
    if trainer.is_global_zero:
        results = {
            "world_size": trainer.world_size,
            "accelerator": args.accelerator,
            "global_step": trainer.global_step,
            "fit_seconds": seconds,
            "skipped_steps": skips,
            "rollbacks": guard.num_rollbacks,
            "final_train_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
        }
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))
    if torch.distributed.is_initialized():  # CPU gloo workers can abort at exit with the group still alive
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
