"""Train the three-stage cascade transformer on codec latents with the stability kit (copy this file and edit it).

    python examples/train_cascade.py                                    # demo codec latents if present, else random
    python examples/train_cascade.py --codec demo_output/checkpoints/last.ckpt --max-steps 500   # a quicker look
    python examples/train_cascade.py --audio-dir my_speech/             # <voice>/<utterance>.wav recordings
    python examples/train_cascade.py --post-mortem                      # the old configuration, for comparison
    python examples/train_cascade.py --corpus-cache demo_output/speech_corpus  # reuse the demo's generated corpus

It is what ``lightning-stability fit --config configs/cascade.yaml`` does. Task: latent-space enhancement; the source
is the latents of a degraded utterance (noise, gain, band-limiting), the target those of the clean one, the
conditioning those of another utterance of the same voice (docs/design.md, post-mortem 3, has the architecture).
Afterwards it
reports, on held-out utterances, the masked L1 distance to the clean latents of the degraded input (doing nothing)
and of each stage's output, each stage's gain over doing nothing, its RMS factor, the share of windows whose factor
was clamped and the output/target RMS ratio, plus where the time went (data, training, evaluation), into
``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_stability.callbacks import SignalMonitor, StabilityReport
from lightning_stability.reference.cascade.evaluation import evaluate
from lightning_stability.reference.cascade.recipe import (
    CASCADE_CORPUS,
    CASCADE_DATA,
    CASCADE_MODULE,
    GRADIENT_CLIP_VAL,
    cascade_config,
    cascade_module,
    kit_callbacks,
)
from lightning_stability.reference.cascade.transformer import CascadeConfig
from lightning_stability.reference.data import LatentPairDataModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codec", type=Path, default=Path("demo_output/checkpoints/last.ckpt"))
    parser.add_argument("--audio-dir", type=Path, default=None, help="<voice>/<utterance>.wav (default: eSpeak corpus)")
    parser.add_argument("--out", type=Path, default=Path("cascade_run"))
    parser.add_argument(
        "--corpus-cache",
        type=Path,
        default=None,
        help="eSpeak corpus cache (default: OUT/speech_corpus; generating it "
        "is the slowest part of a first run, so point this at the demo's to reuse it)",
    )
    # 2000 (as configs/cascade.yaml): on the demo codec's latents the held-out gain of the output passes 15 % at
    # about 2000 steps and is still rising (docs/guides/cascade.md, "Measured")
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=CASCADE_MODULE["lr"])
    parser.add_argument(
        "--post-mortem",
        action="store_true",
        help="r3 = 0.1, no spectral norm, no qk-LayerNorm, no input normalisation and none of the amplitude fixes",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared 2-core machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    data = LatentPairDataModule(
        encoder=args.codec,
        fallback_to_random=True,  # no demo checkpoint yet: a fixed random convolutional encoder
        audio=args.audio_dir,
        corpus={"cache_dir": args.corpus_cache or args.out / "speech_corpus", **CASCADE_CORPUS},
        cache_dir=args.out / "latent_cache",
        **CASCADE_DATA,  # 2 s windows at 75 frames/s
    )
    config = cascade_config()  # the recipe's size: the post-mortem's (256, 384, 384) x 6 layers halved
    if args.post_mortem:
        config = CascadeConfig(
            widths=config.widths,
            n_layers=config.n_layers,
            n_heads=config.n_heads,
            residual_weights=(1.0, 1.0, 0.1),
            spectral_norm_output=False,
            qk_layernorm=False,
            normalize_input=False,
            predict_gain=False,
            calibrate_output=False,
            frame_envelope=False,
            identity_init=False,
        )
    model = cascade_module(config, rms_weight=0.0 if args.post_mortem else 1.0, lr=args.lr)
    trainer = pl.Trainer(
        max_steps=args.max_steps,
        default_root_dir=args.out,
        val_check_interval=200,
        check_val_every_n_epoch=None,
        log_every_n_steps=25,
        gradient_clip_val=GRADIENT_CLIP_VAL,
        callbacks=[
            *kit_callbacks(config),  # GradientGuard, AdaptiveLossWeight("stage3"), ScaleFactorClamp
            SignalMonitor(train_every_n_steps=50, signal_type="latent"),
            StabilityReport(dirpath=args.out),
            ModelCheckpoint(dirpath=args.out / "checkpoints", save_last=True),
        ],
    )
    data.prepare_data()  # corpus generation and latent extraction (cached: instant on later runs)
    data.setup("fit")
    data_seconds = time.perf_counter() - started
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data)
    train_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    held_out = evaluate(model, data)
    seconds = {
        "data": round(data_seconds, 1),
        "train": round(train_seconds, 1),
        "train_per_step": round(train_seconds / max(1, trainer.global_step), 3),
        "eval": round(time.perf_counter() - t0, 1),
        "total": round(time.perf_counter() - started, 1),
    }
    results = {"max_steps": args.max_steps, "post_mortem": args.post_mortem, **held_out, "seconds": seconds}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(
        "held-out masked L1 to the clean latents: " + ", ".join(f"{k} {v:.3f}" for k, v in held_out["val_l1"].items())
    )
    print("gain over doing nothing: " + ", ".join(f"{k} {v:+.1%}" for k, v in held_out["val_gain_over_input"].items()))
    print("RMS factor: " + ", ".join(f"{s:.3f}" for s in held_out["val_rms_factor"]))
    print("windows clamped: " + ", ".join(f"{c:.0%}" for c in held_out["val_clamped_fraction"]))
    print("output/target RMS: " + ", ".join(f"{r:.3f}" for r in held_out["val_rms_ratio"]))
    print("seconds: " + ", ".join(f"{k} {v}" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
