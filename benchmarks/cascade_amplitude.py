"""Fixed-budget experiment on the cascade transformer (the harness behind
``benchmarks/results/cascade_amplitude.json``).

    python benchmarks/cascade_amplitude.py NAME STEPS ['{"config": {...}, "module": {...}, "data": {...}}'] [kit]
        [threads=N] [encoder=random|PATH] [seed=S]

Trains the cascade recipe's model (``lightning_stability/reference/cascade/recipe.py``, as the example:
``CascadeConfig(widths=(128, 192, 192), n_layers=3, n_heads=4)``, ``stage_weights=(0.5, 0.5, 1.0)``,
``cosine_weight=0.1``, lr 3e-4, gradient clip 5.0; the JSON overrides the config
fields, the module's keyword arguments and the ``LatentPairDataModule`` arguments) for ``STEPS`` optimizer steps on
the latents of the 240-utterance eSpeak NG corpus, cached under ``$CASCADE_EXP_ROOT`` (default ``cascade_exp``:
``speech_corpus/`` and ``latent_cache/``, made once and reused by every run). ``encoder=random`` (default) uses
``RandomConvEncoder``, ``encoder=PATH`` a ``CodecModule`` checkpoint. No callbacks unless ``kit`` (then the example's:
``GradientGuard``, ``AdaptiveLossWeight("stage3")``, ``ScaleFactorClamp``).

Then it evaluates every held-out window (the validation split's centred 150-frame windows) and prints one
``RESULT {json}`` line, also appended to ``$CASCADE_EXP_RESULTS`` (default ``cascade_experiments.jsonl``): per stage
the masked L1 to the clean latents and its gain over the degraded input (doing nothing), the share of windows whose
RMS factor is clamped, the mean factor and the global output/target RMS ratio over real frames (see
``lightning_stability.reference.cascade.evaluation.evaluate``), plus training time.
``python benchmarks/cascade_amplitude_collect.py RESULTS.jsonl RUN...`` then writes
``benchmarks/results/cascade_amplitude.json``, the README's cascade row.
"""

import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_stability.reference.cascade.evaluation import evaluate  # the example's evaluation: numbers agree
from lightning_stability.reference.cascade.recipe import (
    CASCADE_CORPUS,
    CASCADE_DATA,
    GRADIENT_CLIP_VAL,
    cascade_config,
    kit_callbacks,
)
from lightning_stability.reference.data import LatentPairDataModule

warnings.filterwarnings("ignore")


class Trace(pl.Callback):
    """Every ``every`` steps: each stage's mean RMS factor and clamped share on the training batch, and what sets the
    raw output's amplitude: the output projection's ``||W||_F / sqrt(D)`` (the RMS it gives a unit LayerNorm output;
    spectral norm fixes ``sigma_max = 1``), the mean gain of the LayerNorm before it, and the mean predicted gain
    (``predict_gain``)."""

    def __init__(self, every: int = 10) -> None:
        self.every = every
        self.rows: list[dict] = []
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        if step % self.every:
            return
        row = {"step": step, "loss": round(float(outputs["loss"]), 4)}
        print(f"step {step} loss {row['loss']} t {time.perf_counter() - self.started:.0f}s", flush=True)
        for k, stage in enumerate(pl_module.model.stages, start=1):
            training = stage.output_proj.training
            stage.output_proj.eval()  # no extra spectral-norm power iteration for this read
            weight = stage.output_proj.weight.detach()
            stage.output_proj.train(training)
            frob = float(torch.linalg.matrix_norm(weight)) / weight.shape[0] ** 0.5
            row[f"s{k}"] = [
                round(float(stage.scale.last_scale.mean()), 3),
                round(float(stage.scale.last_clamped_fraction), 2),
                round(frob, 3),
                round(float(stage.out_norm.weight.detach().mean()), 3),
                round(float(trainer.callback_metrics.get(f"train/stage{k}_gain", torch.tensor(1.0))), 3),
            ]
        self.rows.append(row)


class HeldOut(pl.Callback):
    """Every ``every`` steps (``eval_every=N``): the held-out evaluation, for learning curves; the model goes back to
    training mode afterwards (the evaluation runs no spectral-norm power iteration: eval mode)."""

    def __init__(self, data, every: int) -> None:
        self.data = data
        self.every = every
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not self.every or step % self.every or step == trainer.max_steps:
            return
        ev = evaluate(pl_module, self.data)
        pl_module.train()
        self.rows.append({"step": step, **{k: ev[k] for k in ("val_gain_over_input", "val_clamped_fraction",
                                                              "val_rms_ratio")}})  # fmt: skip


def main(argv: list[str]) -> None:
    name, steps = argv[0], int(argv[1])
    package = Path(__file__).resolve().parents[1] / "lightning_stability"
    code = hashlib.sha256()
    for part in ("reference/cascade/transformer.py", "nn/scale.py", "reference/cascade/module.py"):
        code.update((package / part).read_bytes())
    spec = json.loads(argv[2]) if len(argv) > 2 and argv[2] else {}
    flags = argv[3:]
    options = dict(a.split("=", 1) for a in flags if "=" in a)
    torch.set_num_threads(int(options.get("threads", 1)))
    seed = int(options.get("seed", 0))
    encoder = options.get("encoder", "random")
    root = Path(os.environ.get("CASCADE_EXP_ROOT", "cascade_exp"))
    data = LatentPairDataModule(
        encoder=None if encoder == "random" else encoder,
        corpus={"cache_dir": root / "speech_corpus", **CASCADE_CORPUS},
        cache_dir=root / "latent_cache",
        **{**CASCADE_DATA, **spec.get("data", {})},
    )
    t0 = time.perf_counter()
    data.prepare_data()
    data.setup("fit")
    data_s = time.perf_counter() - t0
    if spec.get("rms_last_only"):  # the README's hypothesis as worded: the RMS term on the last stage only
        import lightning_stability.reference.cascade.module as cascade_module

        full = cascade_module._rms_error
        cascade_module._rms_error = lambda stages, target, mask: full(stages[-1:], target, mask)
    config = cascade_config(**spec.get("config", {}))
    pl.seed_everything(seed, verbose=False)
    model = cascade_module(config, **spec.get("module", {}))
    if "branch_gain" in spec:  # screening: start r >= 1 stages nearer the identity (their projection scaled down)
        with torch.no_grad():
            for stage in model.model.stages:
                if stage.residual_weight >= 1:
                    stage.out_norm.weight.mul_(spec["branch_gain"])
    trace = Trace()
    curve = HeldOut(data, int(options.get("eval_every", 0)))
    callbacks: list = [trace, curve]
    if "kit" in flags:
        callbacks += kit_callbacks(config)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=GRADIENT_CLIP_VAL,
        callbacks=callbacks,
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev = evaluate(model, data)
    eval_s = time.perf_counter() - t0
    result = {
        "code": code.hexdigest()[:10],
        "name": name, "steps": steps, "encoder": encoder, "seed": seed, "kit": "kit" in flags, **ev,
        "data_s": round(data_s, 1), "train_s": round(train_s, 1), "s_per_step": round(train_s / max(steps, 1), 3),
        "eval_s": round(eval_s, 1), "spec": spec, "trace": trace.rows, "curve": curve.rows,
    }  # fmt: skip
    print("RESULT", json.dumps(result))
    with open(os.environ.get("CASCADE_EXP_RESULTS", "cascade_experiments.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
