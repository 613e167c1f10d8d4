"""LR-sensitivity benchmark: Wortsman et al. (2023) learning-rate sensitivity of the cascade transformer, plain vs kit.

Wortsman et al., "Small-scale proxies for large-scale Transformer training instabilities" (arXiv:2309.14322), §3.1:

    LR sensitivity = E_{lr in grid} [ min(L(lr), L_0) - min_{lr' in grid} L(lr') ]

where ``L(lr)`` is the final loss of a run at learning rate ``lr``, ``L_0`` the loss at initialisation (so a run that
diverged, or ended non-finite, counts as ``L_0``: the ``min`` caps it) and the grid is log-spaced. Lower is better: a
model whose final loss barely depends on the learning rate is easy to tune and stays stable when the rate is too high.

Model and task: ``CascadeTransformerModule`` (3 stages, widths 32, 2 layers, 4 heads) on a fixed synthetic latent
enhancement task (``rescue.latent_triplets``: 16-channel latents with RMS ~5.7; source = target through a fixed channel
mix, gain and noise). AdamW (betas 0.9/0.95, no weight decay), linear warm-up over 10 % of the steps then cosine decay
to 10 % (the module's schedule). The loss reported is the L1 distance between the last stage's output and the target
on a fixed held-out batch (model in eval mode), averaged over the last ``eval_tail`` steps; ``L_0`` is the same at
step 0 (each variant's own initialisation, the same seed for every learning rate).

- ``plain``: the post-mortem's config: last residual 0.1, no spectral norm, no qk-layernorm, torch's default init, an
  RMS scale factor that is effectively unclamped ([1e-3, 1e3]); no callbacks.
- ``kit``: residual 0.3, spectral norm on every stage's output projection, qk-layernorm, scaled-residual init, RMS
  scale clamp [0.7, 1.5], plus the ``GradientGuard()`` and ``ScaleFactorClamp()`` callbacks.
- the spike guards of ``benchmarks/peers.py`` on the *plain* config (they guard training; they do not change the
  model): ``zclip`` (``zclip.ZClipLightningCallback()``, defaults), ``spam`` (``pytorch_optimizer.SPAM`` in place of
  AdamW, the same lr, betas, weight decay and schedule), ``olmo_skip_step`` (``olmo_core.optim.SkipStepAdamW``, fed
  the loss and gradient norm as OLMo-core's train module does) and ``guard_z`` (``GradientGuard(zscore=2.5)``). A
  peer whose package is missing is recorded as unavailable, not imitated.

Per variant: the sensitivity, the largest learning rate of the grid whose run stayed finite and ended below its
initial loss (``largest_stable_lr``), and the final loss there and at the best lr.

Target: kit sensitivity <= 0.5 x plain sensitivity.

JSON (``benchmarks/results/lr_sensitivity.json``; common layout in ``benchmarks/_common.py``)::

    cases: [{"variant": "plain"|"kit"|"zclip"|..., "description", "initial_loss",
             "runs": [{"lr", "final_loss", "finite", "capped_loss", "steps_run", "wall_s"}, ...],
             "min_final_loss", "best_lr", "sensitivity", "relative_sensitivity" (sensitivity / min_final_loss),
             "largest_stable_lr", "loss_at_largest_stable_lr"}]
    summary: {"target", "target_met", "plain_sensitivity", "kit_sensitivity", "ratio" (kit / plain),
              "by_variant": {variant: {"sensitivity", "largest_stable_lr", "min_final_loss"}},
              "unavailable": {variant: why}}

Usage::

    python benchmarks/lr_sensitivity.py           # full mode: 8 learning rates 1e-4..3e-1, 150 steps each
    python benchmarks/lr_sensitivity.py --quick   # CI mode: 3 learning rates, 40 steps
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any

import _common
import lightning.pytorch as pl
import peers
import torch
from rescue import LATENT_DIM, Probe, cascade_config, cascade_module_class, latent_triplets

FULL_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
QUICK_GRID = (1e-3, 3e-2, 3e-1)


def wortsman_sensitivity(final: list[float], initial: float) -> tuple[float, float]:
    """``(sensitivity, min final loss)``: ``mean(min(L(lr), L0)) - min L(lr)``, a non-finite ``L(lr)`` counting as
    ``L0``. If no run ended finite the sensitivity is ``L0 - L0 = 0`` by the formula; callers report that case."""
    capped = [min(v, initial) if math.isfinite(v) else initial for v in final]
    best = min(capped)
    return sum(c - best for c in capped) / len(capped), best


#: variant -> (description, the peers.py method it uses on the plain config, or None)
VARIANTS: dict[str, tuple[str, str | None]] = {
    "plain": ("last residual 0.1, no spectral norm, no qk-layernorm, default init, unclamped RMS scale", None),
    "kit": (
        "residual 0.3, spectral norm, qk-layernorm, scaled-residual init, scale clamp [0.7, 1.5], "
        "GradientGuard(), ScaleFactorClamp()",
        None,
    ),
    "zclip": ("plain config + zclip.ZClipLightningCallback() (defaults)", "zclip"),
    "spam": ("plain config, pytorch_optimizer.SPAM in place of AdamW (defaults otherwise)", "spam"),
    "olmo_skip_step": ("plain config, olmo_core.optim.SkipStepAdamW in place of AdamW", "olmo_skip_step"),
    "guard_z": ("plain config + GradientGuard(zscore=2.5)", "guard_z"),
}


def largest_stable(runs: list[dict[str, Any]], initial: float) -> tuple[float | None, float | None]:
    """The largest lr whose run ended finite and below ``initial``, and its final loss."""
    stable = [r for r in runs if r["finite"] and r["final_loss"] < initial]
    if not stable:
        return None, None
    top = max(stable, key=lambda r: r["lr"])
    return top["lr"], top["final_loss"]


def run(variant: str, lr: float, *, steps: int, tail: int, seed: int, eval_batch: Any) -> tuple[dict[str, Any], float]:
    """Train one variant at one learning rate; returns its result and the initial eval loss."""
    pl.seed_everything(seed, workers=True, verbose=False)
    torch.manual_seed(seed)
    fixed = variant == "kit"
    method = VARIANTS[variant][1]
    module = cascade_module_class()(
        cascade_config(fixed),
        lr=lr,
        warmup_steps=max(1, steps // 10),
        total_steps=steps,
        weight_decay=0.0,
        data=(64, 48, 4, seed),
    )
    probe = Probe(eval_batch, steps, tail=tail, eval_every=max(1, steps // 10))
    initial = probe.eval_loss(module)
    callbacks: list[Any] = []
    if fixed:
        from lightning_stability.callbacks import GradientGuard, ScaleFactorClamp

        callbacks = [GradientGuard(), ScaleFactorClamp()]
    if method is not None:
        setup = next(m for m in peers.METHODS if m.name == method).make()
        if setup.optimizer is not None:
            peers._replace_optimizers(module, setup.optimizer)
        callbacks = [*setup.callbacks, setup.observer]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"lrsens_{variant}_") as root:
        trainer = _common.make_trainer(root, [*callbacks, probe], max_steps=steps)
        trainer.fit(module)
    final = sum(probe.tail_losses) / len(probe.tail_losses) if probe.tail_losses else float("nan")
    finite = probe.failure_step is None and math.isfinite(final) and probe.state_finite(module)
    return (
        {
            "lr": lr,
            "final_loss": final if finite else float("nan"),
            "finite": finite,
            "failure_step": probe.failure_step,
            "steps_run": probe.steps_run,
            "wall_s": round(time.perf_counter() - t0, 2),
            "eval_curve": [[s, v] for s, v in probe.eval_curve],
        },
        initial,
    )


def main() -> int:
    p = _common.parser("lr_sensitivity", __doc__.splitlines()[0])
    p.add_argument("--lrs", default=None, help="comma-separated learning rates (default: the mode's log-spaced grid)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 150, quick 40)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    args = p.parse_args()
    _common.setup_run(args)
    started = time.perf_counter()
    machine = _common.machine_info()
    grid = tuple(float(v) for v in args.lrs.split(",")) if args.lrs else (QUICK_GRID if args.quick else FULL_GRID)
    if any(not (math.isfinite(v) and v > 0) for v in grid):
        p.error(f"`--lrs` must be positive numbers, got {args.lrs!r}")
    steps = args.steps or (40 if args.quick else 150)
    if steps < 2:
        p.error(f"`--steps` must be >= 2, got {steps}")
    tail = max(1, min(10, steps // 10))
    eval_batch = latent_triplets(8, 48, args.seed + 1000).tensors

    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    if any(v not in VARIANTS for v in chosen) or not {"plain", "kit"} <= set(chosen):
        p.error(f"`--variants` must be a subset of {list(VARIANTS)} including plain and kit, got {args.variants!r}")
    versions = peers.package_versions()
    packages = {m.name: m.package for m in peers.METHODS}
    unavailable = {
        v: versions[packages[VARIANTS[v][1]]]
        for v in chosen
        if VARIANTS[v][1] is not None and not peers.usable(packages[VARIANTS[v][1]], versions)
    }
    cases = []
    for variant in [v for v in chosen if v not in unavailable]:
        description = VARIANTS[variant][0]
        runs, initial = [], float("nan")
        for lr in grid:
            result, initial = run(variant, lr, steps=steps, tail=tail, seed=args.seed, eval_batch=eval_batch)
            result["capped_loss"] = min(result["final_loss"], initial) if result["finite"] else initial
            runs.append(result)
            print(f"[lr_sensitivity] {variant} lr={lr:g}: final {_common.fmt(result['final_loss'])}", flush=True)
        sensitivity, best = wortsman_sensitivity([r["final_loss"] for r in runs], initial)
        best_lr = min(runs, key=lambda r: r["capped_loss"])["lr"]
        top_lr, top_loss = largest_stable(runs, initial)
        cases.append(
            {
                "variant": variant,
                "description": description,
                "initial_loss": initial,
                "runs": runs,
                "min_final_loss": best,
                "best_lr": best_lr,
                "sensitivity": sensitivity,
                "relative_sensitivity": sensitivity / best if best > 0 else float("nan"),
                "all_runs_nonfinite": not any(r["finite"] for r in runs),
                "largest_stable_lr": top_lr,
                "loss_at_largest_stable_lr": top_loss,
            }
        )

    by_name = {c["variant"]: c for c in cases}
    plain, kit = by_name["plain"]["sensitivity"], by_name["kit"]["sensitivity"]
    ratio = kit / plain if plain > 0 else float("nan")
    summary = {
        "target": "kit LR sensitivity <= 0.5 x plain",
        "target_met": bool(math.isfinite(ratio) and ratio <= 0.5 and not by_name["kit"]["all_runs_nonfinite"]),
        "plain_sensitivity": plain,
        "kit_sensitivity": kit,
        "ratio": ratio,
        "plain_min_final_loss": by_name["plain"]["min_final_loss"],
        "kit_min_final_loss": by_name["kit"]["min_final_loss"],
        "by_variant": {
            c["variant"]: {
                "sensitivity": c["sensitivity"],
                "largest_stable_lr": c["largest_stable_lr"],
                "loss_at_largest_stable_lr": c["loss_at_largest_stable_lr"],
                "min_final_loss": c["min_final_loss"],
                "best_lr": c["best_lr"],
            }
            for c in cases
        },
        "unavailable": unavailable,
    }
    config = {
        "quick": args.quick,
        "seed": args.seed,
        "lr_grid": list(grid),
        "steps": steps,
        "eval_tail_steps": tail,
        "warmup_steps": max(1, steps // 10),
        "schedule": "linear warm-up then cosine to 10 %",
        "optimizer": "AdamW betas (0.9, 0.95), weight_decay 0",
        "model": {"latent_dim": LATENT_DIM, "widths": [32, 32, 32], "n_layers": 2, "n_heads": 4, "T": 48},
        "batch_size": 4,
        "train_items": 64,
        "loss": "L1(last stage output, target) on a fixed held-out batch of 8",
        "variants": {v: VARIANTS[v][0] for v in chosen},
        "packages": versions,
    }
    out = _common.write_result(
        "lr_sensitivity", args, config=config, cases=cases, summary=summary, started=started, machine=machine
    )
    print(
        f"lr_sensitivity: plain {plain:.3f}, kit {kit:.3f}, ratio {ratio:.2f} (target <= 0.5: "
        f"{'met' if summary['target_met'] else 'NOT met'}) over lr {grid[0]:g}..{grid[-1]:g} -> {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
